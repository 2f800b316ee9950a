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
(:func:`lowbit.core.quantizers.scale_table`). ``nested`` is a symmetric ``"int"`` tensor
(``dq_map="linear"``) or, for bitsandbytes' double quantization (``dq_map="dynamic"``), a
``"codebook"`` tensor with ``levels = numerics.DYNAMIC_MAP`` (256 levels, 8 bits), one float32
absmax per block: ``scale = DYNAMIC_MAP[code] * block_absmax + offset``. ``zeros`` are integer
codes packed like ``data``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.core import numerics
from lowbit.core.checks import is_arraylike, is_int, is_real
from lowbit.core.nodes import register_node

__all__ = ["QuantSpec", "QuantizedTensor", "MatrixLike", "QuantizedMatrix", "FORMATS", "DQ_MAPS"]

FORMATS = ("int", "nf4", "fp4", "codebook", "sign", "onebit")
DQ_MAPS = ("linear", "dynamic")  # QuantSpec.dq_map: the grid of the double-quantized scales
_TABLE_FORMATS = ("nf4", "fp4", "codebook")


def _check_int(name: str, v, lo: int, hi: int | None = None) -> None:
    """``v`` must be an int (not a bool) in ``lo..hi``."""
    if is_int(v) and lo <= v and (hi is None or v <= hi):
        return
    if hi is None:
        want = "a positive int" if lo == 1 else f"an int >= {lo}"
    else:
        want = f"an int in {lo}..{hi}"
    raise ValueError(f"{name}={v!r}: expected {want}")


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
      double_quant: store the scales themselves quantized (QLoRA's double quantization): their
        mean (one float32) is subtracted and the rest quantized to ``dq_bits`` in blocks of
        ``dq_block`` consecutive scales (row-major over the scale table), one float32 per block.
      dq_map: the grid of the double quantization. ``"linear"`` (default): a symmetric
        ``dq_bits``-bit integer grid per block (steps of ``2 * absmax / (2**dq_bits - 1)``, zero at
        the mid code); the weights are then rounded against the scales *as stored*.
        ``"dynamic"``: bitsandbytes' double quantization (``quantize_4bit(...,
        compress_statistics=True)``): the 8-bit dynamic map (:data:`lowbit.core.numerics.DYNAMIC_MAP`),
        blockwise absmax, nearest code with the CUDA kernel's tie rule
        (:func:`lowbit.core.numerics.nearest_dynamic_code`); as bitsandbytes does, :func:`quantize`
        rounds the weights against the exact (pre-double-quantization) scales and only the stored
        statistics are compressed (GPTQ, which needs the final scales up front, rounds against the
        stored ones). Needs ``dq_bits=8``. Ignored without ``double_quant``.
        :meth:`QuantSpec.qlora_nf4` is QLoRA's full base-weight format.
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
    dq_map: str = "linear"
    scale_dtype: str = "float16"

    def __post_init__(self):
        _check_int("bits", self.bits, 1, 8)
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r}: expected one of {FORMATS}")
        if self.group_size is not None and not (is_int(self.group_size) and self.group_size > 0):
            raise ValueError(f"group_size={self.group_size!r}: expected a positive int or None (per output channel)")
        for name in ("per_tensor", "symmetric", "partial_groups", "clip", "double_quant"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a bool")
        _check_int("dq_bits", self.dq_bits, 2, 8)
        _check_int("dq_block", self.dq_block, 1)
        if self.dq_map not in DQ_MAPS:
            raise ValueError(f"dq_map={self.dq_map!r}: expected one of {DQ_MAPS}")
        if self.dq_map == "dynamic" and self.dq_bits != 8:
            raise ValueError(f"dq_bits={self.dq_bits}: dq_map='dynamic' is bitsandbytes' 8-bit dynamic map "
                             "(use dq_bits=8, or dq_map='linear' for other widths)")
        _check_int("clip_grid", self.clip_grid, 1)
        if not (is_real(self.clip_maxshrink) and 0.0 < self.clip_maxshrink < 1.0):
            raise ValueError(f"clip_maxshrink={self.clip_maxshrink!r}: expected a number in (0, 1) "
                             "(the smallest range factor the clipping search tries)")
        if not (is_real(self.clip_norm) and math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm={self.clip_norm!r}: expected a finite number > 0 (the error norm's exponent)")
        if self.format in ("nf4", "fp4") and self.bits != 4:
            raise ValueError(f"bits={self.bits}: format {self.format!r} is a 4-bit format")
        if self.format == "codebook":
            if self.levels is None:
                raise ValueError("levels: format 'codebook' needs a tuple of levels")
            if not (isinstance(self.levels, tuple)
                    and all(is_real(v) and math.isfinite(v) for v in self.levels)):
                raise ValueError(f"levels={self.levels!r}: expected a tuple of finite numbers")
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
        if self.scale_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"scale_dtype={self.scale_dtype!r}: expected float16, bfloat16 or float32")

    @property
    def table(self) -> tuple[float, ...] | None:
        return {"nf4": numerics.NF4_LEVELS, "fp4": numerics.FP4_E2M1_LEVELS,
                "codebook": self.levels}.get(self.format)

    def replace(self, **kw) -> "QuantSpec":
        return dataclasses.replace(self, **kw)

    @classmethod
    def qlora_nf4(cls, **overrides) -> "QuantSpec":
        """QLoRA's base-weight format, as bitsandbytes stores it (``Linear4bit`` with
        ``bnb_4bit_quant_type="nf4"``, ``bnb_4bit_use_double_quant=True``): NF4 codes in groups of 64
        with one float32 absmax each, the absmax constants double-quantized to bitsandbytes'
        8-bit dynamic map in blocks of 256 around their float32 mean: 4 + 8/64 + 32/(64*256) =
        4.127 bits per parameter (plus 32 bits per tensor for the mean). ``overrides`` replace
        fields (e.g. ``group_size=128``)."""
        base = dict(bits=4, format="nf4", group_size=64, symmetric=True, double_quant=True, dq_map="dynamic",
                    dq_bits=8, dq_block=256, scale_dtype="float32")
        return cls(**{**base, **overrides})


class MatrixLike:
    """Mixin of the weight types that stand in for an ``(out, in)`` matrix (QuantizedTensor,
    LoraWeight, Int8Weight): ``ndim`` and ``size`` from the subclass's ``shape``."""

    @property
    def ndim(self) -> int:
        return 2

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]


class QuantizedMatrix(MatrixLike):
    """Base of the weight nodes that replace a matrix by a method-specific node stored and passed
    around whole (LLM.int8()'s ``Int8Weight``, OneBit's ``OneBitWeight``, the mixed-width
    ``MixedWidthWeight``): a quantized linear for model-size accounting. Like every weight node
    (:mod:`lowbit.core.nodes`) a subclass registers its kind (``register_node``: checkpoint fields
    through ``ckpt_fields()`` / ``from_ckpt()``) and its matmul (:func:`lowbit.ops.register_matmul`),
    and gives the calibration report's fields through ``describe()``."""

    def describe(self) -> dict:  # pragma: no cover
        raise NotImplementedError

    # checkpoint protocol (lowbit.core.nodes): the node as named children (arrays, QuantizedTensors,
    # None for absent ones) and JSON metadata, and back
    def ckpt_fields(self) -> tuple[dict, dict]:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def from_ckpt(cls, fields: dict, meta: dict):  # pragma: no cover
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class QuantizedTensor(MatrixLike):
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

    def __post_init__(self):
        # Cheap consistency checks (metadata, leaf shapes and dtypes; never values) so that a wrong
        # ``shape``/``bits``/``perm``/scales shape is an error here rather than a silently wrong
        # dequantization. JAX also builds QuantizedTensors from placeholders (``None``, ``object()``,
        # vmap axis specs, ...) in tree_unflatten: without an array-like leaf nothing is checked.
        # A batch axis in front of every leaf (vmap / scan / stacked layers) is allowed.
        if not any(is_arraylike(x) for x in self._own_leaves()):
            return
        self._check_meta()
        rows, cols = self.shape
        words = -(-cols * self.bits // 32)
        rows_s, groups = self.scale_shape
        batch: list = []
        what = f"shape={self.shape}, bits={self.bits}"
        _check_leaf("data", self.data, (rows, words), "uint32", batch,
                    f"for {what} (rows, ceil(cols * bits / 32) uint32 words)")
        where = f"for shape={self.shape}, group_size={self.group_size}, per_tensor={self.per_tensor}"
        if isinstance(self.scales, tuple):
            if len(self.scales) != 2:
                raise ValueError(f"scales: expected an array or a (nested QuantizedTensor, offset) pair, "
                                 f"got a tuple of {len(self.scales)}")
            nested, offset = self.scales
            if isinstance(nested, QuantizedTensor) and is_arraylike(nested.data):
                n_nested = nested.shape[0] * nested.shape[1]
                if n_nested < rows_s * groups:
                    raise ValueError(f"scales: the double-quantized scale table holds {n_nested} values, "
                                     f"expected at least {rows_s * groups} = {rows_s} x {groups} {where}")
            _check_leaf("scales offset", offset, (1,), "float", batch, "(the mean of the scales)")
        else:
            _check_leaf("scales", self.scales, (rows_s, groups), "float", batch, f"{where} (rows or 1, n_groups)")
        if self.zeros is not None and self.format != "int":
            raise ValueError(f"zeros: only format 'int' has zero points, got format={self.format!r}")
        _check_leaf("zeros", self.zeros, (rows_s, -(-groups * self.bits // 32)), "uint32", batch,
                    f"{where}, bits={self.bits} (n_groups codes packed per scale row)")
        _check_leaf("col_scale", self.col_scale, (cols,), "float", batch, f"(one per column, in_features={cols})")
        _check_leaf("perm", self.perm, (cols,), "int", batch, f"(one index per column, in_features={cols})")

    def _own_leaves(self):
        scales = self.scales if isinstance(self.scales, tuple) else (self.scales,)
        return (self.data, *scales, self.zeros, self.col_scale, self.perm)

    def _check_meta(self):
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r}: expected one of {FORMATS}")
        _check_int("bits", self.bits, 1, 8)
        if not (isinstance(self.shape, tuple) and len(self.shape) == 2
                and all(is_int(d) and d > 0 for d in self.shape)):
            raise ValueError(f"shape={self.shape!r}: expected (rows, cols), two positive ints")
        _check_int("group_size", self.group_size, 1)
        if not isinstance(self.per_tensor, (bool, np.bool_)):
            raise ValueError(f"per_tensor={self.per_tensor!r}: expected a bool")
        if self.format in _TABLE_FORMATS:
            if not (isinstance(self.levels, tuple) and 2 <= len(self.levels) <= 2**self.bits):
                raise ValueError(f"levels={self.levels!r}: format {self.format!r} needs a tuple of 2..{2**self.bits} "
                                 f"levels (bits={self.bits})")

    @property
    def n_groups(self) -> int:
        return -(-self.shape[1] // self.group_size)

    @property
    def scale_shape(self) -> tuple[int, int]:
        """Logical shape of the scale table (and of the zeros before packing)."""
        return (1 if self.per_tensor else self.shape[0], self.n_groups)

    @property
    def dtype(self):
        return jnp.float32

    @property
    def T(self):
        raise TypeError("QuantizedTensor has no transpose; use lowbit.ops.linear or dequantize() first")

    def bits_per_param(self) -> float:
        """Stored bits (codes, scales, zeros, value vectors, permutation, nested scales) per weight."""
        total = sum(int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize * 8
                    for leaf in jax.tree_util.tree_leaves(self))
        return total / (self.shape[0] * self.shape[1])

    def describe(self) -> dict:
        """The calibration report's fields of this weight."""
        return dict(format=self.format, bits=self.bits, group_size=self.group_size, act_order=self.perm is not None,
                    bits_per_param=self.bits_per_param())

    def ckpt_fields(self) -> tuple[dict, dict]:
        """The node protocol (:mod:`lowbit.core.nodes`): its arrays, and its static metadata."""
        return ({f: getattr(self, f) for f in _QT_ARRAYS},
                {"shape": list(self.shape), "bits": self.bits, "group_size": self.group_size, "format": self.format,
                 "levels": None if self.levels is None else list(self.levels), "per_tensor": self.per_tensor})

    @classmethod
    def from_ckpt(cls, fields: dict, meta: dict) -> "QuantizedTensor":
        levels = meta["levels"]
        return cls(**fields, shape=tuple(int(d) for d in meta["shape"]), bits=int(meta["bits"]),
                   group_size=int(meta["group_size"]), format=str(meta["format"]),
                   levels=None if levels is None else tuple(float(v) for v in levels),
                   per_tensor=bool(meta["per_tensor"]))

    def __repr__(self):
        extra = " perm" if self.perm is not None else ""
        extra += " col_scale" if self.col_scale is not None else ""
        dq = ""
        if isinstance(self.scales, tuple):
            nested = self.scales[0]
            dyn = isinstance(nested, QuantizedTensor) and nested.format == "codebook"
            dq = " double-quant(dynamic)" if dyn else " double-quant"
        return (f"QuantizedTensor(shape={self.shape}, format={self.format!r}, bits={self.bits}, "
                f"group_size={self.group_size}{dq}{extra})")


def _check_leaf(name: str, leaf, tail: tuple, kind: str, batch: list, why: str) -> None:
    """``leaf`` (when array-like) must end in ``tail`` with a dtype of ``kind``; the axes in front
    (a vmap / scan batch) must be the same for every leaf (``batch`` holds the first leaf's)."""
    if not is_arraylike(leaf):
        return
    shape = tuple(leaf.shape)
    k = len(shape) - len(tail)
    if k < 0 or shape[k:] != tail or (batch and shape[:k] != batch[0]):
        want = tail if not batch or not batch[0] else tuple(batch[0]) + tail
        raise ValueError(f"{name}: shape {shape}, expected {want} {why}")
    if not batch:
        batch.append(shape[:k])
    dt = leaf.dtype
    if dt == jax.dtypes.float0:  # cotangent placeholders
        return
    ok = {"uint32": dt == np.uint32, "int": jnp.issubdtype(dt, jnp.integer),
          "float": jnp.issubdtype(dt, jnp.floating)}[kind]
    if not ok:
        want = {"uint32": "uint32", "int": "an integer dtype", "float": "a floating dtype"}[kind]
        raise ValueError(f"{name}: dtype {dt}, expected {want}")


_QT_ARRAYS = ("data", "scales", "zeros", "col_scale", "perm")

jax.tree_util.register_dataclass(
    QuantizedTensor,
    data_fields=list(_QT_ARRAYS),
    meta_fields=["shape", "bits", "group_size", "format", "levels", "per_tensor"],
)
register_node("qtensor", QuantizedTensor)
