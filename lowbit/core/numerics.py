"""Grids and codebooks: the value sets that quantizers round onto.

Non-uniform formats are codebooks normalised to ``max |level| == 1``; a tensor stores codes (indices
into the table) and a per-group absmax scale, and dequantizes as ``levels[code] * scale``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["NF4_LEVELS", "FP4_E2M1_LEVELS", "nf4_levels_from_normal", "log_levels", "codebook_bits",
           "nearest_level", "dynamic_map", "DYNAMIC_MAP", "DYNAMIC_MAP_MIDPOINTS", "nearest_dynamic_code"]

# QLoRA NormalFloat-4 (Dettmers et al. 2023, appendix E / bitsandbytes `nf4` table).
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# OCP microscaling FP4 E2M1: magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}, both signs, normalised by 6.
# The two zeros (+0, -0) are kept so the 16 codes map one-to-one onto the e2m1 bit patterns.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_E2M1_LEVELS: tuple[float, ...] = tuple(v / 6.0 for v in _E2M1) + tuple(-v / 6.0 for v in _E2M1)


def nf4_levels_from_normal(offset: float = 0.9677083) -> np.ndarray:
    """Rebuild the NF4 table from its definition: quantiles of N(0, 1), asymmetric 8/7 split, exact 0."""
    from jax.scipy.special import ndtri

    pos = np.asarray(ndtri(jnp.linspace(offset, 0.5, 9)[:-1]))
    neg = -np.asarray(ndtri(jnp.linspace(offset, 0.5, 8)[:-1]))
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    return v / np.abs(v).max()


def log_levels(bits: int, base: float = 2.0) -> tuple[float, ...]:
    """A signed logarithmic grid: 0 and ``±base**-k``, normalised to max 1 (2**bits levels)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: a log grid needs 2..8 bits")
    n_mag = 2 ** (bits - 1) - 1  # magnitudes per sign besides 0; one spare code repeats -1
    mags = [base ** (-k) for k in range(n_mag)]
    levels = sorted({0.0, *mags, *(-m for m in mags)})
    while len(levels) < 2**bits:
        levels = [-1.0] + levels
    return tuple(float(v) for v in levels)


def codebook_bits(levels) -> int:
    n = len(levels)
    if n < 2 or n > 256:
        raise ValueError(f"levels: a codebook needs 2..256 entries, got {n}")
    return max(1, int(np.ceil(np.log2(n))))


def nearest_level(x, levels):
    """Index of the nearest codebook level for each element of ``x`` (ties -> lower index)."""
    table = jnp.asarray(levels, dtype=jnp.float32)
    return jnp.argmin(jnp.abs(x[..., None] - table), axis=-1).astype(jnp.uint8)


# ----------------------------------------------------------------------------- bitsandbytes' dynamic map

