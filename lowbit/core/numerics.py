"""Grids and codebooks: the value sets that quantizers round onto.

Non-uniform formats are codebooks normalised to ``max |level| == 1``; a tensor stores codes (indices
into the table) and a per-group absmax scale, and dequantizes as ``levels[code] * scale``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["NF4_LEVELS", "FP4_E2M1_LEVELS", "nf4_levels_from_normal", "log_levels", "codebook_bits",
           "nearest_level"]

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
