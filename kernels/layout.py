"""The kernels' packed weight layout ("blocked planes") and the operand bundle :class:`KernelWeight`.

lowbit stores ``W[out=N, in=K]`` packed along K per row, with 3-bit codes spanning words
(``lowbit/core/pack.py``). The kernels compute ``x[M, K] @ W^T`` and want, for a tile of ``BN`` output
columns, a few contiguous rows of 32-bit words whose unpacking needs no reshape, no gather and no
word-spanning code. So weights are converted once (``lowbit/ops/kernel_format.py``) into this layout.

Orientation: K-major, ``planes[p][K-word-row, N]`` (int32 bit patterns), so that a tile is
``(rows, BN)`` with N contiguous in memory (wide, coalesced loads along N).

Blocked interleave. Let ``b`` be the bit width of a plane (1, 2, 4 or 8), ``E = 32 // b`` codes per
word and ``R`` (``tile_rows``, default 16) word rows per *pack block* of ``PB = E * R`` K rows. In
pack block ``blk``, word row ``r`` holds, at bits ``[j*b, (j+1)*b)``, the code of K row
``blk*PB + j*R + r``::

    plane[blk*R + r, n] = sum_j  codes[blk*PB + j*R + r, n] << (j*b)        j = 0 .. E-1

so shifting a loaded ``(R, BN)`` word tile by ``j*b`` and masking gives the codes of the R
*consecutive* K rows ``blk*PB + j*R + [0, R)``: each shift is a ready ``(R, BN)`` tile that meets
the matching ``(BM, R)`` slice of ``x`` in a dot (or an FMA), with no reshape or concatenation.

3 bits: two planes with the same ``PB = 32 * R``: ``lo = code & 3`` in the 2-bit layout with
``2R`` word rows per block, ``hi = code >> 2`` in the 1-bit layout with ``R`` rows per block. The
K rows ``blk*PB + j*2R + h*R + [0, R)`` are lo-plane rows ``h*R + [0, R)`` shifted by ``2j`` and
hi-plane rows ``[0, R)`` shifted by ``2j + h``: exactly 3 bits per weight, no word spanning.

Pack blocks (``R = 16``): 1 bit 512, 2 bits 256, 3 bits 512, 4 bits 128, 8 bits 64 K rows. K is
zero-padded to a multiple of ``PB`` and N to a multiple of :data:`N_ALIGN` at conversion time.

Scales / zeros: ``(G, Np)`` rows per group of ``group_size`` K rows (``G = ceil(Kp / g)``), or one
row (``group_size=None``: per output channel / per tensor). Zeros are the unpacked integer zero
points stored in the scales' dtype (exact). Formats (``w`` = dequantized weight)::

    "int":   w = (code - zero) * scale      zero from ``zeros`` or the static ``zero_point``
    "table": w = levels[code] * scale       levels are static (<= 16 entries): an in-kernel select tree
    "sign":  w = (+1 if code else -1) * scale                  (lowbit "sign" and OneBit)
    then     w[k, :] *= col_scale[k]        when col_scale is present (OneBit b, AWQ)

and ``x`` is permuted by ``perm`` (act-order) before the product: ``y = x[:, perm] @ w``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["KernelWeight", "SUPPORTED_BITS", "N_ALIGN", "DEFAULT_TILE_ROWS", "pack_block", "plane_bits",
           "plane_rows", "pack_planes", "unpack_planes", "iter_block_pieces", "decode",
           "dequantize_reference", "piece_rows", "codes_to_f32", "group_row_fn"]

SUPPORTED_BITS = (1, 2, 3, 4, 8)
N_ALIGN = 128
DEFAULT_TILE_ROWS = 16
MAX_TABLE = 16
_MAGIC = 0x4B000000          # float32 2**23: (c | MAGIC) viewed as f32 is 2**23 + c for c < 2**23
_MAGIC_F = 8388608.0


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits}: the kernel layout supports {SUPPORTED_BITS}")


def plane_bits(bits: int) -> tuple[int, ...]:
    """Bit width of each plane: ``(bits,)``, or ``(2, 1)`` for 3 bits."""
    _check_bits(bits)
    return (2, 1) if bits == 3 else (bits,)


def pack_block(bits: int, tile_rows: int = DEFAULT_TILE_ROWS) -> int:
    """K rows per pack block."""
    _check_bits(bits)
    return 32 * tile_rows if bits == 3 else (32 // bits) * tile_rows


def plane_rows(bits: int, tile_rows: int = DEFAULT_TILE_ROWS) -> tuple[int, ...]:
    """Word rows per pack block of each plane."""
    return (2 * tile_rows, tile_rows) if bits == 3 else (tile_rows,)


def piece_rows(group_size: int | None, tile_rows: int = DEFAULT_TILE_ROWS) -> int:
    """K rows of one unpacked piece: ``min(tile_rows, group_size)`` so no piece straddles a group."""
    return tile_rows if group_size is None else min(tile_rows, group_size)


# ----------------------------------------------------------------------------- operand bundle

@dataclasses.dataclass(frozen=True)
class KernelWeight:
    """A linear weight in the kernel layout (see the module docstring); a pytree.

    ``y = x @ W^T`` for lowbit's ``W[N, K]``; here stored K-major as planes ``(Kp*b/32, Np)``.
    """

    planes: tuple                     # int32 (Kp * b_p / 32, Np) per plane
    scales: jax.Array                 # (G, Np) float16 / bfloat16 / float32
    zeros: jax.Array | None = None    # (G, Np) like scales: integer zero points ("int" only)
    col_scale: jax.Array | None = None  # (1, Kp) multiplier per K row
    perm: jax.Array | None = None     # int32 (K,): x columns are taken in this order
    # static metadata
    k: int = 0                        # logical in_features
    n: int = 0                        # logical out_features
    bits: int = 4
    group_size: int | None = None     # K rows per scale row; None = one row (per channel)
    format: str = "int"               # "int" | "table" | "sign"
    levels: tuple | None = None       # "table" levels
    zero_point: float | None = None   # static zero when ``zeros`` is None ("int")
    tile_rows: int = DEFAULT_TILE_ROWS

    @property
    def k_pad(self) -> int:
        return self.planes[-1].shape[0] * 32 // plane_bits(self.bits)[-1]

    @property
    def n_pad(self) -> int:
        return self.planes[0].shape[1]

    @property
    def pack_block(self) -> int:
        return pack_block(self.bits, self.tile_rows)

    @property
    def n_blocks(self) -> int:
        return self.k_pad // self.pack_block

    def __repr__(self):
        g = "per-channel" if self.group_size is None else f"g{self.group_size}"
        extra = "".join(f" {f}" for f in ("zeros", "col_scale", "perm") if getattr(self, f) is not None)
        return (f"KernelWeight(k={self.k}, n={self.n}, bits={self.bits}, format={self.format!r}, {g},"
                f" padded=({self.k_pad}, {self.n_pad}){extra})")


jax.tree_util.register_dataclass(
    KernelWeight,
    data_fields=["planes", "scales", "zeros", "col_scale", "perm"],
    meta_fields=["k", "n", "bits", "group_size", "format", "levels", "zero_point", "tile_rows"],
)


# ----------------------------------------------------------------------------- pack / unpack

@functools.partial(jax.jit, static_argnames=("bits", "tile_rows"))
def pack_planes(codes, bits: int, tile_rows: int = DEFAULT_TILE_ROWS) -> tuple:
    """Codes ``(Kp, Np)`` (``Kp`` a multiple of the pack block) -> tuple of int32 planes."""
    codes = jnp.asarray(codes).astype(jnp.uint32)
    kp, np_ = codes.shape
    pb = pack_block(bits, tile_rows)
    if kp % pb:
        raise ValueError(f"codes: {kp} K rows is not a multiple of the pack block {pb} for bits={bits}")
    values = (codes & 3, codes >> 2) if bits == 3 else (codes & ((1 << bits) - 1),)
    planes = []
    for v, b, rows in zip(values, plane_bits(bits), plane_rows(bits, tile_rows)):
        e = 32 // b
        blocks = v.reshape(kp // pb, e, rows, np_)
        shifts = jnp.asarray(np.arange(e, dtype=np.uint32) * b)[None, :, None, None]
        # bits never overlap, so the sum is a bitwise OR
        words = jnp.sum(blocks << shifts, axis=1, dtype=jnp.uint32)
        planes.append(jax.lax.bitcast_convert_type(words.reshape(kp // pb * rows, np_), jnp.int32))
    return tuple(planes)


@functools.partial(jax.jit, static_argnames=("bits", "tile_rows"))
def unpack_planes(planes, bits: int, tile_rows: int = DEFAULT_TILE_ROWS):
    """Inverse of :func:`pack_planes`: -> int32 codes ``(Kp, Np)``."""
    vals = []
    for p, b, rows in zip(planes, plane_bits(bits), plane_rows(bits, tile_rows)):
        e = 32 // b
        w = jax.lax.bitcast_convert_type(jnp.asarray(p), jnp.uint32)
        nb = w.shape[0] // rows
        w = w.reshape(nb, 1, rows, w.shape[1])
        shifts = jnp.asarray(np.arange(e, dtype=np.uint32) * b)[None, :, None, None]
        vals.append(((w >> shifts) & ((1 << b) - 1)).reshape(nb * e * rows, -1))
    codes = vals[0] | (vals[1] << 2) if bits == 3 else vals[0]
    return codes.astype(jnp.int32)


def dequantize_reference(w: KernelWeight):
    """The float32 ``(Kp, Np)`` weight ``W^T`` (padding included), by plain unpacking and gathers."""
    codes = unpack_planes(w.planes, w.bits, w.tile_rows)
    kp = codes.shape[0]
    s = w.scales.astype(jnp.float32)
    if w.group_size is None:
        s_full = jnp.broadcast_to(s[:1], codes.shape)
    else:
        s_full = jnp.repeat(s, w.group_size, axis=0)[:kp]
    if w.format == "int":
        if w.zeros is not None:
            z = w.zeros.astype(jnp.float32)
            if w.group_size is None:
                z_full = jnp.broadcast_to(z[:1], codes.shape)
            else:
                z_full = jnp.repeat(z, w.group_size, axis=0)[:kp]
        else:
            z_full = jnp.float32(w.zero_point)
        v = (codes.astype(jnp.float32) - z_full) * s_full
    elif w.format == "table":
        v = jnp.asarray(w.levels, jnp.float32)[codes] * s_full
    elif w.format == "sign":
        v = (2.0 * codes.astype(jnp.float32) - 1.0) * s_full
    else:
        raise ValueError(f"format={w.format!r}: expected 'int', 'table' or 'sign'")
    if w.col_scale is not None:
        v = v * w.col_scale.astype(jnp.float32).reshape(-1)[:, None]
    return v


# ----------------------------------------------------------------------------- in-kernel helpers

def iter_block_pieces(load: Callable[[int, int, int], Any], bits: int, tile_rows: int,
                      piece: int) -> Iterator[tuple[int, Any]]:
    """Unpack one pack block piece by piece (static Python loop, for kernel bodies).

    ``load(plane, row, nrows)`` returns the int32 ``(nrows, BN)`` word tile at word row ``row`` of
    the block (relative to the block start). Yields ``(k_off, codes)``: int32 codes ``(piece, BN)``
    of the K rows ``[k_off, k_off + piece)`` of the block. Each word tile is loaded once.
    """
    r = tile_rows
    if bits == 3:
        for r0 in range(0, r, piece):
            hi = load(1, r0, piece)
            for h in range(2):
                lo = load(0, h * r + r0, piece)
                for j in range(16):
                    c = ((lo >> (2 * j)) & 3) | (((hi >> (2 * j + h)) & 1) << 2)
                    yield j * 2 * r + h * r + r0, c
        return
    e, mask = 32 // bits, (1 << bits) - 1
    for r0 in range(0, r, piece):
        words = load(0, r0, piece)
        for j in range(e):
            # int32 >> sign-extends the top code: always mask
            yield j * r + r0, ((words >> (j * bits)) if j else words) & mask


def codes_to_f32(c):
    """Exact int -> float32 for ``0 <= c < 2**23`` with an OR and a subtract (no I2F instruction)."""
    return jax.lax.bitcast_convert_type(c | _MAGIC, jnp.float32) - _MAGIC_F


def _table_lookup(c, levels):
    """``levels[c]`` as a binary select tree on the code bits (no gather): ``len-1`` selects."""
    n = 1
    while n < len(levels):
        n *= 2
    vals: list[Any] = [float(v) for v in levels] + [float(levels[-1])] * (n - len(levels))
    bit = 0
    while len(vals) > 1:
        pred = (c & (1 << bit)) != 0
        nxt = []
        for a, b in zip(vals[0::2], vals[1::2]):
            if isinstance(a, float) and isinstance(b, float) and a == b:
                nxt.append(a)
            else:
                nxt.append(jnp.where(pred, b, a))
        vals = nxt
        bit += 1
    out = vals[0]
    if isinstance(out, float):
        out = jnp.full(c.shape, out, jnp.float32)
    return out.astype(jnp.float32)


def decode(c, fmt: str, scale, zero=None, *, zero_point=None, levels=None):
    """Dequantize int32 codes ``(rows, BN)`` with a ``(1, BN)`` float32 scale row (and zero row)."""
    if fmt == "int":
        z = (zero + _MAGIC_F) if zero is not None else jnp.float32(float(zero_point) + _MAGIC_F)
        return (jax.lax.bitcast_convert_type(c | _MAGIC, jnp.float32) - z) * scale
    if fmt == "table":
        return _table_lookup(c, levels) * scale
    if fmt == "sign":
        return jnp.where(c != 0, scale, -scale)
    raise ValueError(f"format={fmt!r}: expected 'int', 'table' or 'sign'")


def group_row_fn(group_size: int | None, pack_blk: int):
    """``f(k_block_start, k_off) -> (cache_key, row)`` for the scale row of K row ``k_block_start +
    k_off`` (``k_block_start`` dynamic, a multiple of ``pack_blk``; ``k_off`` static)."""
    if group_size is None:
        return lambda k0, off: (0, 0)
    g = group_size
    if pack_blk % g == 0:
        return lambda k0, off: (off // g, k0 // g + off // g)
    if g % pack_blk == 0:
        return lambda k0, off: (0, k0 // g)
    return lambda k0, off: (off, (k0 + off) // g)


def rows_of(x, w: KernelWeight):
    """``x (..., K)`` -> ``(lead shape, x2 (M, K))`` with act-order's permutation applied to K."""
    x2 = x.reshape(-1, w.k)
    if w.perm is not None:
        x2 = jnp.take(x2, w.perm, axis=1)
    return x.shape[:-1], x2


def split_refs(refs, n_planes: int, has_zeros: bool, has_col: bool):
    """Kernel operands in wrapper order -> ``(x, planes, scales, zeros|None, col_scale|None, rest)``."""
    x_ref, rest = refs[0], refs[1:]
    planes, rest = rest[:n_planes], rest[n_planes:]
    s_ref, rest = rest[0], rest[1:]
    z_ref = c_ref = None
    if has_zeros:
        z_ref, rest = rest[0], rest[1:]
    if has_col:
        c_ref, rest = rest[0], rest[1:]
    return x_ref, planes, s_ref, z_ref, c_ref, rest
