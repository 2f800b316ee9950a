"""Pallas TPU (Mosaic lowering) kernel: ``y[M, N] = x[M, K] @ W`` with W packed at 1/2/3/4/8 bits.

Consumes the same :class:`~lowbit.kernels.layout.KernelWeight` "blocked planes" layout as the GPU
kernel (``kernels/layout.py``): int32 word planes ``(Kp * b / 32, Np)``, K-major; a ``(16, BN)`` word
tile shifted by ``j * b`` is the code tile of 16 consecutive K rows (3 bits: a 2-bit plus a 1-bit
plane). Scales / integer zeros are ``(G, Np)`` rows (float32 preferred: the wrapper casts others),
formats ``"int"``, ``"table"`` (<= 16 levels, select tree) and ``"sign"`` (lowbit sign and OneBit,
with ``col_scale`` applied to the x tile).

Design: the classic Mosaic matmul with a dequantizing prologue. Grid ``(M / bm, Np / bn, Kp / bk)``,
K innermost and ``"arbitrary"`` (M, N ``"parallel"``); a float32 VMEM scratch accumulator is zeroed at
``k == 0`` and written out at the last ``k``. Per grid step the ``(bk * b / 32, bn)`` word block is
unpacked piece by piece (static, 16-row aligned slices; shift, mask, float trick, zero, scale) into
a bf16 ``(bk, bn)`` VMEM scratch, then one ``jnp.dot(x_tile, w_tile, preferred_element_type=f32)``
feeds the MXU. Mosaic constraints: every block's last two dims are multiples of (8, 128) or the full
array dims (``bm = M`` for M <= 128; word rows are multiples of 16; scale blocks have ``bk / g``
rows, a multiple of 8, or the whole (G, bn) column stripe); all in-kernel slices are static and
16-row aligned; no gathers or reshapes. x is zero-padded in the wrapper when M or K is ragged.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import compat
from ._common import WeightCfg, operand_rows, check_codes, check_operands
from .layout import (KernelWeight, decode, dequantize_reference, iter_block_pieces, split_refs,
                     plane_rows)

__all__ = ["BlockSizes", "quant_matmul_tpu", "quant_matmul_tpu_reference", "can_use", "check",
           "resolve_block_sizes"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of :func:`quant_matmul_tpu` (0 = choose automatically).

    Attributes:
      block_m: rows of x per step; ``M`` itself when ``M <= 128`` (full-dim block), else a multiple of 16.
      block_n: output columns per step, a multiple of 128 dividing the padded N.
      block_k: K rows per step, a multiple of the pack block and of 128 dividing the padded K.
    """

    block_m: int = 0
    block_n: int = 0
    block_k: int = 0