def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` bit for bit, as PyTorch's CPU kernel
    computes it: float32 ``step = (end - start) / (steps - 1)``; element ``i`` is ``start + step * i``
    in the first half (``i < steps // 2``) and ``end - step * (steps - 1 - i)`` in the second, each a
    fused multiply-add (one rounding: the compiled kernel contracts it; checked against torch 2.13 on
    x86-64, where an unfused computation differs in 24 of the 127 grid points). The exact product and
    sum fit a float64 (24-bit step times a small integer, operands within a few binades), so computing
    them in float64 and rounding once to float32 *is* the fused result.
    """
    f32 = np.float32
    s, e = f32(start), f32(end)
    if steps == 1:
        return np.asarray([s], f32)
    step = np.float64(f32((e - s) / f32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    lo = (np.float64(s) + step * i).astype(f32)
    hi = (np.float64(e) - step * (steps - 1 - i)).astype(f32)
    return np.where(np.arange(steps) < steps // 2, lo, hi)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' "dynamic" 8-bit data type (Dettmers 2016, "8-Bit Approximations for Parallelism
    in Deep Learning"), value for value as ``bitsandbytes.functional.create_dynamic_map`` builds it:
    the code QLoRA's double quantization stores the absmax constants in.

    Construction (all arithmetic in float32, like the reference, which runs on torch CPU tensors):

    * ``non_sign_bits = total_bits - 1``; for each exponent ``i = 0 .. max_exponent_bits - 1`` the
      fraction grid ``b = linspace(0.1, 1, n_i)`` with ``n_i = 2**(i + non_sign_bits -
      max_exponent_bits) + 1`` points (``+ 1`` in the exponent when unsigned) contributes its
      interval midpoints ``(b[:-1] + b[1:]) / 2`` times ``10**(i - (max_exponent_bits - 1))``, and,
      when signed, their negatives. Defaults: exponents 1e-6 .. 1 with 1, 2, 4, ..., 64 values each,
      127 positive and 127 negative values.
    * ``2**(non_sign_bits - max_exponent_bits) - 1`` additional values (0 with the defaults) from a
      ``linspace(0.1, 1, extra + 1)`` grid at the *last* exponent (the reference reuses its loop
      variable).
    * then ``0`` and ``1.0`` (so ``+1`` is representable, ``-1`` is not: the smallest value is
      -0.99296875, the largest 1.0); the count must be exactly ``2**total_bits`` (the reference
      asserts it); the list is zero-padded to 256 entries (only ever a no-op for 8 bits: with fewer
      bits the reference pads to 256 all the same, which this reproduces), sorted ascending, float32.

    With the defaults: 256 distinct values, ``map[0] = -0.99296875``, ``map[127] = 0``, ``map[128] =
    5.5e-07``, ``map[255] = 1.0``. Matches ``create_dynamic_map(signed, max_exponent_bits,
    total_bits)`` bit for bit (``tests/test_double_quant_bnb.py``).
    """
    if not isinstance(signed, (bool, np.bool_)):
        raise ValueError(f"signed={signed!r}: expected a bool")
    for name, v in (("max_exponent_bits", max_exponent_bits), ("total_bits", total_bits)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)) or not 1 <= v <= 8:
            raise ValueError(f"{name}={v!r}: expected an int in 1..8")
    f32 = np.float32
    non_sign_bits = total_bits - 1
    parts = []

    def add(n_points: int, exponent: int):
        b = _torch_linspace_f32(0.1, 1.0, n_points)
        means = (b[:-1] + b[1:]) / f32(2.0)
        scale = f32(10.0 ** exponent)          # a Python float scalar: torch rounds it to float32
        parts.append(scale * means)
        if signed:
            parts.append(-scale * means)

    for i in range(max_exponent_bits):
        # int(): with more exponent than non-sign bits the power is fractional (the reference's int())
        add(int(2.0 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1), i - (max_exponent_bits - 1))
    extra = 2.0 ** (non_sign_bits - max_exponent_bits) - 1
    if extra > 0:  # at the last loop exponent, i = max_exponent_bits - 1: 10**0
        add(int(extra) + 1, 0)
    values = np.concatenate(parts + [np.asarray([0.0, 1.0], f32)])
    if values.size != 2**total_bits:
        raise ValueError(f"dynamic_map(signed={signed}, max_exponent_bits={max_exponent_bits}, "
                         f"total_bits={total_bits}): the construction gives {values.size} values, not "
                         f"2**total_bits = {2**total_bits} (bitsandbytes' create_dynamic_map asserts the same)")
    if values.size < 256:
        values = np.concatenate([values, np.zeros(256 - values.size, f32)])
    return np.sort(values.astype(f32))


#: ``dynamic_map()`` (signed, 7 exponent bits, 8 bits): bitsandbytes' default blockwise code.
DYNAMIC_MAP: tuple[float, ...] = tuple(float(v) for v in dynamic_map())
#: ``(map[j] + map[j + 1]) * 0.5`` in float32: the 255 decision boundaries of the nearest code.
DYNAMIC_MAP_MIDPOINTS: np.ndarray = ((np.asarray(DYNAMIC_MAP[:-1], np.float32)
                                      + np.asarray(DYNAMIC_MAP[1:], np.float32)) * np.float32(0.5))


def nearest_dynamic_code(x, table=DYNAMIC_MAP):
    """uint8 index of the nearest entry of a sorted 256-entry ``table`` for each element of the
    float32 ``x`` (already divided by its block's absmax), exactly as bitsandbytes'
    ``quantize_blockwise`` picks it (CUDA ``dQuantize<0>`` in ``csrc/kernels.cu``):

    * the decision boundaries are the float32 midpoints ``(table[j] + table[j + 1]) * 0.5``;
    * a value strictly above boundary ``j`` goes up, strictly below goes down;
    * a value *exactly on* a boundary goes to the even index of the pair: the kernel's 7-step
      binary search (pivot 127, steps 64 .. 1) always ends on an even index ``p`` and keeps ``p``
      on a tie with either neighbour;
    * values beyond the ends clamp to index 0 / 255 (the reference's CPU path clamps to [-1, 1]
      first; same codes). NaN is not handled (callers never pass it).

    (bitsandbytes' CPU library instead looks the value up in a 65536-bin table over [-1, 1], a
    coarser approximation near 0, e.g. 0 -> 2.1e-5 rather than 0; this follows the CUDA kernel,
    the one QLoRA used.)
    """
    t = np.asarray(table, np.float32)
    if t.shape != (256,) or not np.all(np.diff(t) > 0):
        raise ValueError("table: expected 256 strictly increasing values (a bitsandbytes 8-bit code)")
    mid = jnp.asarray((t[:-1] + t[1:]) * np.float32(0.5))
    x = jnp.asarray(x, jnp.float32)
    idx = jnp.searchsorted(mid, x, side="left")               # number of boundaries strictly below x
    on_boundary = (idx < 255) & (mid[jnp.minimum(idx, 254)] == x)
    idx = idx + (on_boundary & (idx % 2 == 1))                 # a tie between j (odd) and j+1: j+1
    return idx.astype(jnp.uint8)
