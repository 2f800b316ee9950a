"""Pallas GPU (Triton lowering) kernel: ``y[M, N] = x[M, K] @ W`` with W packed at 1/2/3/4/8 bits.

Consumes a :class:`~lowbit.kernels.layout.KernelWeight` (the "blocked planes" layout documented in
``kernels/layout.py``): int32 word planes ``(Kp * b / 32, Np)``, K-major, where one ``(R, BN)``
word tile (``R = tile_rows = 16``) shifted by ``j * b`` is the ``(R, BN)`` code tile of R consecutive
K rows; 3-bit weights are a 2-bit plane plus a 1-bit plane (no code spans a word). Scales (and
integer zero points) are ``(G, Np)`` rows per group of K rows, or one row (per channel). Formats:
``"int"`` ((code - zero) * scale), ``"table"`` (NF4 / FP4 / codebooks up to 16 levels, an in-kernel
select tree on the code bits instead of a gather) and ``"sign"`` (+-scale).

Design (one program = one ``(block_m, block_n)`` output tile and one K slice):

* grid ``(M / block_m, Np / block_n, split_k)``, M fastest so that programs that read the same
  weight tile run together (L2 reuse at large M). A ``lax.fori_loop`` walks the K slice, ``block_k``
  rows (``block_k / PB`` pack blocks, unrolled) per iteration; Triton software-pipelines the loads
  (``num_stages``). Each pack block is unpacked piece by piece: load a ``(16, block_n)`` word tile
  once (16 rows x block_n int32: 128-bit vector loads along N), then per shift ``j`` extract the
  codes with a shift and a mask, convert with the ``(c | 0x4B000000) - 2**23`` float trick (an OR
  and a SUB, no int->float instruction), subtract the zero and multiply by the group's scale row
  (pieces never straddle a group; scale rows are loaded once per group and block).
* small M (``block_m < 16``, decode with M = 1, 2, ...): "GEMV" path without tensor cores: per row
  of x an elementwise FMA into a ``(16, block_n)`` float32 accumulator, reduced over its 16 rows once
  at the end (no cross-thread reduction in the loop). ``split_k > 1`` splits K over extra programs
  (small N would otherwise leave most SMs idle at M = 1): each writes a float32 partial sum
  ``(split_k, M, N)`` that one fused XLA reduction adds up.
* larger M (``block_m >= 16``, power of two): each piece is dequantized to bf16 and meets the
  ``(block_m, 16)`` slice of x in ``jnp.dot(..., preferred_element_type=f32)`` (tensor cores, float32
  accumulation). M = 3..16 uses ``block_m = 16`` with masked rows.

Triton constraints respected: every loaded/stored tile has power-of-two dims (block_m, block_n and
the 16-row pieces; block shapes of refs may be arbitrary), dots are 2-D bf16 x bf16 -> f32 with all
dims >= 16, no gathers, no reshapes or concatenations, no value slicing (only ref slicing). Ragged
M, K and N are handled with masked loads/stores (``other=0``) instead of padding x or y; the
weight itself is padded once at conversion (K to a pack block, N to 128).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._common import GridCfg, WeightCfg, operand_rows, triton_call, check_codes, check_operands, check_triton_tiles, is_pow2 as _is_pow2, k_loop, store_tile, x_loaders
from .layout import (KernelWeight, decode, group_row_fn, iter_block_pieces, split_refs, dequantize_reference,
                     plane_rows)

__all__ = ["BlockSizes", "quant_matmul", "quant_matmul_reference", "can_use", "check", "resolve_block_sizes"]

TARGET_PROGRAMS = 264  # ~2 programs per SM on an H100 (132 SMs): what split-K aims for


def _pow2_floor(v: int) -> int:
    return 1 << (max(int(v), 1).bit_length() - 1)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of :func:`quant_matmul`.

    Attributes:
      block_m: rows of x per program (power of two). ``< 16``: FMA (GEMV) path; ``>= 16``: dot path.
      block_n: output columns per program (power of two, >= 16).
      block_k: K rows per loop iteration, a multiple of the pack block (0 = ~512 K rows).
      split_k: K slices (extra programs, float32 partial sums reduced in XLA).
      num_warps, num_stages: Triton launch / software pipelining parameters.
    """

    block_m: int = 16
    block_n: int = 128
    block_k: int = 0
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def get_default(cls, m: int, w: KernelWeight) -> "BlockSizes":
        """Heuristic defaults (the benchmark autotunes around them)."""
        if m <= 2:
            bm, bn, warps, stages = _pow2_floor(m) if _is_pow2(m) else 2, 128, 4, 3
        elif m <= 16:
            bm, bn, warps, stages = 16, 128, 4, 3
        elif m <= 64:
            bm, bn, warps, stages = _pow2_floor(m) if _is_pow2(m) else min(64, 2 * _pow2_floor(m)), 128, 4, 3
        else:
            bm, bn, warps, stages = (64, 128, 4, 3) if m <= 128 else (128, 128, 8, 3)
        split = default_split_k(m, w, bm, bn)
        return cls(block_m=bm, block_n=bn, block_k=0, split_k=split, num_warps=warps, num_stages=stages)


