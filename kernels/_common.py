"""Pieces shared by the kernels: operand checks, and the K loop / x loads / masked output store of
the two GPU (Triton) kernels, whose tiles have the same geometry (a ``(bm, bn)`` output tile,
packed blocks of ``pack_blk`` K rows consumed ``p`` rows at a time).

The GPU kernels accumulate in one of two shapes, picked by ``bm``:

* ``bm < 16`` ("fma", the GEMV path): a tuple of ``bm`` float32 ``(p, bn)`` partials, one per x row,
  updated with broadcast multiply-adds and reduced over ``p`` only once, at the end;
* otherwise a float32 ``(bm, bn)`` tile updated by ``jnp.dot`` (tensor cores).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import compat
from .layout import MAX_TABLE, SUPPORTED_BITS, KernelWeight, piece_rows, rows_of


@dataclasses.dataclass(frozen=True)
class WeightCfg:
    """What a kernel body needs, statically, to decode a :class:`KernelWeight`'s packed codes."""
    bits: int
    tile_rows: int
    piece: int            # K rows unpacked at a time (never straddles a group)
    pack_blk: int
    group_size: int | None
    fmt: str
    levels: tuple | None
    zero_point: float | None
    has_zeros: bool
    has_col: bool
    n_planes: int

    @staticmethod
    def fields(w: KernelWeight) -> dict:
        return dict(bits=w.bits, tile_rows=w.tile_rows, piece=piece_rows(w.group_size, w.tile_rows),
                    pack_blk=w.pack_block, group_size=w.group_size, fmt=w.format, levels=w.levels,
                    zero_point=w.zero_point, has_zeros=w.zeros is not None, has_col=w.col_scale is not None,
                    n_planes=len(w.planes))


@dataclasses.dataclass(frozen=True)
class GridCfg:
    """The static tiling of a Triton kernel: grid ``(M / bm, N / bn, split)``, each program running
    ``n_iter`` steps of ``unroll`` packed blocks over its ``k_slice`` of K, and what needs masking."""
    m: int
    k: int
    n: int
    bm: int
    bn: int
    unroll: int
    n_iter: int
    k_slice: int
    partial: bool         # split-K: float32 partial outputs, summed by the wrapper
    mask_m: bool
    mask_k: bool
    mask_n: bool

    @staticmethod
    def fields(m: int, w: KernelWeight, bs) -> dict:
        """From the resolved BlockSizes ``bs`` (``block_k`` a multiple of the pack block dividing the
        K slice)."""
        k_slice = w.k_pad // bs.split_k
        return dict(m=m, k=w.k, n=w.n, bm=bs.block_m, bn=bs.block_n, unroll=bs.block_k // w.pack_block,
                    n_iter=k_slice // bs.block_k, k_slice=k_slice, partial=bs.split_k > 1,
                    mask_m=m % bs.block_m != 0, mask_k=w.k != w.k_pad, mask_n=w.n % bs.block_n != 0)


def is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def check_operands(x_shape, x_dtype, w, *, platform: str, what: str, backend: str | None,
                   interpret: bool) -> str | None:
    """The checks every kernel makes: ``w`` a KernelWeight, the platform (skipped for ``interpret``
    or ``backend="any"``), ``x``'s last axis equal to in_features and ``x`` in bfloat16."""
    if not isinstance(w, KernelWeight):
        return f"w: expected a KernelWeight, got {type(w).__name__}"
    if not interpret and backend != "any":
        backend = backend or compat.default_backend()
        if backend != platform:
            return f"backend {backend!r}: the {what} kernel needs a {platform.upper()} (or interpret=True)"
    if len(x_shape) < 1 or x_shape[-1] != w.k:
        return f"x: last axis {x_shape[-1] if x_shape else None} does not match in_features {w.k}"
    if jnp.dtype(x_dtype) != jnp.bfloat16:
        return f"x: dtype {jnp.dtype(x_dtype)} (the kernel takes bfloat16 activations)"
    return None


def check_codes(w: KernelWeight) -> str | None:
    """The code formats the general kernels decode: int / table / sign at the supported widths."""
    if w.bits not in SUPPORTED_BITS:
        return f"bits={w.bits}: supported {SUPPORTED_BITS}"
    if w.format not in ("int", "table", "sign"):
        return f"format={w.format!r}: expected 'int', 'table' or 'sign'"
    if w.format == "table" and (w.levels is None or len(w.levels) > MAX_TABLE):
        return f"table format with {None if w.levels is None else len(w.levels)} levels (max {MAX_TABLE})"
    if w.format == "int" and w.zeros is None and w.zero_point is None:
        return "int format needs zeros or a static zero_point"
    if w.group_size is not None and (w.group_size % 16 or w.group_size < 16):
        return f"group_size={w.group_size}: must be a multiple of 16 (or per-channel)"
    return None


def check_triton_tiles(w: KernelWeight, bs) -> str | None:
    """Tile constraints of the Triton kernels (``bs``: their BlockSizes, or None for the defaults)."""
    if not is_pow2(w.tile_rows) or w.tile_rows < 16:
        return f"tile_rows={w.tile_rows}: must be a power of two >= 16"
    if bs is None:
        return None
    if not (is_pow2(bs.block_m) and is_pow2(bs.block_n) and bs.block_n >= 16):
        return f"block_m={bs.block_m}, block_n={bs.block_n}: powers of two (block_n >= 16) expected"
    if bs.block_k % w.pack_block:
        return f"block_k={bs.block_k} must be a multiple of the pack block {w.pack_block}"
    if bs.split_k < 1 or bs.num_warps < 1 or bs.num_stages < 1:
        return f"{bs}: split_k, num_warps, num_stages must be >= 1"
    return None


