"""Checkpoints of a training run (orbax ``CheckpointManager``) and how a run resumes from them.

Layout of ``DIR`` (one step directory per saved optimizer step, written by orbax under a temporary
name and renamed when complete, so a kill mid-save never leaves a step that looks finished)::

    DIR/<step>/state/   StandardSave of {"params": trainable float32 masters (nested by path),
                                         "opt_state": {"00000": leaf, ...} (the optimizer state's
                                                       leaves in tree order), "rng": key data}
    DIR/<step>/meta/    JsonSave: format, step, micro_step, elapsed_s, the run config and its
                        SHA-256, checksums of every saved leaf and of the frozen params

Only the trainable leaves are saved: the frozen ones are re-derived from the model the caller
passes again, and their checksums (:func:`tree_checksums`) in the metadata make sure they are the
same. The optimizer state's structure comes from the optimizer (a fresh ``opt.init``), its leaves
from the checkpoint; the config hash guarantees the two match.

Resume (:meth:`TrainCheckpoints.restore`) walks the steps from the newest:

* a step whose metadata or arrays cannot be read, or whose arrays do not match their checksums, is
  *corrupt*: it is moved out of ``DIR`` into the quarantine directory (kept for inspection, never
  deleted) with a warning, and the previous step is tried;
* a readable step written with another configuration raises :class:`ConfigMismatchError` naming
  every differing field (nothing is moved: the run directory belongs to the other configuration);
* no step at all: ``None`` (a fresh start); only corrupt steps: ``RuntimeError``.

Saves are synchronous (``enable_async_checkpointing=False``): when :meth:`TrainCheckpoints.save`
returns the step is on disk, which is what the crash-and-resume guarantee needs; orbax's
``LatestN`` preservation policy keeps the newest ``keep`` steps.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lowbit.core.checks import is_int
from lowbit.core.transforms import path_str
from lowbit.io.checkpoint import local_copy, process_local_options
from lowbit.train.step import TrainState

__all__ = ["TrainCheckpoints", "Restored", "ConfigMismatchError", "tree_checksums", "config_diff", "FORMAT"]

FORMAT = "lowbit-train-checkpoint"
VERSION = 1


class ConfigMismatchError(ValueError):
    """Resuming a run directory with a configuration other than the one that wrote it."""


class Restored(NamedTuple):
    step: int
    state: TrainState
    meta: dict


# ----------------------------------------------------------------------------- checksums

_ODD = np.uint32(2654435761)   # Knuth's multiplicative-hash constant (odd: weights stay invertible)


def _leaf_checksum(x):
    """Position-weighted sum (mod 2**32) of the raw bits of ``x``: every word gets an odd weight, so
    changing any single word always changes the sum."""
    x = jnp.ravel(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = jnp.dtype(x.dtype).itemsize
    if size == 8:
        u = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    else:
        u = jax.lax.bitcast_convert_type(x, {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[size]).astype(jnp.uint32)
    w = jnp.arange(u.shape[0], dtype=jnp.uint32) * _ODD * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(u * w, dtype=jnp.uint32)


@jax.jit
def _checksums(flat: dict):
    return {k: _leaf_checksum(v) for k, v in flat.items()}


def tree_checksums(tree) -> dict[str, str]:
    """``{path: "dtype[shape]:checksum"}`` of every array leaf (QuantizedTensors opened up), computed
    on the device in one jitted call."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    flat = {path_str(kp): jnp.asarray(v) for kp, v in leaves}
    sums = jax.device_get(_checksums(flat))
    return {k: f"{jnp.dtype(v.dtype).name}{list(v.shape)}:{int(sums[k]):08x}" for k, v in flat.items()}


# ----------------------------------------------------------------------------- configs

def _dotted(d, prefix: str = "") -> dict[str, Any]:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_dotted(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}"))
        if not d and prefix:
            out[prefix.rstrip(".")] = {}
        return out
    return {prefix: d}


def config_diff(saved: dict, now: dict) -> list[str]:
    """``"field: checkpoint X, now Y"`` for every dotted field that differs between two configs."""
    a, b = _dotted(saved), _dotted(now)
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            out.append(f"{k}: checkpoint {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}")
    return out


# ----------------------------------------------------------------------------- state encoding

def _encode(state: TrainState) -> dict:
    return {"params": state.params,
            "opt_state": {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(state.opt_state))},
            "rng": jax.random.key_data(state.rng)}


def _decode(plain: dict, like: TrainState) -> TrainState:
    opt_leaves, treedef = jax.tree.flatten(like.opt_state)
    stored = plain["opt_state"]
    if len(stored) != len(opt_leaves):
        raise ValueError(f"optimizer state has {len(stored)} leaves, expected {len(opt_leaves)}")
    opt_state = jax.tree.unflatten(treedef, [stored[f"{i:05d}"] for i in range(len(opt_leaves))])
    rng = jax.random.wrap_key_data(plain["rng"], impl=jax.random.key_impl(like.rng))
    return TrainState(plain["params"], opt_state, rng)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ----------------------------------------------------------------------------- the manager

def _json_safe(meta: dict) -> dict:
    return json.loads(json.dumps(meta, default=str))