def default_split_k(m: int, w: KernelWeight, block_m: int, block_n: int) -> int:
    """K slices that bring the program count near :data:`TARGET_PROGRAMS` (16 at most), bounded so
    that the float32 partial sums (written and read back: ``8 * split * M * N`` bytes) stay under a
    quarter of the packed weight bytes ``K * N * bits / 8``."""
    programs = -(-m // block_m) * -(-w.n // block_n)
    if programs >= TARGET_PROGRAMS:
        return 1
    by_occupancy = TARGET_PROGRAMS // programs
    by_traffic = (w.k * w.bits) // (256 * m)
    return max(1, _pow2_floor(max(1, min(16, by_occupancy, by_traffic))))


def _largest_divisor_leq(n: int, cap: int) -> int:
    for d in range(max(1, min(n, cap)), 0, -1):
        if n % d == 0:
            return d
    return 1


def resolve_block_sizes(m: int, w: KernelWeight, bs: BlockSizes | None) -> BlockSizes:
    """Adapt ``bs`` to the operand shapes: block_n divides Np, split_k divides the pack blocks,
    block_k divides the slice. The result is what the kernel runs with."""
    bs = BlockSizes.get_default(m, w) if bs is None else bs
    pb = w.pack_block
    bn = math.gcd(bs.block_n, w.n_pad)
    split = _largest_divisor_leq(w.n_blocks, max(1, bs.split_k))
    per_slice = w.n_blocks // split
    want = bs.block_k // pb if bs.block_k else max(1, 512 // pb)
    unroll = _largest_divisor_leq(per_slice, want)
    return dataclasses.replace(bs, block_n=bn, split_k=split, block_k=unroll * pb)


def check(x_shape, x_dtype, w, *, block_sizes: BlockSizes | None = None, backend: str | None = None,
          interpret: bool = False) -> str | None:
    """Why :func:`quant_matmul` cannot run these operands (``None`` when it can).

    ``backend``: the platform to run on (default: jax's default backend); ``"any"`` skips the check
    (the wrapper itself does, so that it can be lowered for another platform, e.g. by jax.export).
    """
    why = (check_operands(x_shape, x_dtype, w, platform="gpu", what="Triton", backend=backend, interpret=interpret)
           or check_codes(w) or check_triton_tiles(w, block_sizes))
    if why:
        return why
    if w.n_pad % 16 or w.k_pad % w.pack_block:
        return f"padded weight {w.k_pad}x{w.n_pad} is not aligned to ({w.pack_block}, 16)"
    return None


def can_use(x, w, *, block_sizes: BlockSizes | None = None, backend: str | None = None,
            interpret: bool = False) -> bool:
    """Whether :func:`quant_matmul` supports ``x`` / ``w`` here (backend, shapes, dtypes, bits)."""
    return check(x.shape, x.dtype, w, block_sizes=block_sizes, backend=backend, interpret=interpret) is None


@dataclasses.dataclass(frozen=True)
class _Cfg(GridCfg, WeightCfg):  # everything static the kernel body needs
    pass


def _kernel(*refs, cfg: _Cfg):
    x_ref, planes, s_ref, z_ref, c_ref, rest = split_refs(refs, cfg.n_planes, cfg.has_zeros, cfg.has_col)
    (o_ref,) = rest

    k_start = pl.program_id(2) * cfg.k_slice
    prow = plane_rows(cfg.bits, cfg.tile_rows)
    group_row = group_row_fn(cfg.group_size, cfg.pack_blk)
    p = cfg.piece
    fma = cfg.bm < 16
    x_tile, x_row = x_loaders(x_ref, cfg, p)

    def one_block(b_local, acc):
        k0_local = b_local * cfg.pack_blk  # column offset in the x block
        k0 = k_start + k0_local            # global K row of the block
        cache = {}

        def load(plane, r, nrows):
            return planes[plane][pl.ds(b_local * prow[plane] + r, nrows), :]

        for k_off, codes in iter_block_pieces(load, cfg.bits, cfg.tile_rows, p):
            key, grow = group_row(k0, k_off)
            if key not in cache:
                sc = s_ref[pl.ds(grow, 1), :].astype(jnp.float32)
                zr = z_ref[pl.ds(grow, 1), :].astype(jnp.float32) if cfg.has_zeros else None
                cache[key] = (sc, zr)
            sc, zr = cache[key]
            w = decode(codes, cfg.fmt, sc, zr, zero_point=cfg.zero_point, levels=cfg.levels)  # (p, bn) f32
            kk = k0_local + k_off
            kmask = (k0 + k_off + jax.lax.broadcasted_iota(jnp.int32, (p,), 0) < cfg.k) if cfg.mask_k else None
            cs = c_ref[0, pl.ds(kk, p)].astype(jnp.float32) if cfg.has_col else None
            if fma:
                new = []
                for mi in range(cfg.bm):
                    xv = x_row(mi, kk, kmask).astype(jnp.float32)
                    if cs is not None:
                        xv = xv * cs
                    new.append(acc[mi] + xv[:, None] * w)
                acc = tuple(new)
            else:
                xt = x_tile(kk, kmask)
                if cs is not None:
                    xt = (xt.astype(jnp.float32) * cs[None, :]).astype(x_ref.dtype)
                acc = acc + jnp.dot(xt, w.astype(x_ref.dtype), preferred_element_type=jnp.float32)
        return acc

    # the split-K axis of a partial output is squeezed by its BlockSpec: o_ref is (bm, bn)
    store_tile(o_ref, k_loop(cfg, one_block, p), cfg)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def quant_matmul(x, w: KernelWeight, *, block_sizes: BlockSizes | None = None, interpret: bool = False):
    """``x (..., K) @ W -> (..., N)`` in ``x.dtype`` (bfloat16) for a :class:`KernelWeight` ``w``.

    ``block_sizes`` is adapted to the shapes by :func:`resolve_block_sizes`; ``interpret=True`` runs
    the Pallas interpreter (CPU). Raises ``ValueError`` with the reason when :func:`check` fails.
    """
    lead, x2 = operand_rows("quant_matmul", check(x.shape, x.dtype, w, block_sizes=block_sizes, backend="any"), x, w)
    m = x2.shape[0]
    if m == 0:
        return jnp.zeros((*lead, w.n), x.dtype)
    bs = resolve_block_sizes(m, w, block_sizes)
    bm, bn, split = bs.block_m, bs.block_n, bs.split_k
    cfg = _Cfg(**GridCfg.fields(m, w, bs), **WeightCfg.fields(w))
    k_slice = cfg.k_slice

    in_specs = [pl.BlockSpec((bm, k_slice), lambda i, j, s: (i, s))]
    operands = [x2]
    for pw, rows in zip(w.planes, plane_rows(w.bits, w.tile_rows)):
        in_specs.append(pl.BlockSpec((k_slice // w.pack_block * rows, bn), lambda i, j, s: (s, j)))
        operands.append(pw)
    g_rows = w.scales.shape[0]  # whole K extent: a program indexes the rows of its slice
    in_specs.append(pl.BlockSpec((g_rows, bn), lambda i, j, s: (0, j)))
    operands.append(w.scales)
    if w.zeros is not None:
        in_specs.append(pl.BlockSpec((g_rows, bn), lambda i, j, s: (0, j)))
        operands.append(w.zeros)
    if w.col_scale is not None:
        in_specs.append(pl.BlockSpec((1, k_slice), lambda i, j, s: (0, s)))
        operands.append(w.col_scale)
    y = triton_call(_kernel, cfg, operands, in_specs, split=split, bs=bs, out_dtype=x.dtype,
                    interpret=interpret, name=f"quant_matmul_w{w.bits}_{w.format}")
    return y.reshape(*lead, w.n)


@functools.partial(jax.jit, static_argnames="out_dtype")
def quant_matmul_reference(x, w: KernelWeight, out_dtype=None):
    """Pure-jnp ``x @ W`` from the same operands (float32 math, gathers; any backend)."""
    x2 = x.reshape(-1, x.shape[-1])
    if w.perm is not None:
        x2 = jnp.take(x2, w.perm, axis=1)
    wt = dequantize_reference(w)[: w.k, : w.n]
    y = jnp.dot(x2.astype(jnp.float32), wt, precision=jax.lax.Precision.HIGHEST)
    return y.reshape(*x.shape[:-1], w.n).astype(out_dtype or x.dtype)
