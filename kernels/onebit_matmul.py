"""Pallas GPU (Triton lowering) kernel for OneBit linear layers: ``y = ((x * b) @ sign(W)^T) * a``.

OneBit (Xu et al. 2024) stores ``sign(W)`` (1 bit per weight) and two value vectors: ``a`` per output
channel and ``b`` per input channel. Operands: a :class:`~lowbit.kernels.layout.KernelWeight` with
``bits=1``, ``format="sign"``, ``group_size=None``: one int32 plane ``(Kp / 32, Np)`` in the
"blocked planes" layout of ``kernels/layout.py`` (pack block 512 K rows: word row ``r`` of block
``blk`` holds at bit ``j`` the sign bit of K row ``blk*512 + j*16 + r``; 1 = +1, 0 = -1),
``scales = a`` as ``(1, Np)`` and ``col_scale = b`` as ``(1, Kp)`` (optional).

Compared with the generic :mod:`quant_matmul` kernel (which also runs "sign" weights): the weight
tile is exactly +-1 (a select, no scale, so exact in bf16 for the dot path), ``b`` is applied to the
x slice in the kernel and ``a`` once to the float32 accumulator in the epilogue. Same tiling
(:class:`BlockSizes` of :mod:`quant_matmul`): grid ``(M / block_m, Np / block_n, split_k)``;
``block_m < 16``: FMA (GEMV) path ``acc += select(bit, xb, -xb)`` into a ``(16, block_n)`` float32
accumulator per row; ``block_m >= 16``: bf16 ``jnp.dot`` with float32 accumulation; ``split_k > 1``
writes float32 partials reduced by XLA. Power-of-two tiles, no gathers/reshapes, masked ragged edges.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _compat
from .layout import KernelWeight, dequantize_reference, iter_block_pieces, rows_of
from .quant_matmul import BlockSizes, resolve_block_sizes

__all__ = ["BlockSizes", "onebit_matmul", "onebit_matmul_reference", "can_use", "check"]


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def check(x_shape, x_dtype, w, *, block_sizes: BlockSizes | None = None, backend: str | None = None,
          interpret: bool = False) -> str | None:
    """Why :func:`onebit_matmul` cannot run these operands (``None`` when it can); ``backend="any"``
    skips the platform check."""
    if not isinstance(w, KernelWeight):
        return f"w: expected a KernelWeight, got {type(w).__name__}"
    if not interpret and backend != "any":
        backend = backend or _compat.default_backend()
        if backend != "gpu":
            return f"backend {backend!r}: the Triton kernel needs a GPU (or interpret=True)"
    if len(x_shape) < 1 or x_shape[-1] != w.k:
        return f"x: last axis {x_shape[-1] if x_shape else None} does not match in_features {w.k}"
    if jnp.dtype(x_dtype) != jnp.bfloat16:
        return f"x: dtype {jnp.dtype(x_dtype)} (the kernel takes bfloat16 activations)"
    if w.bits != 1 or w.format != "sign" or w.group_size is not None:
        return (f"bits={w.bits}, format={w.format!r}, group_size={w.group_size}: OneBit needs 1-bit"
                " 'sign' weights with one scale per output channel")
    if not _is_pow2(w.tile_rows) or w.tile_rows < 16:
        return f"tile_rows={w.tile_rows}: must be a power of two >= 16"
    if block_sizes is not None:
        bs = block_sizes
        if not (_is_pow2(bs.block_m) and _is_pow2(bs.block_n) and bs.block_n >= 16):
            return f"block_m={bs.block_m}, block_n={bs.block_n}: powers of two (block_n >= 16) expected"
        if bs.block_k % w.pack_block:
            return f"block_k={bs.block_k} must be a multiple of the pack block {w.pack_block}"
    return None


def can_use(x, w, *, block_sizes: BlockSizes | None = None, backend: str | None = None,
            interpret: bool = False) -> bool:
    """Whether :func:`onebit_matmul` supports ``x`` / ``w`` here (backend, shapes, dtypes, bits)."""
    return check(x.shape, x.dtype, w, block_sizes=block_sizes, backend=backend, interpret=interpret) is None


@dataclasses.dataclass(frozen=True)
class _Cfg:
    m: int
    k: int
    n: int
    bm: int
    bn: int
    unroll: int
    n_iter: int
    k_slice: int
    tile_rows: int
    pack_blk: int
    has_col: bool
    partial: bool
    mask_m: bool
    mask_k: bool
    mask_n: bool


def _kernel(*refs, cfg: _Cfg):
    if cfg.has_col:
        x_ref, w_ref, a_ref, b_ref, o_ref = refs
    else:
        (x_ref, w_ref, a_ref, o_ref), b_ref = refs, None
    pid_m, pid_n, pid_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row0 = pid_m * cfg.bm
    k_start = pid_s * cfg.k_slice
    p = cfg.tile_rows
    fma = cfg.bm < 16
    rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (cfg.bm, 1), 0)

    def load_x(ref, shape, rowmask, kmask):
        if not (cfg.mask_m or cfg.mask_k):
            return ref[...]
        mask = jnp.ones(shape, jnp.bool_)
        if cfg.mask_m:
            mask = mask & rowmask
        if cfg.mask_k:
            mask = mask & kmask
        return _compat.masked_load(ref, mask, 0)

    def one_block(b_local, acc):
        k0_local = b_local * cfg.pack_blk
        k0 = k_start + k0_local

        def load(plane, r, nrows):
            return w_ref[pl.ds(b_local * cfg.tile_rows + r, nrows), :]

        for k_off, bit in iter_block_pieces(load, 1, cfg.tile_rows, p):
            kk = k0_local + k_off
            kmask = k0 + k_off + jax.lax.broadcasted_iota(jnp.int32, (p,), 0) < cfg.k
            bv = b_ref[0, pl.ds(kk, p)].astype(jnp.float32) if cfg.has_col else None
            pos = bit != 0
            if fma:
                new = []
                for mi in range(cfg.bm):
                    xv = load_x(x_ref.at[jnp.int32(mi), pl.ds(kk, p)], (p,), row0 + mi < cfg.m, kmask)
                    xv = xv.astype(jnp.float32)
                    if bv is not None:
                        xv = xv * bv
                    xb = jnp.broadcast_to(xv[:, None], (p, cfg.bn))
                    new.append(acc[mi] + jnp.where(pos, xb, -xb))
                acc = tuple(new)
            else:
                xt = load_x(x_ref.at[:, pl.ds(kk, p)], (cfg.bm, p), rows < cfg.m, kmask[None, :])
                if bv is not None:
                    xt = (xt.astype(jnp.float32) * bv[None, :]).astype(x_ref.dtype)
                signs = jnp.where(pos, 1.0, -1.0).astype(x_ref.dtype)
                acc = acc + jnp.dot(xt, signs, preferred_element_type=jnp.float32)
        return acc

    def body(it, acc):
        for u in range(cfg.unroll):
            acc = one_block(it * cfg.unroll + u, acc)
        return acc

    if fma:
        acc0 = tuple(jnp.zeros((p, cfg.bn), jnp.float32) for _ in range(cfg.bm))
    else:
        acc0 = jnp.zeros((cfg.bm, cfg.bn), jnp.float32)
    acc = jax.lax.fori_loop(0, cfg.n_iter, body, acc0)

    a = a_ref[0, :].astype(jnp.float32)  # (bn,)
    cols = pid_n * cfg.bn + jax.lax.broadcasted_iota(jnp.int32, (cfg.bn,), 0)
    if fma:
        for mi in range(cfg.bm):
            y = (jnp.sum(acc[mi], axis=0) * a).astype(o_ref.dtype)
            ref = o_ref.at[jnp.int32(mi), :]
            if cfg.mask_m or cfg.mask_n:
                mask = (cols < cfg.n) if cfg.mask_n else jnp.ones((cfg.bn,), jnp.bool_)
                if cfg.mask_m:
                    mask = mask & (row0 + mi < cfg.m)
                _compat.masked_store(ref, y, mask)
            else:
                _compat.masked_store(ref, y)
    else:
        y = (acc * a[None, :]).astype(o_ref.dtype)
        if cfg.mask_m or cfg.mask_n:
            mask = jnp.broadcast_to((rows < cfg.m) if cfg.mask_m else True, (cfg.bm, cfg.bn))
            if cfg.mask_n:
                mask = mask & (cols < cfg.n)[None, :]
            _compat.masked_store(o_ref, y, mask)
        else:
            _compat.masked_store(o_ref, y)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def onebit_matmul(x, w: KernelWeight, *, block_sizes: BlockSizes | None = None, interpret: bool = False):
    """``((x * b) @ sign(W)^T) * a`` for ``x (..., K)`` in bfloat16 -> ``(..., N)``."""
    why = check(x.shape, x.dtype, w, block_sizes=block_sizes, backend="any")
    if why:
        raise ValueError(f"onebit_matmul: {why}")
    lead, x2 = rows_of(x, w)
    m = x2.shape[0]
    if m == 0:
        return jnp.zeros((*lead, w.n), x.dtype)
    bs = resolve_block_sizes(m, w, block_sizes)
    bm, bn, split = bs.block_m, bs.block_n, bs.split_k
    k_slice = w.k_pad // split
    cfg = _Cfg(m=m, k=w.k, n=w.n, bm=bm, bn=bn, unroll=bs.block_k // w.pack_block,
               n_iter=k_slice // bs.block_k, k_slice=k_slice, tile_rows=w.tile_rows, pack_blk=w.pack_block,
               has_col=w.col_scale is not None, partial=split > 1, mask_m=m % bm != 0,
               mask_k=w.k != w.k_pad, mask_n=w.n % bn != 0)
    in_specs = [pl.BlockSpec((bm, k_slice), lambda i, j, s: (i, s)),
                pl.BlockSpec((k_slice // w.pack_block * w.tile_rows, bn), lambda i, j, s: (s, j)),
                pl.BlockSpec((1, bn), lambda i, j, s: (0, j))]
    operands = [x2, w.planes[0], w.scales]
    if w.col_scale is not None:
        in_specs.append(pl.BlockSpec((1, k_slice), lambda i, j, s: (0, s)))
        operands.append(w.col_scale)
    if split > 1:
        out_shape = jax.ShapeDtypeStruct((split, m, w.n), jnp.float32)
        out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((m, w.n), x.dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    y = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        out_shape=out_shape,
        grid=(pl.cdiv(m, bm), pl.cdiv(w.n, bn), split),  # no N tile past w.n
        in_specs=in_specs,
        out_specs=out_spec,
        compiler_params=_compat.triton_params(bs.num_warps, bs.num_stages),
        interpret=interpret,
        name="onebit_matmul",
    )(*operands)
    if split > 1:
        y = jnp.sum(y, axis=0).astype(x.dtype)
    return y.reshape(*lead, w.n)


@functools.partial(jax.jit, static_argnames="out_dtype")
def onebit_matmul_reference(x, w: KernelWeight, out_dtype=None):
    """Pure-jnp ``((x * b) @ sign(W)^T) * a`` from the same operands (float32 math)."""
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if w.perm is not None:
        x2 = jnp.take(x2, w.perm, axis=1)
    plain = dataclasses.replace(w, scales=jnp.ones_like(w.scales), col_scale=None, perm=None)
    signs = dequantize_reference(plain)[: w.k, : w.n]               # +-1
    if w.col_scale is not None:
        x2 = x2 * w.col_scale.astype(jnp.float32)[0, : w.k]
    y = jnp.dot(x2, signs, precision=jax.lax.Precision.HIGHEST) * w.scales.astype(jnp.float32)[0, : w.n]
    return y.reshape(*x.shape[:-1], w.n).astype(out_dtype or x.dtype)
