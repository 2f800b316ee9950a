"""Atomic save/restore of parameter trees that hold weight nodes (QuantizedTensors, ...; orbax).

Layout of a checkpoint directory::

    DIR/manifest.json        structure: nested dicts/lists, array shapes/dtypes and sha256 checksums,
                             and every weight node as its registered kind and static metadata
                             (``{"__node__": "qtensor" | "mixed" | "int8" | "onebit" | "lora" | ...,
                             "meta": ..., "__dict__": children}``, :mod:`lowbit.core.nodes`; version 3.
                             Version 2 manifests, with per-kind entries and class paths, and version 1,
                             without checksums, are still read; a file never makes lowbit import anything)
    DIR/arrays/              orbax StandardCheckpointer of the same tree with every weight node as a dict
                             of its children
    DIR/extra.json           caller's metadata (model config, recipe, ...), optional
    DIR/<extra files>        caller's files (e.g. layers.csv), optional
    DIR/.lowbit-output.json  every file above (:mod:`lowbit.io.outputs`)

Arrays split over the processes of a multi-process job (e.g. linears sharded over a ``model`` axis
that spans hosts) are saved collectively: every process calls :func:`save`, writes its own shards
through orbax, and the manifest holds one sha256 per shard (``shards``) instead of one per array;
:func:`restore` reads whole arrays and checks every shard.

The directory is written under a temporary name and renamed into place, so a crash never leaves a
half-written checkpoint and an existing checkpoint is only replaced by a complete one -- and only if
:func:`lowbit.io.outputs.prepare_output_dir` allows it (lowbit never deletes files it did not write).
:func:`restore` verifies every array against its checksum; any damage (changed bytes, truncated or
missing files, a bad manifest) raises :class:`CheckpointError` naming the directory (and the array).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lowbit.core import nodes
from lowbit.faults import crash_point
from lowbit.io import outputs

__all__ = ["save", "restore", "read_extra", "atomic_directory", "is_collective", "local_copy",
           "process_local_options", "CheckpointError", "CheckpointNotFound", "MANIFEST_VERSION"]

#: 3: weight nodes as {"__node__": registered kind, "meta", "__dict__"}; 2 (still read): per-kind entries
#: and class paths; 1 (still read): no checksums
MANIFEST_VERSION = 3

_RESERVED = ("manifest.json", "extra.json", "arrays", outputs.MARKER)


class CheckpointError(ValueError):
    """A checkpoint directory is damaged or unreadable (the message names the directory, and the array)."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No checkpoint at that path (missing directory or manifest.json)."""


def _sha256(a) -> str:
    a = np.ascontiguousarray(np.asarray(a)).reshape(-1)
    return hashlib.sha256(a.view(np.uint8)).hexdigest()


