"""Past one device: meshes, data-parallel statistics and multi-process runs, with JAX's own runtime.

Nothing here schedules work by hand: arrays carry a :class:`jax.sharding.NamedSharding` over a
:class:`jax.sharding.Mesh` with two axes,

- ``data``: calibration and evaluation windows and training batches are split along it (their
  leading axis); every jitted forward then runs data-parallel and reductions over windows
  (``X^T X``, a loss mean) become all-reduces inserted by XLA;
- ``model``: linear weights (dense or :class:`~lowbit.core.qtensor.QuantizedTensor`) split by
  output rows (:func:`shard_params`), for models larger than one device.

A mesh comes from the config (``mesh: {data: 8, model: 1}``) or the command line (``lowbit run
CONFIG --mesh data=8``); by default all devices sit on ``data``. It is installed with
:func:`jax.set_mesh` (:func:`use_mesh`). Several processes (hosts of a TPU pod slice, or
``--coordinator`` / ``--num-processes`` / ``--process-id``) join with :func:`initialize`, which
calls :func:`jax.distributed.initialize`; each process then places only its share of every batch
on its devices (:func:`jax.make_array_from_callback`; the token ids themselves, a few MB, are
tokenized by every process) and only process 0 writes (:func:`is_primary`).

The Hessian of a layer is the mean over *tokens*, ``H = 2 psum(X^T X) / psum(n)``
(:func:`data_parallel_hessian`): devices (or processes) holding unequal numbers of windows still
give the exact global mean, since each contributes its own token count, not one vote per batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lowbit.core.checks import is_int

__all__ = ["AXES", "parse_mesh", "make_mesh", "use_mesh", "current_mesh", "data_size", "data_sharding",
           "replicated", "shard_windows", "replicate", "place_batch", "shard_params", "data_parallel_hessian", "pad_windows",
           "initialize", "is_primary", "agree_min", "agree_any", "to_host", "spread"]

AXES = ("data", "model")

_MESH: Mesh | None = None   # the mesh installed by use_mesh (None: one device, no sharding)


# ----------------------------------------------------------------------------- meshes


def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int] | None:
    """``"data=8,model=2"`` or ``{"data": 8, "model": 2}`` -> ``{"data": 8, "model": 2}`` (a missing
    axis is 1; ``None`` -> ``None``, i.e. every device on ``data``). Unknown axes, non-positive or
    non-integer sizes are errors naming the input."""
    if spec is None:
        return None
    if isinstance(spec, str):
        items = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            m = re.fullmatch(r"(\w+)\s*=\s*(-?\d+)", part)
            if not m:
                raise ValueError(f"mesh {spec!r}: expected AXIS=SIZE[,AXIS=SIZE] with axes {AXES}, e.g. data=8,model=1")
            items[m.group(1)] = int(m.group(2))
        spec = items
    if not isinstance(spec, Mapping):
        raise ValueError(f"mesh: expected a mapping like {{data: 8, model: 1}} or 'data=8,model=1', got {spec!r}")
    unknown = sorted(set(spec) - set(AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axes {unknown}; the axes are {AXES}")
    out = {}
    for a in AXES:
        v = spec.get(a, 1)
        if not is_int(v) or v < 1:
            raise ValueError(f"mesh.{a}={v!r}: expected a positive int")
        out[a] = int(v)
    return out


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Iterable | None = None) -> Mesh:
    """A ``(data, model)`` :class:`~jax.sharding.Mesh` over ``devices`` (default: every device of
    every process, ``jax.devices()``). ``spec=None`` puts them all on ``data``. The mesh must use
    exactly the devices there are: a larger one is an error that says how many exist."""
    devs = list(jax.devices() if devices is None else devices)
    shape = parse_mesh(spec) or {"data": len(devs), "model": 1}
    need = shape["data"] * shape["model"]
    if need != len(devs):
        raise ValueError(f"mesh {shape}: needs {need} devices, but {len(devs)} are available "
                         f"({jax.process_count()} process(es), {jax.local_device_count()} local device(s) each; "
                         "on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N fakes N devices)")
    return jax.make_mesh((shape["data"], shape["model"]), AXES, devices=devs,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
    """Install ``mesh`` (``jax.set_mesh``) for the ``with`` body and make it :func:`current_mesh`;
    ``None`` is a no-op (single device)."""
    global _MESH
    if mesh is None:
        yield None
        return
    prev = _MESH
    _MESH = mesh
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _MESH = prev


def current_mesh() -> Mesh | None:
    return _MESH


def data_size(mesh: Mesh | None = None) -> int:
    mesh = mesh if mesh is not None else _MESH
    return 1 if mesh is None else mesh.shape["data"]


def data_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading axis over ``data``, the rest replicated."""
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- placing arrays


def _check_divides(n: int, mesh: Mesh, what: str) -> None:
    d = data_size(mesh)
    if n % d:
        raise ValueError(f"{what}: {n} windows do not split over mesh.data={d} devices; use a multiple of {d} "
                         f"(or pad_windows, which pads with masked copies)")


