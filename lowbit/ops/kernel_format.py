"""Convert a :class:`~lowbit.core.qtensor.QuantizedTensor` into the Pallas kernels' operands, once.

lowbit's layout (``lowbit/core/pack.py``) packs ``W[out, in]`` along ``in`` per row, with 3-bit codes
spanning words. The kernels (``kernels/``, installed as ``lowbit.kernels``) read the K-major
"blocked planes" layout documented in ``kernels/layout.py`` instead. Converting costs an unpack and a
repack of the whole weight, so do it at load time::

    params = lowbit.ops.kernel_format.prepare(params)      # QuantizedTensor -> KernelWeight where possible
    y = lowbit.ops.linear(x, params["w"])               # kernel on GPU/TPU, jnp reference elsewhere

Invariant (tested): ``quant_matmul_reference(x, to_kernel_layout(q)) == x @ dequantize(q).T``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


from lowbit.kernels.layout import (KernelWeight, MAX_TABLE, N_ALIGN, SUPPORTED_BITS, DEFAULT_TILE_ROWS,
                                   pack_block, pack_planes)
from lowbit.core.nodes import register_node
from lowbit.core.pack import unpack
from lowbit.core.qtensor import QuantizedTensor
from lowbit.core.quantizers import scale_table

__all__ = ["check", "supports", "to_kernel_layout", "prepare", "KernelWeight"]

_FORMAT = {"int": "int", "nf4": "table", "fp4": "table", "codebook": "table", "sign": "sign", "onebit": "sign"}


def check(q) -> str | None:
    """Why ``q`` has no kernel layout (``None`` when :func:`to_kernel_layout` supports it)."""
    if not isinstance(q, QuantizedTensor):
        return f"expected a QuantizedTensor, got {type(q).__name__}"
    if q.format not in _FORMAT:
        return f"format {q.format!r} has no kernel"
    if q.bits not in SUPPORTED_BITS:
        return f"bits={q.bits}: the kernels support {SUPPORTED_BITS}"
    if _FORMAT[q.format] == "table" and (q.levels is None or len(q.levels) > MAX_TABLE):
        return f"codebook with {None if q.levels is None else len(q.levels)} levels (kernels: <= {MAX_TABLE})"
    per_channel = q.per_tensor or q.group_size == q.shape[1]
    if not per_channel and q.group_size % 16:
        return f"group_size={q.group_size}: kernels need a multiple of 16 (or per-channel)"
    return None


def supports(q) -> bool:
    return check(q) is None


def to_kernel_layout(q: QuantizedTensor, *, scale_dtype=None, tile_rows: int = DEFAULT_TILE_ROWS) -> KernelWeight:
    """The kernel operands of ``q``.

    Args:
      q: a quantized ``(out_features, in_features)`` matrix.
      scale_dtype: dtype of the kernel's scale (and zero) rows; ``None`` keeps the stored dtype
        (float32 for double-quantized scales). The TPU kernel prefers float32.
      tile_rows: word rows per pack block (16; larger values make bigger dot pieces).
    """
    why = check(q)
    if why:
        raise ValueError(f"to_kernel_layout: {why}")
    if scale_dtype is None:
        scale_dtype = jnp.float32 if isinstance(q.scales, tuple) else q.scales.dtype
    return _convert(q, jnp.dtype(scale_dtype).name, int(tile_rows))


@functools.partial(jax.jit, static_argnames=("scale_dtype", "tile_rows"))
def _convert(q: QuantizedTensor, scale_dtype: str, tile_rows: int) -> KernelWeight:
    n, k = q.shape
    bits = q.bits
    pb = pack_block(bits, tile_rows)
    kp = -(-k // pb) * pb
    np_ = -(-n // N_ALIGN) * N_ALIGN

    codes = unpack(q.data, bits, k)                                  # (N, K) uint8
    codes = jnp.pad(codes.T, ((0, kp - k), (0, np_ - n)))           # (Kp, Np)
    planes = pack_planes(codes, bits, tile_rows)

    table = scale_table(q)                                          # (N or 1, G) float32
    per_channel = q.per_tensor or q.group_size == k
    if per_channel:
        group_size, g_rows = None, 1
        s = jnp.broadcast_to(table[:, :1].T, (1, n))
    else:
        group_size, g_rows = q.group_size, -(-kp // q.group_size)
        s = jnp.broadcast_to(table.T, (q.n_groups, n))
    scales = jnp.pad(s, ((0, g_rows - s.shape[0]), (0, np_ - n))).astype(scale_dtype)

    fmt = _FORMAT[q.format]
    zeros, zero_point = None, None
    if fmt == "int":
        if q.zeros is not None:
            z = unpack(q.zeros, bits, q.n_groups).astype(jnp.float32)  # (N or 1, G)
            z = z[:, :1].T if per_channel else z.T
            z = jnp.broadcast_to(z, (z.shape[0], n))
            zeros = jnp.pad(z, ((0, g_rows - z.shape[0]), (0, np_ - n))).astype(scale_dtype)
        else:
            zero_point = float(2 ** (bits - 1))
    col_scale = None
    if q.col_scale is not None:
        col_scale = jnp.pad(q.col_scale.reshape(1, k), ((0, 0), (0, kp - k)))
    levels = tuple(float(v) for v in q.levels) if fmt == "table" else None
    return KernelWeight(planes=planes, scales=scales, zeros=zeros, col_scale=col_scale,
                        perm=None if q.perm is None else q.perm.astype(jnp.int32),
                        k=k, n=n, bits=bits, group_size=group_size, format=fmt, levels=levels,
                        zero_point=zero_point, tile_rows=tile_rows)


_KW_ARRAYS = ("planes", "scales", "zeros", "col_scale", "perm")
_KW_META = ("k", "n", "bits", "group_size", "format", "levels", "zero_point", "tile_rows")


def _kernel_fields(w: KernelWeight) -> tuple[dict, dict]:
    meta = {m: getattr(w, m) for m in _KW_META}
    meta["levels"] = None if w.levels is None else list(w.levels)
    return {f: getattr(w, f) for f in _KW_ARRAYS}, meta


def _kernel_build(fields: dict, meta: dict) -> KernelWeight:
    levels = meta["levels"]
    return KernelWeight(**{f: fields.get(f) for f in _KW_ARRAYS}, k=int(meta["k"]), n=int(meta["n"]),
                        bits=int(meta["bits"]), group_size=meta["group_size"], format=str(meta["format"]),
                        levels=None if levels is None else tuple(float(v) for v in levels),
                        zero_point=meta["zero_point"], tile_rows=int(meta["tile_rows"]))


# the kernel layout is a weight node like the others: a checkpoint can hold a prepared model
register_node("kernel", KernelWeight, fields=_kernel_fields, build=_kernel_build)


def prepare(tree, **kw):
    """Replace every supported :class:`QuantizedTensor` in a pytree by its :class:`KernelWeight`."""
    def conv(leaf):
        return to_kernel_layout(leaf, **kw) if isinstance(leaf, QuantizedTensor) and supports(leaf) else leaf

    return jax.tree_util.tree_map(conv, tree, is_leaf=lambda v: isinstance(v, QuantizedTensor))