def _encode(x) -> tuple[Any, Any]:
    """-> (plain tree of arrays for orbax, JSON structure)."""
    kind = nodes.kind_of(x)
    if kind is not None:
        # a weight node (lowbit.core.nodes): its named children as a dict (absent ones not stored), its
        # registered kind and static metadata; "__dict__" lets the walkers treat it like a dict
        fields, meta = kind.fields(x)
        enc = {k: _encode(v) for k, v in fields.items() if v is not None}
        return ({k: v[0] for k, v in enc.items()},
                {"__node__": kind.name, "meta": meta, "__dict__": {k: v[1] for k, v in enc.items()}})
    if isinstance(x, dict):
        enc = {str(k): _encode(v) for k, v in x.items()}
        return {k: v[0] for k, v in enc.items()}, {"__dict__": {k: v[1] for k, v in enc.items()}}
    if isinstance(x, (list, tuple)):
        enc = [_encode(v) for v in x]
        return ({str(i): v[0] for i, v in enumerate(enc)},
                {"__list__": [v[1] for v in enc], "tuple": isinstance(x, tuple)})
    a = np.asarray(x) if not isinstance(x, jax.Array) else x
    if isinstance(a, jax.Array) and not a.is_fully_addressable:   # split over processes: per-shard checksums
        return a, {"shape": list(a.shape), "dtype": str(a.dtype), "shards": None}   # (filled by _shard_sums)
    return a, {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": _sha256(a)}  # on host, as saved


# Manifests written before the node registry (version 2) name nodes by entry key or by class path; they
# map onto registered kinds here, by a fixed table: nothing a file names is ever imported.
_LEGACY_CLASSES = {"lowbit.methods.llm_int8:Int8Weight": "int8", "lowbit.methods.onebit:OneBitWeight": "onebit",
                   "lowbit.core.mixed:MixedWidthWeight": "mixed"}
_LEGACY_KEYS = {"__qtensor__": "qtensor", "__lora__": "lora", "__llm_int8__": "int8", "__onebit__": "onebit"}


def _node_entry(spec) -> tuple[str, dict] | None:
    """(kind name, meta) of a manifest entry that is a weight node, else None."""
    if "__node__" in spec:
        return spec["__node__"], spec.get("meta") or {}
    if "__qmatrix__" in spec:   # version 2: {"type": "module:qualname", "meta": ...}
        kind = spec["__qmatrix__"]["type"]
        if kind not in _LEGACY_CLASSES:
            raise CheckpointError(f"manifest.json: weight node type {kind!r} is not a lowbit weight node "
                                  f"(known: {sorted(_LEGACY_CLASSES)})")
        return _LEGACY_CLASSES[kind], spec["__qmatrix__"]["meta"]
    for key, name in _LEGACY_KEYS.items():
        if key in spec:
            return name, spec[key]
    return None


def _children(spec) -> dict | None:
    """The child entries of a dict-like manifest entry (a dict, or a weight node), else None."""
    if "__qtensor__" in spec:   # version 2 QuantizedTensors keep their arrays under "fields"
        return spec["fields"]
    return spec.get("__dict__")


def _abstract(spec) -> Any:
    kids = _children(spec)
    if kids is not None:
        return {k: _abstract(s) for k, s in kids.items()}
    if "__list__" in spec:
        return {str(i): _abstract(s) for i, s in enumerate(spec["__list__"])}
    # read onto this process's first device: the sharding saved with the arrays names the writer's
    # device, which another process of a multi-process job (or another machine) does not have
    return jax.ShapeDtypeStruct(tuple(spec["shape"]), jnp.dtype(spec["dtype"]),
                                sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))


def _decode(plain, spec) -> Any:
    node = _node_entry(spec)
    if node is not None:
        name, meta = node
        try:
            kind = nodes.get_kind(name, "manifest.json: weight node kind")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        return kind.build({f: _decode(plain[f], s) for f, s in _children(spec).items()}, meta)
    if "__dict__" in spec:
        return {k: _decode(plain[k], s) for k, s in spec["__dict__"].items()}
    if "__list__" in spec:
        items = [_decode(plain[str(i)], s) for i, s in enumerate(spec["__list__"])]
        return tuple(items) if spec.get("tuple") else items
    return plain


def _verify(path: str, plain, spec, where: tuple = ()) -> None:
    """Every array read back must match its manifest shape, dtype and sha256."""
    kids = _children(spec)
    if kids is not None:
        for k, s in kids.items():
            _verify(path, plain[k], s, where + (k,))
    elif "__list__" in spec:
        for i, s in enumerate(spec["__list__"]):
            _verify(path, plain[str(i)], s, where + (str(i),))
    else:
        name = "/".join(where) or "<root>"
        a = np.asarray(plain)
        if list(a.shape) != list(spec["shape"]) or str(a.dtype) != spec["dtype"]:
            raise CheckpointError(f"checkpoint {path}: array {name!r} reads back as {a.dtype}{list(a.shape)}, "
                                  f"manifest.json says {spec['dtype']}{list(spec['shape'])}")
        if isinstance(spec.get("shards"), list):   # written collectively: one sha256 per shard
            for idx, want in spec["shards"]:
                if _sha256(a[tuple(slice(lo, hi) for lo, hi in idx)]) != want:
                    raise CheckpointError(f"checkpoint {path}: array {name!r}, shard {idx}, does not match its "
                                          "sha256 in manifest.json (its bytes on disk changed: the checkpoint is damaged)")
            return
        want = spec.get("sha256")
        if not isinstance(want, str):
            raise CheckpointError(f"checkpoint {path}: manifest.json has no sha256 for array {name!r}")
        if _sha256(a) != want:
            raise CheckpointError(f"checkpoint {path}: array {name!r} does not match its sha256 in manifest.json "
                                  "(its bytes on disk changed: the checkpoint is damaged)")