def _put(x, sharding: NamedSharding):
    """``x`` placed with ``sharding``. Across processes a global array is resharded by XLA; a
    process-local value (equal on every process: the same program on the same data) is placed
    shard by shard from this process's copy."""
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_windows(x, mesh: Mesh | None, what: str = "windows"):
    """``x`` (leading axis: windows) split over ``mesh``'s ``data`` axis; ``mesh=None``: as is."""
    if mesh is None:
        return x
    _check_divides(x.shape[0], mesh, what)
    return _put(x, data_sharding(mesh, x.ndim))


def replicate(tree, mesh: Mesh | None):
    """Every array leaf of ``tree`` replicated over ``mesh`` (``None``: as is)."""
    if mesh is None:
        return tree
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: x if getattr(x, "sharding", None) == sharding else _put(x, sharding), tree)


def _local(x):
    """This process's copy of a replicated array (a global one's first local shard)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x.addressable_data(0)
    return x


def place_batch(xb):
    """A batch of windows split over the current mesh's ``data`` axis: the jitted forward on it runs
    data-parallel, and reductions over its tokens (``X^T X``, a mean loss) become all-reduces. A
    batch that does not divide over the devices (a short last batch) is replicated instead (correct,
    not parallel). No mesh (:func:`use_mesh`): as is."""
    mesh = _MESH
    if mesh is None:
        return xb
    return shard_windows(xb, mesh) if xb.shape[0] % data_size(mesh) == 0 else replicate(xb, mesh)


def pad_windows(windows: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """``(padded, valid)``: ``windows`` padded with copies of window 0 to a multiple of
    ``multiple``, and a bool mask of the real ones (padding is masked out of every statistic)."""
    n = windows.shape[0]
    pad = -n % multiple
    valid = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
    if pad:
        windows = np.concatenate([windows, np.repeat(windows[:1], pad, axis=0)])
    return windows, valid


def _row_spec(x, axis: str | None) -> P:
    return P(axis, *([None] * (x.ndim - 1)))


def shard_params(params, mesh: Mesh, linear: str = r"_proj$") -> Any:
    """``params`` placed on ``mesh``: every 2-D linear weight whose path matches ``linear`` (a regex
    on the ``/``-joined path) split by output rows over the ``model`` axis, dense or quantized (a
    :class:`~lowbit.core.qtensor.QuantizedTensor`'s packed codes, scales and zeros by rows; its
    column permutation replicated); everything else replicated. A weight whose rows do not divide by
    ``mesh.model`` (or with double-quantized scales) stays replicated."""
    from lowbit.core.qtensor import QuantizedTensor
    from lowbit.core.transforms import path_str

    rx = re.compile(linear)
    m = mesh.shape["model"]

    def place(kp, x):
        path = path_str(kp)
        if isinstance(x, QuantizedTensor):
            split = rx.search(path) and x.shape[0] % m == 0 and not x.per_tensor and not isinstance(x.scales, tuple)

            def leaf(a, by_rows):
                if a is None:
                    return None
                spec = _row_spec(a, "model") if (split and by_rows and a.shape[0] == x.shape[0]) else P()
                return _put(a, NamedSharding(mesh, spec))

            scales = replicate(x.scales, mesh) if isinstance(x.scales, tuple) else leaf(x.scales, True)
            return dataclasses.replace(x, data=leaf(x.data, True), scales=scales,
                                       zeros=leaf(x.zeros, True), perm=leaf(x.perm, False))
        if hasattr(x, "ndim") and x.ndim == 2 and rx.search(path) and x.shape[0] % m == 0:
            return _put(x, NamedSharding(mesh, _row_spec(x, "model")))
        return _put(x, replicated(mesh))

    return jax.tree_util.tree_map_with_path(place, params, is_leaf=lambda v: isinstance(v, QuantizedTensor))


# ----------------------------------------------------------------------------- statistics


def data_parallel_hessian(x, valid, mesh: Mesh):
    """``(H, n)``: ``H = 2 psum(X^T X) / psum(n)`` (float32) over the token rows of ``x (windows,
    tokens, cols)`` split over ``mesh``'s ``data`` axis, with ``valid (windows,)`` marking the real
    windows (padding, e.g. from :func:`pad_windows`, contributes neither rows nor count). Each
    device folds its own windows into a local ``X^T X`` and token count, then one all-reduce of
    each: with unequal real windows per device the result is still the exact global mean."""
    def local(xs, vs):
        xs = xs.astype(jnp.float32) * vs[:, None, None].astype(jnp.float32)
        flat = xs.reshape(-1, xs.shape[-1])
        n = jnp.sum(vs.astype(jnp.float32)) * xs.shape[1]
        return jax.lax.psum(flat.T @ flat, "data"), jax.lax.psum(n, "data")

    xtx, n = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")),
                                   out_specs=(P(), P())))(shard_windows(x, mesh, "x"), shard_windows(valid, mesh, "valid"))
    return 2.0 * xtx / n, n


# ----------------------------------------------------------------------------- solves


def spread(fn: Callable, items: Mapping[str, tuple], devices: list | None = None) -> dict:
    """``{key: fn(*args)}`` with the items assigned round-robin to ``devices`` (default: this
    process's devices of the current mesh, or ``jax.local_devices()``): every ``fn`` is dispatched
    before any result is waited for, so independent solves (the linears of a block) run in parallel,
    one per device. Results come back replicated over the current mesh (or on the default device).

    In a multi-process job the items are first dealt over the processes (item ``j`` to process
    ``j % process_count``, then over its devices), every process solves only its own, and each
    process's results reach every other by :func:`jax.experimental.multihost_utils.broadcast_one_to_all`
    (a sum in which only the owner contributes: every process gets the owner's bits exactly). ``fn``
    must then be traceable by :func:`jax.eval_shape` (the other processes build zeros of its output's
    shapes); the results come back as host arrays, equal on every process."""
    nproc, me = jax.process_count(), jax.process_index()
    if devices is None:
        devices = (sorted(_MESH.local_devices, key=lambda d: d.id) if _MESH is not None else jax.local_devices())
    keys = list(items)
    owner = {k: j % nproc for j, k in enumerate(keys)}
    out = {}
    for j, key in enumerate(k for k in keys if owner[k] == me):
        dev = devices[j % len(devices)]
        try:   # under a one-device mesh: jit refuses inputs outside the context mesh's devices
            with jax.set_mesh(jax.make_mesh((1, 1), AXES, devices=[dev], axis_types=(jax.sharding.AxisType.Auto,) * 2)):
                out[key] = fn(*jax.device_put(jax.tree.map(_local, items[key]), dev))
        except ValueError as e:
            raise ValueError(f"params[{key!r}]: {e}") from None
    if nproc == 1:
        return out
    from jax.experimental import multihost_utils

    for p in range(nproc):   # every process takes part in each broadcast, in the same order
        owned = [k for k in keys if owner[k] == p]
        if not owned:
            continue
        if p == me:
            tree = {k: out[k] for k in owned}
        else:
            shapes = {k: jax.eval_shape(fn, *jax.tree.map(_local, items[k])) for k in owned}
            tree = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        dtypes = jax.tree.map(lambda x: np.dtype(x.dtype), tree)
        got = multihost_utils.broadcast_one_to_all(tree, is_source=p == me)
        # the sum may widen small integer dtypes; zeros added to the owner's values change no bit
        out.update(jax.tree.map(lambda x, d: np.asarray(x).astype(d, copy=False), got, dtypes))
    return out


# ----------------------------------------------------------------------------- processes


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout_s: int = 120) -> None:
    """Join a multi-process job (:func:`jax.distributed.initialize`). With no arguments the cluster is
    auto-detected (TPU VMs, SLURM, ...); else ``coordinator`` (``host:port``, process 0 listens there),
    ``num_processes`` and ``process_id`` name this process. On CPU the collectives go through gloo.
    One line on stderr says where it is joining; a coordinator that cannot be reached within
    ``timeout_s`` ends the process there (jax aborts it: ``DEADLINE_EXCEEDED`` on ``RegisterTask``),
    other failures to join raise a RuntimeError naming the address."""
    if coordinator is not None:
        if not re.fullmatch(r"[\w.\-\[\]:]+:\d+", coordinator):
            raise ValueError(f"coordinator={coordinator!r}: expected HOST:PORT, e.g. 10.0.0.2:8476")
        if num_processes is None or process_id is None:
            raise ValueError("coordinator: also needs num_processes and process_id")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id}: expected 0 <= process_id < num_processes={num_processes}")
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = coordinator or "the auto-detected coordinator"
    sys.stderr.write(f"[lowbit] joining the job at {where} as process {process_id} of {num_processes} "
                     f"(waiting up to {timeout_s} s for every process)\n")
    sys.stderr.flush()
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout_s,
                                   heartbeat_timeout_seconds=max(10, timeout_s // 4))
    except Exception as e:   # noqa: BLE001 - jax raises XlaRuntimeError / RuntimeError variants
        raise RuntimeError(f"jax.distributed.initialize: could not join the job at {where} within {timeout_s} s "
                           f"as process {process_id} of {num_processes} ({type(e).__name__}: {str(e)[:300]})") from None


def is_primary() -> bool:
    """Process 0: the one that writes results, reports and checkpoints' metadata."""
    return jax.process_index() == 0


def agree_min(value: int) -> int:
    """The smallest of every process's ``value`` (one process: ``value``)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.asarray([int(value)], np.int32))))


def agree_any(flags: list[bool]) -> list[bool]:
    """Element-wise OR of every process's ``flags`` (one process: ``flags``)."""
    if jax.process_count() == 1 or not flags:
        return list(flags)
    from jax.experimental import multihost_utils

    got = multihost_utils.process_allgather(np.asarray(flags, np.int32))
    return [bool(v) for v in np.asarray(got).reshape(-1, len(flags)).any(axis=0)]


def to_host(x) -> np.ndarray:
    """A (possibly multi-process, sharded) array as a full numpy array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