def operand_rows(name: str, why: str | None, x, w: KernelWeight):
    """A wrapper's entry: raise ``ValueError`` naming the kernel when ``why`` (its ``check``) says the
    operands are unsupported, else ``(lead shape, x2 (M, K))`` as :func:`~.layout.rows_of`."""
    if why:
        raise ValueError(f"{name}: {why}")
    return rows_of(x, w)


def x_loaders(x_ref, cfg, p: int) -> tuple[Callable, Callable]:
    """``(x_tile(kk, kmask) -> (bm, p), x_row(mi, kk, kmask) -> (p,))``: slices of the x block at
    local column ``kk``, zero outside ``[0, M) x [0, K)`` (``kmask``: the (p,) in-range K mask, or
    None when K needs no mask). ``cfg`` has ``m, bm, mask_m, mask_k``."""
    row0 = pl.program_id(0) * cfg.bm
    rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (cfg.bm, 1), 0)

    def x_tile(kk, kmask):
        ref = x_ref.at[:, pl.ds(kk, p)]
        if not (cfg.mask_m or cfg.mask_k):
            return ref[...]
        mask = (rows < cfg.m) if cfg.mask_m else True
        mask = (mask & kmask[None, :]) if cfg.mask_k else jnp.broadcast_to(mask, (cfg.bm, p))
        return compat.masked_load(ref, mask, 0)

    def x_row(mi, kk, kmask):
        # a traced scalar index: the interpreter's masked-load rule rejects Python ints
        ref = x_ref.at[jnp.int32(mi), pl.ds(kk, p)]
        if not (cfg.mask_m or cfg.mask_k):
            return ref[...]
        mask = kmask if cfg.mask_k else jnp.ones((p,), jnp.bool_)
        if cfg.mask_m:
            mask = mask & (row0 + mi < cfg.m)
        return compat.masked_load(ref, mask, 0)

    return x_tile, x_row


def k_loop(cfg, one_block: Callable[[Any, Any], Any], p: int):
    """Run ``one_block(block_index, acc) -> acc`` over the ``cfg.n_iter * cfg.unroll`` packed blocks
    of this program's K slice (``cfg.unroll`` blocks per ``fori_loop`` step); returns the
    accumulator (see the module docstring for its two shapes)."""

    def body(it, acc):
        for u in range(cfg.unroll):
            acc = one_block(it * cfg.unroll + u, acc)
        return acc

    if cfg.bm < 16:
        acc0 = tuple(jnp.zeros((p, cfg.bn), jnp.float32) for _ in range(cfg.bm))
    else:
        acc0 = jnp.zeros((cfg.bm, cfg.bn), jnp.float32)
    return jax.lax.fori_loop(0, cfg.n_iter, body, acc0)


def store_tile(o_ref, acc, cfg, col_scale=None) -> None:
    """Reduce ``acc`` to the ``(bm, bn)`` output tile, multiply each column by ``col_scale`` (bn,)
    when given, and store it, masking rows ``>= cfg.m`` and columns ``>= cfg.n``."""
    row0 = pl.program_id(0) * cfg.bm
    cols = pl.program_id(1) * cfg.bn + jax.lax.broadcasted_iota(jnp.int32, (cfg.bn,), 0)
    if cfg.bm < 16:
        for mi in range(cfg.bm):
            y = jnp.sum(acc[mi], axis=0)
            if col_scale is not None:
                y = y * col_scale
            ref = o_ref.at[jnp.int32(mi), :]
            if cfg.mask_m or cfg.mask_n:
                mask = (cols < cfg.n) if cfg.mask_n else jnp.ones((cfg.bn,), jnp.bool_)
                if cfg.mask_m:
                    mask = mask & (row0 + mi < cfg.m)
                compat.masked_store(ref, y.astype(o_ref.dtype), mask)
            else:
                compat.masked_store(ref, y.astype(o_ref.dtype))
        return
    y = acc if col_scale is None else acc * col_scale[None, :]
    y = y.astype(o_ref.dtype)
    if cfg.mask_m or cfg.mask_n:
        rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (cfg.bm, 1), 0)
        mask = jnp.broadcast_to((rows < cfg.m) if cfg.mask_m else True, (cfg.bm, cfg.bn))
        if cfg.mask_n:
            mask = mask & (cols < cfg.n)[None, :]
        compat.masked_store(o_ref, y, mask)
    else:
        compat.masked_store(o_ref, y)


def triton_call(kernel, cfg, operands: list, in_specs: list, *, split: int, bs, out_dtype, interpret: bool,
                name: str):
    """The Triton ``pallas_call`` of a GPU kernel over the grid ``(M tiles, N tiles, split)``: with
    ``split > 1`` every K slice writes a float32 partial output, summed here into ``out_dtype``.
    N tiles stop at ``cfg.n`` (tiles past it would write out of bounds)."""
    m, n, bm, bn = cfg.m, cfg.n, cfg.bm, cfg.bn
    if split > 1:
        out_shape = jax.ShapeDtypeStruct((split, m, n), jnp.float32)
        out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    y = pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        out_shape=out_shape,
        grid=(pl.cdiv(m, bm), pl.cdiv(n, bn), split),
        in_specs=in_specs,
        out_specs=out_spec,
        compiler_params=compat.triton_params(bs.num_warps, bs.num_stages),
        interpret=interpret,
        name=name,
    )(*operands)
    return jnp.sum(y, axis=0).astype(out_dtype) if split > 1 else y