@contextlib.contextmanager
def atomic_directory(path: str, kind: str | None = None, *, overwrite: bool = False):
    """``with atomic_directory(path, kind) as tmp:`` write files into ``tmp``; on success ``tmp``
    replaces ``path`` (an existing directory is only swapped out for a complete one), on error nothing
    changes.

    With ``kind`` (``"checkpoint"``, ``"export-gptq"``, ...) ``path`` must pass
    :func:`lowbit.io.outputs.prepare_output_dir` (checked before the body runs and again right before
    the swap) and ``tmp`` gets the ``.lowbit-output.json`` marker listing every file written into it.
    Without ``kind`` the caller owns ``path`` (no marker, no content check); the working, home and root
    directories are refused either way.

    The swap renames ``path`` to ``.NAME.tmp-<pid>-<rand>.old``, then ``tmp`` to ``path``, then removes
    the old one; a process killed in between leaves ``path`` missing, and the next
    ``atomic_directory``/:func:`restore` of ``path`` finishes that swap (:func:`lowbit.io.outputs.recover`).
    Temporaries of dead processes are removed on the next write.
    """
    path = os.path.abspath(path)
    if kind is not None:
        outputs.prepare_output_dir(path, kind, overwrite, name="output directory")
    else:
        outputs.check_protected(path, name="output directory")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        outputs.recover(path)
    outputs.remove_stale_temps(path)
    tmp = outputs.temp_dir_name(path)
    os.makedirs(tmp)
    try:
        yield tmp
        if kind is not None:
            outputs.write_marker(tmp, kind)
        crash_point("checkpoint.before-swap")
        old = None
        if os.path.lexists(path):
            if kind is not None:  # anything written into it meanwhile is still not ours to delete
                outputs.check_contents(path, kind, overwrite, name="output directory")
            old = f"{tmp}.old"
            os.replace(path, old)
            crash_point("checkpoint.mid-swap")
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
        crash_point("checkpoint.after-swap")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_extra_files(extra_files: dict | None) -> dict:
    out = {}
    for name, content in (extra_files or {}).items():
        norm = os.path.normpath(name) if isinstance(name, str) and name else ""
        if (not norm or norm != name or os.path.isabs(name) or norm.split(os.sep)[0] in (*_RESERVED, "..")
                or not isinstance(content, (str, bytes))):
            raise ValueError(f"extra_files: {name!r} must be a relative path (not {', '.join(_RESERVED)} or "
                             "outside the directory) with str or bytes content")
        out[name] = content
    return out


def process_local_options() -> dict:
    """orbax options (for a checkpointer or a checkpoint manager) under which this process reads and
    writes alone; ``{}`` in a one-process job. Own barrier keys and synchronous directory creation:
    no signal through the job's key-value store (orbax's default would synchronize every process on
    each save and restore, and let only process 0 write)."""
    me = jax.process_index()
    if jax.process_count() == 1:
        return {}
    return {"multiprocessing_options": ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"lowbit-p{me}"),
            "async_options": ocp.options.AsyncOptions(create_directories_asynchronously=False)}


def _checkpointer() -> ocp.StandardCheckpointer:
    """A checkpointer that reads and writes alone: a lowbit checkpoint is one process's files (in a
    multi-process job process 0 writes the per-layer checkpoints and every process reads them alone)."""
    return ocp.StandardCheckpointer(**process_local_options())


def local_copy(tree):
    """In a multi-process job, each array replicated over processes as this process's copy (numpy);
    an array split over processes is an error naming its position (``ValueError``)."""
    if jax.process_count() == 1:
        return tree

    def one(kp, x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.sharding.is_fully_replicated:
                raise ValueError(f"{jax.tree_util.keystr(kp)}: split over processes; this checkpoint holds "
                                 "one process's copy of replicated arrays only")
            return np.asarray(x.addressable_data(0))
        return x
    return jax.tree_util.tree_map_with_path(one, tree)


def save(path: str, tree, extra: dict | None = None, *, extra_files: dict | None = None,
         kind: str | None = "checkpoint", overwrite: bool = False) -> str:
    """Atomically write ``tree`` (and JSON-able ``extra``, and ``extra_files`` = {relative name: str or
    bytes}) to directory ``path``; returns the path.

    An existing ``path`` is replaced only as :func:`lowbit.io.outputs.prepare_output_dir` allows for
    ``kind`` (``overwrite``: also another kind of lowbit output); ``kind=None``: the caller owns ``path``
    (no marker, no check)."""
    path = os.path.abspath(path)
    files = _check_extra_files(extra_files)
    if is_collective(tree):
        return _save_collective(path, tree, extra, files, kind, overwrite)
    plain, spec = _encode(tree)
    if jax.process_count() > 1:   # this process's copy, as numpy: orbax refuses one-device arrays there
        plain = jax.tree.map(lambda x: np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x), plain)
    with atomic_directory(path, kind, overwrite=overwrite) as tmp:
        ckptr = _checkpointer()
        ckptr.save(os.path.join(tmp, "arrays"), plain)
        ckptr.wait_until_finished()
        _write_metadata(tmp, spec, extra, files)
    return path