class TrainCheckpoints:
    """Periodic checkpoints of one run in ``directory`` (see the module docstring).

    Args:
      directory: the checkpoint directory (created).
      keep: how many of the newest steps to keep (>= 1).
      quarantine: where corrupt steps are moved (default ``<directory>-corrupt``).
    """

    def __init__(self, directory: str, keep: int = 3, quarantine: str | None = None):
        if not is_int(keep) or keep < 1:
            raise ValueError(f"keep={keep!r}: expected an int >= 1")
        self.directory = os.path.abspath(directory)
        self.quarantine = os.path.abspath(quarantine or f"{self.directory}-corrupt")
        os.makedirs(self.directory, exist_ok=True)
        policies = getattr(ocp, "checkpoint_managers", None)
        if policies is not None and hasattr(policies, "LatestN"):
            keep_opt = {"preservation_policy": policies.LatestN(n=keep)}
        else:                               # orbax before preservation policies
            keep_opt = {"max_to_keep": keep}
        # in a multi-process job process 0 writes alone (see save)
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=jax.process_count() == 1,
                                               cleanup_tmp_directories=True, **keep_opt,
                                               **process_local_options())
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    # -- queries
    def steps(self) -> list[int]:
        return sorted(int(s) for s in self._mngr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def discard_after(self, step: int) -> list[int]:
        """Delete the checkpoints after ``step`` (a run restarting from an earlier step would otherwise
        meet them again when it saves); returns their steps."""
        gone = [s for s in self.steps() if s > step]
        for s in gone:
            self._mngr.delete(s)
        return gone

    # -- save
    def save(self, step: int, state: TrainState, meta: dict) -> None:
        """Write ``state`` (and JSON-able ``meta``, to which the format, the step and the arrays'
        checksums are added) as checkpoint ``step``; returns when it is on disk. In a multi-process
        job only process 0 writes (its copy of the replicated state; orbax writes a checkpoint's
        metadata from process 0 only, so the others' copies would be incomplete)."""
        if jax.process_index() != 0:
            return
        plain = local_copy(_encode(state))
        meta = _json_safe({**meta, "format": FORMAT, "version": VERSION, "step": int(step),
                           "state_checksums": tree_checksums(plain)})
        self._mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(plain),
                                                           meta=ocp.args.JsonSave(meta)), force=True)
        self._mngr.wait_until_finished()

    # -- restore
    def read_meta(self, step: int) -> dict:
        meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
            raise ValueError(f"not a {FORMAT} metadata record")
        return meta

    def _read_state(self, step: int, like: TrainState, meta: dict) -> TrainState:
        plain_like = _encode(like)
        got = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(plain_like))))["state"]
        sums = tree_checksums(got)
        bad = sorted(k for k, v in meta.get("state_checksums", {}).items() if sums.get(k) != v)
        missing = sorted(set(meta.get("state_checksums", {})) ^ set(sums))
        if bad or missing or not meta.get("state_checksums"):
            raise ValueError(f"arrays do not match their checksums: {(bad or missing)[:4]}")
        return _decode(got, like)

    def restore(self, like: TrainState, *, config: dict, frozen_checksums: dict[str, str] | None = None
                ) -> Restored | None:
        """The newest readable checkpoint written with ``config`` (see the module docstring), as
        ``Restored(step, state, meta)``; ``None`` when the directory holds no checkpoint."""
        steps = self.steps()
        if not steps:
            return None
        for i, step in enumerate(reversed(steps)):
            try:
                meta = self.read_meta(step)
            except Exception as e:  # noqa: BLE001 -- any failure to read means this step is unusable
                self._set_aside(step, f"metadata unreadable: {type(e).__name__}: {e}", steps[:len(steps) - 1 - i])
                continue
            diff = config_diff(meta["config"], config)
            if frozen_checksums is not None and meta.get("frozen_checksums") is not None:
                fa, fb = meta["frozen_checksums"], frozen_checksums
                diff += [f"frozen params {k}: checkpoint {fa.get(k)!r}, now {fb.get(k)!r}"
                         for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
            if diff:
                raise ConfigMismatchError(
                    f"cannot resume from {self.directory} (step {step}): it was written with another "
                    f"configuration; mismatching fields ({len(diff)}): " + "; ".join(diff[:12])
                    + (" ..." if len(diff) > 12 else "")
                    + ". Use a new run directory, or the configuration the run started with.")
            try:
                state = self._read_state(step, like, meta)
            except Exception as e:  # noqa: BLE001
                self._set_aside(step, f"arrays unreadable: {type(e).__name__}: {str(e)[:300]}",
                                steps[:len(steps) - 1 - i])
                continue
            return Restored(step, state, meta)
        raise RuntimeError(f"no readable checkpoint left in {self.directory}: every step was corrupt and has "
                           f"been moved to {self.quarantine}; delete the run directory to start afresh")

    def _set_aside(self, step: int, why: str, earlier: list[int]) -> None:
        src = os.path.join(self.directory, str(step))
        os.makedirs(self.quarantine, exist_ok=True)
        dst = os.path.join(self.quarantine, f"step-{step}")
        n = 1
        while os.path.exists(dst):
            n += 1
            dst = os.path.join(self.quarantine, f"step-{step}.{n}")
        if os.path.exists(src):
            shutil.move(src, dst)
        self._mngr.reload()
        then = f"falling back to the previous checkpoint (step {earlier[-1]})" if earlier else \
            "no earlier checkpoint is left"
        warnings.warn(f"checkpoint step {step} in {self.directory} is corrupt ({why}); moved it to {dst}; "
                      f"{then}", RuntimeWarning, stacklevel=3)

    def close(self) -> None:
        self._mngr.close()

    def __enter__(self) -> "TrainCheckpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
