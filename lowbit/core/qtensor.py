"""The central types: :class:`QuantSpec` (how to quantize) and :class:`QuantizedTensor` (the result).

Invariant of a ``QuantizedTensor`` ``q`` holding a matrix of ``q.shape == (rows, cols)``, with
``codes = unpack(q.data)`` (``rows x cols`` unsigned integers) and columns split into
``n_groups = ceil(cols / q.group_size)`` consecutive groups ``g`` (column ``c`` is in group
``c // group_size``; the last group is shorter when ``group_size`` does not divide ``cols``, which
:class:`QuantSpec` allows only with ``partial_groups=True``)::

    format "int":       stored[r, c] = (codes[r, c] - zeros[r, g]) * scales[r, g]
                        (symmetric: no zeros array; the zero is the mid code 2**(bits-1))
    "nf4" / "fp4" / "codebook":
                        stored[r, c] = levels[codes[r, c]] * scales[r, g]
    "sign":             stored[r, c] = (2 * codes[r, c] - 1) * scales[r, g]
    "onebit":           like "sign" with one scale per row (vector a), times col_scale (vector b):
                        stored = sign(W) * outer(a, b)                          (OneBit, Xu et al. 2024)
    then                stored[:, c] *= col_scale[c]                  when col_scale is present
    and                 dequantize(q)[:, perm[c]] = stored[:, c]      when perm is present (act-order)

``scales`` broadcasts over rows when it has one row (per-tensor). With double quantization
``scales`` is a pair ``(nested, offset)``: ``nested`` a ``QuantizedTensor`` of the scales minus
their mean, in blocks (one row per block), and ``offset`` that mean as a ``(1,)`` float32 array; the
scale table is ``dequantize(nested)`` flattened, cut to ``rows_s * n_groups``, plus ``offset``
(:func:`lowbit.core.quantizers.scale_table`). ``zeros`` are integer codes packed like ``data``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.core import numerics

__all__ = ["QuantSpec", "QuantizedTensor", "FORMATS"]

FORMATS = ("int", "nf4", "fp4", "codebook", "sign", "onebit")
_TABLE_FORMATS = ("nf4", "fp4", "codebook")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How to quantize one matrix.

    Attributes:
      bits: code width, 1..8.
      group_size: columns (input features) sharing one scale; ``None`` = one scale per row
        (per output channel).
      per_tensor: one scale for the whole tensor (overrides ``group_size``).
      symmetric: absmax scaling with the implicit mid-point zero (``format="int"``), else min/max
        with a stored integer zero-point.
      format: ``"int"`` (uniform), ``"nf4"``, ``"fp4"`` (e2m1), ``"codebook"`` (``levels``), ``"sign"``
        (1 bit, one scale per group = mean |w|), ``"onebit"`` (1 bit, two vectors, SVID init).
      levels: codebook levels for ``format="codebook"`` (normalised so that max |level| = 1 is not
        required: scales map absmax onto max |level|).
      partial_groups: allow a ``group_size`` that does not divide the number of columns: the last
        group is shorter (what the GPTQ reference code and the HF GPTQ format do, e.g. 576 columns
        in groups of 128 = 4 groups of 128 + one of 64). Off by default: a non-dividing group size
        is then an error.
      clip: search a shrink factor of the range per group minimising ``sum |w - q|**clip_norm``
        (the ``mse=True`` grid search of the GPTQ reference code).
      double_quant: quantize the scales to ``dq_bits`` (asymmetric) in blocks of ``dq_block``
        (QLoRA's double quantization).
      scale_dtype: storage dtype of scales (and of the OneBit value vectors).
    """

    bits: int = 4
    group_size: int | None = 128
    per_tensor: bool = False
    symmetric: bool = False
    format: str = "int"
    levels: tuple[float, ...] | None = None
    partial_groups: bool = False
    clip: bool = False
    clip_grid: int = 100
    clip_maxshrink: float = 0.8
    clip_norm: float = 2.4
    double_quant: bool = False
    dq_bits: int = 8
    dq_block: int = 256
    scale_dtype: str = "float16"

    def __post_init__(self):
        if not isinstance(self.bits, (int, np.integer)) or isinstance(self.bits, bool) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits!r}: expected an integer in 1..8")
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r}: expected one of {FORMATS}")
        if self.group_size is not None and (not isinstance(self.group_size, (int, np.integer)) or self.group_size <= 0):
            raise ValueError(f"group_size={self.group_size!r}: expected a positive integer or None (per channel)")
        if self.format in ("nf4", "fp4") and self.bits != 4:
            raise ValueError(f"bits={self.bits}: format {self.format!r} is a 4-bit format")
        if self.format == "codebook":
            if self.levels is None:
                raise ValueError("levels: format 'codebook' needs a tuple of levels")
            if numerics.codebook_bits(self.levels) > self.bits:
                raise ValueError(f"bits={self.bits}: {len(self.levels)} levels need {numerics.codebook_bits(self.levels)} bits")
        elif self.levels is not None:
            raise ValueError(f"levels: only used with format='codebook', got format={self.format!r}")
        if self.format in ("sign", "onebit") and self.bits != 1:
            raise ValueError(f"bits={self.bits}: format {self.format!r} is a 1-bit format")
        if self.format == "int" and self.symmetric and self.bits < 2:
            raise ValueError("symmetric=True needs bits >= 2 (use format='sign' for symmetric 1-bit)")
        if self.format == "onebit" and (self.per_tensor or self.group_size is not None):
            raise ValueError("format 'onebit' has one value per row and column: use group_size=None, per_tensor=False")
        if not 2 <= self.dq_bits <= 8 or self.dq_block <= 0:
            raise ValueError(f"dq_bits={self.dq_bits}, dq_block={self.dq_block}: expected 2..8 bits and a positive block")
        if self.scale_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"scale_dtype={self.scale_dtype!r}: expected float16, bfloat16 or float32")
        if not 0.0 < self.clip_maxshrink < 1.0 or self.clip_grid < 1:
            raise ValueError(f"clip_maxshrink={self.clip_maxshrink}, clip_grid={self.clip_grid}: expected (0, 1) and >= 1")

    @property
    def table(self) -> tuple[float, ...] | None:
        return {"nf4": numerics.NF4_LEVELS, "fp4": numerics.FP4_E2M1_LEVELS,
                "codebook": self.levels}.get(self.format)

    def replace(self, **kw) -> "QuantSpec":
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A quantized matrix; a pytree whose leaves are the arrays and whose aux data is the metadata.

    See the module docstring for the dequantization invariant.
    """

    data: jax.Array                          # uint32 (rows, ceil(cols * bits / 32)): packed codes
    scales: Any                              # (rows or 1, n_groups) array, or (nested QuantizedTensor, offset)
    zeros: jax.Array | None = None           # uint32 packed integer zero codes (rows or 1, ...)
    col_scale: jax.Array | None = None       # (cols,) multiplier per column (OneBit b; AWQ 1/s)
    perm: jax.Array | None = None            # int32 (cols,) stored column c is original perm[c]
    # static metadata
    shape: tuple[int, int] = (0, 0)
    bits: int = 4
    group_size: int = 0
    format: str = "int"
    levels: tuple[float, ...] | None = None
    per_tensor: bool = False

    @property
    def n_groups(self) -> int:
        return -(-self.shape[1] // self.group_size)

    @property
    def scale_shape(self) -> tuple[int, int]:
        """Logical shape of the scale table (and of the zeros before packing)."""
        return (1 if self.per_tensor else self.shape[0], self.n_groups)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def dtype(self):
        return jnp.float32

    @property
    def T(self):
        raise TypeError("QuantizedTensor has no transpose; use lowbit.ops.linear or dequantize() first")

    def __repr__(self):
        extra = " perm" if self.perm is not None else ""
        extra += " col_scale" if self.col_scale is not None else ""
        dq = " double-quant" if isinstance(self.scales, tuple) else ""
        return (f"QuantizedTensor(shape={self.shape}, format={self.format!r}, bits={self.bits}, "
                f"group_size={self.group_size}{dq}{extra})")


jax.tree_util.register_dataclass(
    QuantizedTensor,
    data_fields=["data", "scales", "zeros", "col_scale", "perm"],
    meta_fields=["shape", "bits", "group_size", "format", "levels", "per_tensor"],
)