def _write_metadata(tmp: str, spec, extra, files: dict) -> None:
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump({"format": "lowbit-checkpoint", "version": MANIFEST_VERSION, "tree": spec}, f)
    if extra is not None:
        with open(os.path.join(tmp, "extra.json"), "w") as f:
            json.dump(extra, f, indent=2, default=str)
    for name, content in files.items():
        fp = os.path.join(tmp, name)
        os.makedirs(os.path.dirname(fp), exist_ok=True)
        if isinstance(content, bytes):
            with open(fp, "wb") as f:
                f.write(content)
        else:
            with open(fp, "w", newline="") as f:
                f.write(content)


def is_collective(tree) -> bool:
    """True when ``tree`` holds an array split over several processes (e.g. linears sharded over a
    ``model`` axis that spans hosts): :func:`save` then writes it collectively, and every process of
    the job must call it."""
    return jax.process_count() > 1 and any(isinstance(x, jax.Array) and not x.is_fully_addressable
                                           for x in jax.tree.leaves(tree))


def _shard_sums(plain, spec) -> None:
    """Fill the ``shards`` entries of ``spec`` (arrays split over processes): every process hashes the
    distinct shards it holds, the hashes are gathered (a collective: every process calls this with the
    same tree), and each shard's index and sha256 go into the manifest."""
    from jax.experimental import multihost_utils

    todo = []   # (spec leaf, array, distinct shard indices) in one order on every process
    def walk(p, s):
        kids = _children(s)
        if kids is not None:
            for k, sub in kids.items():
                walk(p[k], sub)
        elif "__list__" in s:
            for i, sub in enumerate(s["__list__"]):
                walk(p[str(i)], sub)
        elif "shards" in s:
            idx = {tuple(sl.indices(n)[:2] for sl, n in zip(ix, p.shape))
                   for ix in p.sharding.devices_indices_map(p.shape).values()}
            todo.append((s, p, sorted(idx)))
    walk(plain, spec)
    n = sum(len(ix) for _, _, ix in todo)
    mine = np.zeros((n, 32), np.uint8)
    k = 0
    for _, a, idx in todo:
        held = {tuple(sl.indices(dim)[:2] for sl, dim in zip(sh.index, a.shape)): sh for sh in a.addressable_shards}
        for ix in idx:
            if ix in held:
                mine[k] = np.frombuffer(bytes.fromhex(_sha256(held[ix].data)), np.uint8)
            k += 1
    got = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, n, 32)
    k = 0
    for s, _, idx in todo:
        s["shards"] = []
        for ix in idx:
            held = [row for row in got[:, k] if row.any()]
            if not held:
                raise CheckpointError(f"no process holds shard {list(ix)} of an array being saved")
            s["shards"].append([[list(t) for t in ix], bytes(held[0]).hex()])
            k += 1


def _share_name(name: str | None) -> str:
    """Process 0's ``name`` on every process ("" : process 0 failed before it had one)."""
    from jax.experimental import multihost_utils

    buf = np.zeros(4096, np.uint8)
    if name is not None:
        raw = name.encode()
        buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    got = np.asarray(multihost_utils.broadcast_one_to_all(buf, is_source=jax.process_index() == 0), np.uint8)
    return bytes(got).rstrip(b"\0").decode()


