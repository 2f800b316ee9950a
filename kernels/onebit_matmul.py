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

from ._common import GridCfg, operand_rows, triton_call, check_operands, check_triton_tiles, k_loop, store_tile, x_loaders
from .layout import KernelWeight, dequantize_reference, iter_block_pieces
from .quant_matmul import BlockSizes, resolve_block_sizes

__all__ = ["BlockSizes", "onebit_matmul", "onebit_matmul_reference", "can_use", "check"]


def check(x_shape, x_dtype, w, *, block_sizes: BlockSizes | None = None, backend: str | None = None,
          interpret: bool = False) -> str | None:
    """Why :func:`onebit_matmul` cannot run these operands (``None`` when it can); ``backend="any"``
    skips the platform check."""
    why = check_operands(x_shape, x_dtype, w, platform="gpu", what="Triton", backend=backend, interpret=interpret)
    if why:
        return why
    if w.bits != 1 or w.format != "sign" or w.group_size is not None:
        return (f"bits={w.bits}, format={w.format!r}, group_size={w.group_size}: OneBit needs 1-bit"
                " 'sign' weights with one scale per output channel")
    return check_triton_tiles(w, block_sizes)


def can_use(x, w, *, block_sizes: BlockSizes | None = None, backend: str | None = None,
            interpret: bool = False) -> bool:
    """Whether :func:`onebit_matmul` supports ``x`` / ``w`` here (backend, shapes, dtypes, bits)."""
    return check(x.shape, x.dtype, w, block_sizes=block_sizes, backend=backend, interpret=interpret) is None


@dataclasses.dataclass(frozen=True)
class _Cfg(GridCfg):
    tile_rows: int
    pack_blk: int
    has_col: bool


def _kernel(*refs, cfg: _Cfg):
    if cfg.has_col:
        x_ref, w_ref, a_ref, b_ref, o_ref = refs
    else:
        (x_ref, w_ref, a_ref, o_ref), b_ref = refs, None
    k_start = pl.program_id(2) * cfg.k_slice
    p = cfg.tile_rows
    fma = cfg.bm < 16
    x_tile, x_row = x_loaders(x_ref, cfg, p)

    def one_block(b_local, acc):
        k0_local = b_local * cfg.pack_blk
        k0 = k_start + k0_local

        def load(plane, r, nrows):
            return w_ref[pl.ds(b_local * cfg.tile_rows + r, nrows), :]

        for k_off, bit in iter_block_pieces(load, 1, cfg.tile_rows, p):
            kk = k0_local + k_off
            kmask = (k0 + k_off + jax.lax.broadcasted_iota(jnp.int32, (p,), 0) < cfg.k) if cfg.mask_k else None
            bv = b_ref[0, pl.ds(kk, p)].astype(jnp.float32) if cfg.has_col else None
            pos = bit != 0
            if fma:  # +-x selected by the sign bit: no multiply
                new = []
                for mi in range(cfg.bm):
                    xv = x_row(mi, kk, kmask).astype(jnp.float32)
                    if bv is not None:
                        xv = xv * bv
                    xb = jnp.broadcast_to(xv[:, None], (p, cfg.bn))
                    new.append(acc[mi] + jnp.where(pos, xb, -xb))
                acc = tuple(new)
            else:
                xt = x_tile(kk, kmask)
                if bv is not None:
                    xt = (xt.astype(jnp.float32) * bv[None, :]).astype(x_ref.dtype)
                signs = jnp.where(pos, 1.0, -1.0).astype(x_ref.dtype)
                acc = acc + jnp.dot(xt, signs, preferred_element_type=jnp.float32)
        return acc

    store_tile(o_ref, k_loop(cfg, one_block, p), cfg, col_scale=a_ref[0, :].astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def onebit_matmul(x, w: KernelWeight, *, block_sizes: BlockSizes | None = None, interpret: bool = False):
    """``((x * b) @ sign(W)^T) * a`` for ``x (..., K)`` in bfloat16 -> ``(..., N)``."""
    lead, x2 = operand_rows("onebit_matmul", check(x.shape, x.dtype, w, block_sizes=block_sizes, backend="any"), x, w)
    m = x2.shape[0]
    if m == 0:
        return jnp.zeros((*lead, w.n), x.dtype)
    bs = resolve_block_sizes(m, w, block_sizes)
    bm, bn, split = bs.block_m, bs.block_n, bs.split_k
    cfg = _Cfg(**GridCfg.fields(m, w, bs), tile_rows=w.tile_rows, pack_blk=w.pack_block,
               has_col=w.col_scale is not None)
    k_slice = cfg.k_slice
    in_specs = [pl.BlockSpec((bm, k_slice), lambda i, j, s: (i, s)),
                pl.BlockSpec((k_slice // w.pack_block * w.tile_rows, bn), lambda i, j, s: (s, j)),
                pl.BlockSpec((1, bn), lambda i, j, s: (0, j))]
    operands = [x2, w.planes[0], w.scales]
    if w.col_scale is not None:
        in_specs.append(pl.BlockSpec((1, k_slice), lambda i, j, s: (0, s)))
        operands.append(w.col_scale)
    y = triton_call(_kernel, cfg, operands, in_specs, split=split, bs=bs, out_dtype=x.dtype,
                    interpret=interpret, name="onebit_matmul")
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