def _divisors_desc(n: int, unit: int, cap: int):
    v = (min(n, cap) // unit) * unit
    while v >= unit:
        if n % v == 0:
            yield v
        v -= unit


def resolve_block_sizes(m: int, w: KernelWeight, bs: BlockSizes | None = None) -> tuple[BlockSizes, str]:
    """Concrete block sizes and the scale-block mode: ``"channel"`` (one scale row), ``"blocked"``
    (``(bk / g, bn)`` scale blocks, static rows), ``"stripe1"`` (whole stripe, one K step, static
    rows) or ``"stripe"`` (whole ``(G, bn)`` stripe, rows indexed dynamically)."""
    bs = bs or BlockSizes()
    bm = bs.block_m or (256 if m >= 1024 else 128)
    if m <= bm:
        bm = m  # a full-dim block: no padding of x, any M
    bn = math.gcd(bs.block_n or (256 if m > 8 else 128), w.n_pad)
    kp, pb, g = w.k_pad, w.pack_block, w.group_size

    def mode_for(bk):
        if g is None:
            return "channel"
        if bk % g == 0 and (bk // g) % 8 == 0:
            return "blocked"
        return "stripe1" if bk == kp else "stripe"

    if bs.block_k:
        bk = bs.block_k
    else:
        unit = pb * 128 // math.gcd(pb, 128)
        cands = list(_divisors_desc(kp, unit, max(1024, 8 * (g or 0))))
        blocked = [c for c in cands if mode_for(c) == "blocked"]
        bk = blocked[0] if blocked else (cands[0] if cands else kp)
    return BlockSizes(block_m=bm, block_n=bn, block_k=bk), mode_for(bk)


def check(x_shape, x_dtype, w, *, block_sizes: BlockSizes | None = None, backend: str | None = None,
          interpret: bool = False) -> str | None:
    """Why :func:`quant_matmul_tpu` cannot run these operands (``None`` when it can); ``backend="any"``
    skips the platform check."""
    why = (check_operands(x_shape, x_dtype, w, platform="tpu", what="Mosaic", backend=backend, interpret=interpret)
           or check_codes(w))
    if why:
        return why
    if w.tile_rows % 16:
        return f"tile_rows={w.tile_rows}: must be a multiple of 16"
    if w.n_pad % 128:
        return f"padded N={w.n_pad} must be a multiple of 128"
    m = math.prod(x_shape[:-1])
    if block_sizes is not None:
        b = block_sizes
        if b.block_k and (w.k_pad % b.block_k or b.block_k % w.pack_block
                          or (b.block_k % 128 and b.block_k != w.k_pad)):
            return (f"block_k={b.block_k}: must divide the padded K={w.k_pad}, be a multiple of the pack"
                    f" block {w.pack_block} and of 128 (or equal K)")
        if b.block_n and b.block_n % 128:
            return f"block_n={b.block_n}: must be a multiple of 128"
        if b.block_m and b.block_m < m and b.block_m % 16:
            return f"block_m={b.block_m}: must be a multiple of 16 (or >= M)"
    bs, _ = resolve_block_sizes(m, w, block_sizes)
    vmem = (2 * bs.block_m * bs.block_k * 2 + bs.block_k * bs.block_n * 2 + bs.block_m * bs.block_n * 4
            + 2 * bs.block_k * w.bits * bs.block_n // 8)
    if vmem > 24 * 2**20:
        return f"tiles {bs} need ~{vmem >> 20} MiB of VMEM"
    return None


def can_use(x, w, *, block_sizes: BlockSizes | None = None, backend: str | None = None,
            interpret: bool = False) -> bool:
    """Whether :func:`quant_matmul_tpu` supports ``x`` / ``w`` here (backend, shapes, dtypes, bits)."""
    return check(x.shape, x.dtype, w, block_sizes=block_sizes, backend=backend, interpret=interpret) is None


@dataclasses.dataclass(frozen=True)
class _Cfg(WeightCfg):
    bk: int
    n_k: int
    scale_mode: str


def _kernel(*refs, cfg: _Cfg):
    x_ref, planes, s_ref, z_ref, c_ref, rest = split_refs(refs, cfg.n_planes, cfg.has_zeros, cfg.has_col)
    o_ref, acc_ref, w_scr = rest
    kid = pl.program_id(2)
    prow = plane_rows(cfg.bits, cfg.tile_rows)
    p = cfg.piece

    @pl.when(kid == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    cache = {}

    def scale_rows(row_in_tile):
        if cfg.scale_mode == "channel":
            key = 0
        elif cfg.scale_mode in ("blocked", "stripe1"):
            key = row_in_tile // cfg.group_size
        elif cfg.bk % cfg.group_size == 0:  # whole (G, bn) stripe, dynamic row, group-aligned tiles
            key = row_in_tile // cfg.group_size
        else:
            key = ("row", row_in_tile)
        if key not in cache:
            if cfg.scale_mode != "stripe":
                r = key
            elif cfg.bk % cfg.group_size == 0:
                r = kid * (cfg.bk // cfg.group_size) + key
            else:
                r = (kid * cfg.bk + row_in_tile) // cfg.group_size
            sc = s_ref[pl.ds(r, 1), :].astype(jnp.float32)
            zr = z_ref[pl.ds(r, 1), :].astype(jnp.float32) if cfg.has_zeros else None
            cache[key] = (sc, zr)
        return cache[key]

    for blk in range(cfg.bk // cfg.pack_blk):
        def load(plane, r, nrows, blk=blk):
            start = blk * prow[plane] + r
            return planes[plane][start:start + nrows, :]

        for k_off, codes in iter_block_pieces(load, cfg.bits, cfg.tile_rows, p):
            row = blk * cfg.pack_blk + k_off
            sc, zr = scale_rows(row)
            w = decode(codes, cfg.fmt, sc, zr, zero_point=cfg.zero_point, levels=cfg.levels)
            w_scr[row:row + p, :] = w.astype(w_scr.dtype)

    xt = x_ref[...]
    if cfg.has_col:
        xt = (xt.astype(jnp.float32) * c_ref[...].astype(jnp.float32)).astype(x_ref.dtype)
    acc_ref[...] += jnp.dot(xt, w_scr[...], preferred_element_type=jnp.float32)

    @pl.when(kid == cfg.n_k - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def quant_matmul_tpu(x, w: KernelWeight, *, block_sizes: BlockSizes | None = None, interpret: bool = False):
    """``x (..., K) @ W -> (..., N)`` in ``x.dtype`` (bfloat16) on TPU; ``interpret=True`` runs the
    TPU interpreter (``pltpu.InterpretParams`` when available) on any backend."""
    lead, x2 = operand_rows("quant_matmul_tpu", check(x.shape, x.dtype, w, block_sizes=block_sizes, backend="any"), x, w)
    m = x2.shape[0]
    if m == 0:
        return jnp.zeros((*lead, w.n), x.dtype)
    bs, mode = resolve_block_sizes(m, w, block_sizes)
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    mp = -(-m // bm) * bm
    if mp != m or w.k_pad != w.k:
        x2 = jnp.pad(x2, ((0, mp - m), (0, w.k_pad - w.k)))
    n_k = w.k_pad // bk
    cfg = _Cfg(**WeightCfg.fields(w), bk=bk, n_k=n_k, scale_mode=mode)

    def f32(a):
        return a if a.dtype == jnp.float32 else a.astype(jnp.float32)

    in_specs = [pl.BlockSpec((bm, bk), lambda i, j, k: (i, k))]
    operands = [x2]
    for pw, rows in zip(w.planes, plane_rows(w.bits, w.tile_rows)):
        in_specs.append(pl.BlockSpec((bk // w.pack_block * rows, bn), lambda i, j, k: (k, j)))
        operands.append(pw)
    if mode == "blocked":
        srows = bk // w.group_size
        sspec = pl.BlockSpec((srows, bn), lambda i, j, k: (k, j))
    else:
        srows = w.scales.shape[0]
        sspec = pl.BlockSpec((srows, bn), lambda i, j, k: (0, j))
    in_specs.append(sspec)
    operands.append(f32(w.scales))
    if w.zeros is not None:
        in_specs.append(sspec)
        operands.append(f32(w.zeros))
    if w.col_scale is not None:
        in_specs.append(pl.BlockSpec((1, bk), lambda i, j, k: (0, k)))
        operands.append(f32(w.col_scale))
    y = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        out_shape=jax.ShapeDtypeStruct((mp, w.n_pad), x.dtype),
        grid=(mp // bm, w.n_pad // bn, n_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        scratch_shapes=[compat.tpu_vmem((bm, bn), jnp.float32), compat.tpu_vmem((bk, bn), jnp.bfloat16)],
        compiler_params=compat.tpu_params(("parallel", "parallel", "arbitrary")),
        interpret=compat.tpu_interpret_params() if interpret else False,
        name=f"quant_matmul_tpu_w{w.bits}_{w.format}",
    )(*operands)
    return y[:m, : w.n].reshape(*lead, w.n)


@functools.partial(jax.jit, static_argnames="out_dtype")
def quant_matmul_tpu_reference(x, w: KernelWeight, out_dtype=None):
    """Pure-jnp ``x @ W`` from the same operands (float32 math; any backend)."""
    x2 = x.reshape(-1, x.shape[-1])
    if w.perm is not None:
        x2 = jnp.take(x2, w.perm, axis=1)
    y = jnp.dot(x2.astype(jnp.float32), dequantize_reference(w)[: w.k, : w.n], precision=jax.lax.Precision.HIGHEST)
    return y.reshape(*x.shape[:-1], w.n).astype(out_dtype or x.dtype)
