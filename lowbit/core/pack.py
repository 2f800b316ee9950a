"""Bit packing: the one place that defines lowbit's packed layout.

Codes are unsigned integers ``0 <= c < 2**bits`` (``bits`` in 1..8) stored along the **last
axis** as a little-endian bitstream of ``uint32`` words: element ``j`` occupies stream bits
``[j*bits, (j+1)*bits)``, and stream bit ``i`` is bit ``i % 32`` of word ``i // 32``.

For widths that divide 32 (1, 2, 4, 8) every word holds ``32 // bits`` whole codes, the lowest
code in the lowest bits::

    bits=4, codes c0..c7 -> one word
      bit 31                                            bit 0
      | c7 | c6 | c5 | c4 | c3 | c2 | c1 | c0 |

For 3 bits, 32 codes fill exactly 3 words and codes 10 and 21 span a word boundary::

      word 0: | c10.lo(2) | c9 | c8 | ... | c1 | c0 |        bits 0..29 = c0..c9, 30..31 = low 2 bits of c10
      word 1: | c21.lo(1) | c20 | ... | c11 | c10.hi(1) |
      word 2: | c31 | c30 | ... | c22 | c21.hi(2) |

A row of ``n`` codes packs into ``ceil(n * bits / 32)`` words (the tail is zero-padded).
Along a weight matrix ``W[out, in]`` lowbit packs each row along ``in``; transposing the packed
array gives the GPTQ ``qweight[in * bits / 32, out]`` layout (packed along in_features) that the
Pallas kernels and the GPTQ exporter use.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

__all__ = ["pack", "unpack", "packed_words"]


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r}: expected an integer in 1..8")


def packed_words(n: int, bits: int) -> int:
    """Number of uint32 words holding ``n`` codes of ``bits`` bits."""
    _check_bits(bits)
    return -(-n * bits // 32)


@functools.lru_cache(maxsize=None)
def _tables(bits: int):
    """Static per-position word index, shift and spill for a block of 32 codes (= ``bits`` words)."""
    j = np.arange(32)
    offset = j * bits
    word = offset // 32
    shift = (offset % 32).astype(np.uint32)
    spill = (offset % 32) + bits > 32  # the code continues in word + 1
    # one-hot (32, bits) matrices: low part goes to `word`, high part to `word + 1`.
    lo = np.zeros((32, bits), np.uint32)
    lo[j, word] = 1
    hi = np.zeros((32, bits), np.uint32)
    hi[j[spill], word[spill] + 1] = 1
    return word, shift, spill, lo, hi


def pack(codes, bits: int):
    """Pack integer codes ``(..., n)`` with values in ``[0, 2**bits)`` into ``uint32 (..., ceil(n*bits/32))``."""
    _check_bits(bits)
    codes = jnp.asarray(codes)
    if codes.ndim == 0:
        raise ValueError("codes: expected an array with at least one axis, got a scalar")
    n = codes.shape[-1]
    _, shift, spill, lo, hi = _tables(bits)
    c = codes.astype(jnp.uint32) & jnp.uint32((1 << bits) - 1)
    pad = (-n) % 32
    if pad:
        c = jnp.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, pad)])
    c = c.reshape(*c.shape[:-1], -1, 32)  # (..., blocks, 32)
    low = c << jnp.asarray(shift)
    # right shift by 32 is undefined; spill positions always have shift > 0.
    high = jnp.where(jnp.asarray(spill), c >> jnp.asarray(np.where(spill, 32 - shift, 0).astype(np.uint32)), 0)
    # Bits never overlap, so an integer sum is a bitwise OR.
    words = jnp.einsum("...j,jw->...w", low, jnp.asarray(lo), preferred_element_type=jnp.uint32)
    words = words + jnp.einsum("...j,jw->...w", high, jnp.asarray(hi), preferred_element_type=jnp.uint32)
    words = words.reshape(*words.shape[:-2], -1).astype(jnp.uint32)
    return words[..., : packed_words(n, bits)]


def unpack(words, bits: int, n: int):
    """Inverse of :func:`pack`: ``uint32 (..., ceil(n*bits/32))`` -> ``uint8 (..., n)`` codes."""
    _check_bits(bits)
    words = jnp.asarray(words)
    if words.dtype != jnp.uint32:
        raise ValueError(f"words: expected dtype uint32, got {words.dtype}")
    need = packed_words(n, bits)
    if words.shape[-1] != need:
        raise ValueError(f"words: last axis has {words.shape[-1]} words, expected {need} for n={n}, bits={bits}")
    word, shift, spill, _, _ = _tables(bits)
    pad = (-words.shape[-1]) % bits
    if pad:
        words = jnp.pad(words, [(0, 0)] * (words.ndim - 1) + [(0, pad)])
    blocks = words.reshape(*words.shape[:-1], -1, bits)  # (..., blocks, bits)
    w_lo = jnp.take(blocks, jnp.asarray(word), axis=-1)
    w_hi = jnp.take(blocks, jnp.asarray(np.minimum(word + 1, bits - 1)), axis=-1)
    c = w_lo >> jnp.asarray(shift)
    c = c | jnp.where(jnp.asarray(spill), w_hi << jnp.asarray(np.where(spill, 32 - shift, 0).astype(np.uint32)), 0)
    c = (c & jnp.uint32((1 << bits) - 1)).reshape(*c.shape[:-2], -1)
    return c[..., :n].astype(jnp.uint8)
