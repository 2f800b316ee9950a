"""Atomic save/restore of parameter trees that hold :class:`QuantizedTensor` leaves (orbax).

Layout of a checkpoint directory::

    DIR/manifest.json   structure: nested dicts/lists, array shapes/dtypes, QuantizedTensor metadata
    DIR/arrays/         orbax StandardCheckpointer of the same tree with QuantizedTensors as dicts
    DIR/extra.json      caller's metadata (model config, recipe, ...), optional

The directory is written under a temporary name and renamed into place, so a crash never leaves a
half-written checkpoint and an existing checkpoint is only replaced by a complete one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lowbit.core.qtensor import QuantizedTensor

__all__ = ["save", "restore", "read_extra", "atomic_directory"]

_QT_META = ("shape", "bits", "group_size", "format", "levels", "per_tensor")
_QT_ARRAYS = ("data", "scales", "zeros", "col_scale", "perm")


def _encode(x) -> tuple[Any, Any]:
    """-> (plain tree of arrays for orbax, JSON structure)."""
    if isinstance(x, QuantizedTensor):
        arrays, fields = {}, {}
        for f in _QT_ARRAYS:
            v = getattr(x, f)
            if v is None:
                continue
            arrays[f], fields[f] = _encode(v)
        meta = {k: getattr(x, k) for k in _QT_META}
        return arrays, {"__qtensor__": meta, "fields": fields}
    if isinstance(x, dict):
        enc = {str(k): _encode(v) for k, v in x.items()}
        return {k: v[0] for k, v in enc.items()}, {"__dict__": {k: v[1] for k, v in enc.items()}}
    if isinstance(x, (list, tuple)):
        enc = [_encode(v) for v in x]
        return ({str(i): v[0] for i, v in enumerate(enc)},
                {"__list__": [v[1] for v in enc], "tuple": isinstance(x, tuple)})
    a = np.asarray(x) if not isinstance(x, jax.Array) else x
    return a, {"shape": list(a.shape), "dtype": str(a.dtype)}


def _abstract(spec) -> Any:
    if "__qtensor__" in spec:
        return {f: _abstract(s) for f, s in spec["fields"].items()}
    if "__dict__" in spec:
        return {k: _abstract(s) for k, s in spec["__dict__"].items()}
    if "__list__" in spec:
        return {str(i): _abstract(s) for i, s in enumerate(spec["__list__"])}
    return jax.ShapeDtypeStruct(tuple(spec["shape"]), jnp.dtype(spec["dtype"]))


def _decode(plain, spec) -> Any:
    if "__qtensor__" in spec:
        meta = dict(spec["__qtensor__"])
        meta["shape"] = tuple(meta["shape"])
        meta["levels"] = None if meta["levels"] is None else tuple(meta["levels"])
        fields = {f: _decode(plain[f], s) for f, s in spec["fields"].items()}
        return QuantizedTensor(**fields, **meta)
    if "__dict__" in spec:
        return {k: _decode(plain[k], s) for k, s in spec["__dict__"].items()}
    if "__list__" in spec:
        items = [_decode(plain[str(i)], s) for i, s in enumerate(spec["__list__"])]
        return tuple(items) if spec.get("tuple") else items
    return plain


@contextlib.contextmanager
def atomic_directory(path: str):
    """``with atomic_directory(path) as tmp:`` write files into ``tmp``; on success ``tmp`` replaces
    ``path`` (an existing directory is only swapped out for a complete one), on error nothing changes."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(tmp)
        yield tmp
        old = None
        if os.path.exists(path):
            old = f"{tmp}.old"
            os.replace(path, old)
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(path: str, tree, extra: dict | None = None) -> str:
    """Atomically write ``tree`` (and JSON-able ``extra``) to directory ``path``; returns the path."""
    path = os.path.abspath(path)
    plain, spec = _encode(tree)
    with atomic_directory(path) as tmp:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, "arrays"), plain)
        ckptr.wait_until_finished()
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump({"format": "lowbit-checkpoint", "version": 1, "tree": spec}, f)
        if extra is not None:
            with open(os.path.join(tmp, "extra.json"), "w") as f:
                json.dump(extra, f, indent=2, default=str)
    return path


def _manifest(path: str) -> dict:
    mf = os.path.join(path, "manifest.json")
    if not os.path.isfile(mf):
        raise FileNotFoundError(f"{path}: not a lowbit checkpoint (no manifest.json)")
    with open(mf) as f:
        m = json.load(f)
    if m.get("format") != "lowbit-checkpoint":
        raise ValueError(f"{mf}: expected format 'lowbit-checkpoint', got {m.get('format')!r}")
    return m


def restore(path: str):
    """Read back the tree written by :func:`save` (QuantizedTensors included)."""
    path = os.path.abspath(path)
    spec = _manifest(path)["tree"]
    plain = ocp.StandardCheckpointer().restore(os.path.join(path, "arrays"), _abstract(spec))
    return _decode(plain, spec)


def read_extra(path: str) -> dict:
    _manifest(path)
    p = os.path.join(path, "extra.json")
    if not os.path.isfile(p):
        return {}
    with open(p) as f:
        return json.load(f)