def _save_collective(path: str, tree, extra, files: dict, kind, overwrite: bool) -> str:
    """:func:`save` of a tree split over processes: process 0 prepares the temporary directory (as
    :func:`atomic_directory`), every process writes its own shards into it through orbax (its default
    multi-process checkpointer: process 0 finalizes after every process is done), the per-shard
    checksums are gathered, process 0 writes the manifest and swaps the directory into place, and no
    process returns before the swap. The directory must be one that every process reaches (a shared
    filesystem; orbax also takes gs:// paths, which lowbit's atomic swap does not)."""
    from jax.experimental import multihost_utils

    plain, spec = _encode(tree)

    def body(tmp: str) -> None:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, "arrays"), plain)
        ckptr.wait_until_finished()
        _shard_sums(plain, spec)

    if jax.process_index() == 0:
        ctx = atomic_directory(path, kind, overwrite=overwrite)
        try:
            tmp = ctx.__enter__()
        except BaseException:
            _share_name(None)   # the others stop too, with the message below
            raise
        try:
            _share_name(tmp)
            body(tmp)
            _write_metadata(tmp, spec, extra, files)
        except BaseException:
            if not ctx.__exit__(*sys.exc_info()):
                raise
        else:
            ctx.__exit__(None, None, None)
    else:
        tmp = _share_name(None)
        if not tmp:
            raise CheckpointError(f"checkpoint {path}: process 0 could not prepare the directory; see its error")
        body(tmp)
    multihost_utils.sync_global_devices(f"lowbit-checkpoint-saved:{path}")
    return path


def _first_line(e: BaseException) -> str:
    """First line of the innermost cause of ``e`` (orbax wraps tensorstore's precise message), short."""
    chain, x = [], e
    while x is not None and len(chain) < 20:
        chain.append(x)
        x = x.__cause__ or x.__context__
    for x in reversed(chain):
        text = str(x).split(" See full TensorStore details")[0]
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if lines:
            line = lines[0]
            return line if len(line) <= 300 else line[:297] + "..."
    return type(e).__name__


def _manifest(path: str) -> dict:
    if not os.path.exists(path):
        outputs.recover(path)
    if not os.path.isdir(path):
        raise CheckpointNotFound(f"checkpoint {path}: no such directory")
    mf = os.path.join(path, "manifest.json")
    if not os.path.isfile(mf):
        if os.path.exists(os.path.join(path, "arrays")) or os.path.exists(os.path.join(path, outputs.MARKER)):
            raise CheckpointNotFound(f"checkpoint {path}: manifest.json is missing; the checkpoint is damaged")
        raise CheckpointNotFound(f"{path}: not a lowbit checkpoint (no manifest.json)")
    try:
        with open(mf) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read manifest.json: {_first_line(e)}") from None
    if not isinstance(m, dict) or m.get("format") != "lowbit-checkpoint":
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise CheckpointError(f"{mf}: expected format 'lowbit-checkpoint', got {got!r}")
    if m.get("version") not in (1, 2, MANIFEST_VERSION):
        raise CheckpointError(f"checkpoint {path}: manifest.json version {m.get('version')!r} is not supported "
                              f"(expected 1 to {MANIFEST_VERSION}; written by a newer lowbit?)")
    if not isinstance(m.get("tree"), dict):
        raise CheckpointError(f"checkpoint {path}: manifest.json has no 'tree'")
    return m


def restore(path: str):
    """Read back the tree written by :func:`save` (QuantizedTensors included), verifying every array
    against its checksum (manifest version 2). Any damage raises :class:`CheckpointError`."""
    path = os.path.abspath(path)
    m = _manifest(path)
    spec = m["tree"]
    try:
        abstract = _abstract(spec)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path}: manifest.json has a malformed tree ({_first_line(e)})") from None
    try:
        plain = _checkpointer().restore(os.path.join(path, "arrays"), abstract)
    except MemoryError:
        raise
    except Exception as e:  # orbax / tensorstore: missing, truncated or undecodable files
        if "RESOURCE_EXHAUSTED" in str(e):  # out of device memory is not damage
            raise
        raise CheckpointError(f"checkpoint {path}: cannot read arrays: {_first_line(e)}") from None
    try:
        if m["version"] >= 2:
            _verify(path, plain, spec)
        return _decode(plain, spec)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path}: manifest.json does not match the arrays "
                              f"({_first_line(e)})") from None


def read_extra(path: str) -> dict:
    path = os.path.abspath(path)
    _manifest(path)
    p = os.path.join(path, "extra.json")
    if not os.path.isfile(p):
        return {}
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read extra.json: {_first_line(e)}") from None
