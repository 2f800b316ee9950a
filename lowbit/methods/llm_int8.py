"""LLM.int8(): int8 weights with a mixed-precision decomposition of outlier features at matmul
time (Dettmers, Lewis, Belkada, Zettlemoyer; NeurIPS 2022), as bitsandbytes computes it.

**Weights** (bitsandbytes ``Int8Params`` / ``int8_vectorwise_quant(W)``): row-wise (per output
channel) absmax int8. For ``W (out, in)``::

    absmax[r] = max_c |W[r, c]|                     float32, bitsandbytes' ``SCB``
    codes[r]  = clip(round(W[r] * (127 / absmax[r])), -127, 127)     int8, bitsandbytes' ``CB``
    dequantize(W)[r] = codes[r] * absmax[r] / 127   (the step is ``absmax / 127``)

**Matmul** ``linear(x, w)`` for ``x (..., in)`` (bitsandbytes ``MatMul8bitLt.forward`` with
``has_fp16_weights=False``: ``int8_vectorwise_quant(A, threshold)`` then ``int8_mixed_scaled_mm``)::

    A = x as (tokens, in)                          every token of the call (batch and sequence)
    big[t, c]   = |A[t, c]| >= threshold            outlier entries
    outlier[c]  = any_t big[t, c]                   outlier columns (input features)
    sx[t]  = max_c |A[t, c]| over entries not big   per-token absmax (bitsandbytes' ``SCA``)
    CA[t]  = round(A[t] * (127 / sx[t])), big entries and every outlier column set to 0   int8
    y  = (CA @ codes.T  as int8 x int8 -> int32) * (sx[:, None] * absmax[None, :]) / 127**2
       + A[:, outlier] @ dequantize(W)[:, outlier].T                       float

``threshold = 0`` disables the decomposition: every column takes the int8 path. That is the
default of bitsandbytes' ``Linear8bitLt`` (``threshold=0.0``); the paper's (and transformers'
``BitsAndBytesConfig(llm_int8_threshold=6.0)``) value is :data:`DEFAULT_THRESHOLD` = 6.0, this
method's default.

What bitsandbytes does and we follow (``bitsandbytes/autograd/_functions.py`` ``MatMul8bitLt``,
``bitsandbytes/backends/default/ops.py`` ``int8_vectorwise_quant`` / ``int8_mixed_scaled_mm`` /
``int8_mm_dequant`` / ``int8_vectorwise_dequant``, ``csrc/kernels.cu`` ``kInt8VectorQuant`` /
``kdequant_mm_int32_fp16``):

* outliers are *entries* with ``|a| >= threshold`` (``>=``, not ``>``); a column is an outlier
  column when any token of the call has one, so the decomposition depends on the whole batch, not
  on one token;
* the per-token absmax ignores only the outlier *entries* (the CUDA kernel skips values
  ``>= threshold``, the default backend zeroes them before the max); the other entries of an
  outlier column still count toward their token's absmax. The int8 codes of every outlier column
  are then zeroed, so those columns reach the output only through the float path;
* the float path multiplies the activations' outlier columns, unquantized, by the *dequantized*
  int8 weight columns (``CB[:, cols] * SCB / 127``): with int8 weights the float weights are gone;
* rescaling ``int32 * sx * sw * (1 / 127**2)``; rounding half to even (``torch.round`` /
  ``__float2int_rn``, as ``jnp.round``); codes of activations and weights in ``[-127, 127]``.

Deviations (deliberate, none changes the algorithm):

* no float16 casts: bitsandbytes casts activations and weights to float16 before quantizing and
  computes the float path and the output in float16; here the quantization statistics, the
  rescaling and the float path are float32 (activations of any float dtype are upcast) and the
  result is cast back to ``x.dtype``. The threshold comparison therefore sees the float32 values;
* the rescale constant is exactly ``1 / 127**2`` (= 6.2000124e-05; the CUDA kernel's
  ``MM_DEQUANT_CONST`` 6.200012e-05 is that constant; the default / CPU backend's literal
  6.200124e-05 is 1.8e-5 relatively off);
* an all-zero weight row or token row (absmax 0) gets codes 0 and contributes 0 (bitsandbytes
  divides by zero there: ``127 / 0 * 0`` is NaN);
* no dynamic shapes: instead of gathering the outlier columns (``A[:, outlier_cols]``), the float
  path is ``(A * outlier) @ dequantize(W).T`` with a boolean column mask, so ``linear`` jits with
  data-dependent outliers. That float matmul is dense over all columns (it costs as much as a
  float matmul), and it is skipped with ``lax.cond`` when the call has no outlier column;
* inference only: no custom gradient (bitsandbytes' ``MatMul8bitLt.backward`` is for
  ``has_fp16_weights=True`` training).

**The weight type** :class:`Int8Weight` (children ``codes``, ``absmax``; static ``threshold``) is
what :func:`lowbit.ops.linear` dispatches to :func:`int8_matmul`, inside a model's jitted forward
like any other weight; :mod:`lowbit.io.checkpoint` stores it, :func:`with_threshold` changes the
threshold of a quantized model without re-quantizing it.

**The method** ``llm_int8`` (``{method: llm_int8, quant: {bits: 8}, llm_int8: {threshold: 6.0}}``):
the weights are data-free (round to nearest per row); the calibration data only feed the report:
per linear, ``outlier_frac`` (fraction of input-feature columns with ``|x| >= threshold`` on some
calibration token), ``outlier_frac_batch`` (the mean fraction per calibration batch, what one
matmul call of that size decomposes) and ``act_absmax`` (largest ``|x|`` seen); with threshold 0
both fractions are 0. The driver's ``rel_out_err`` of an ``llm_int8`` weight is the error of the
whole int8 matmul (activation quantization and decomposition included). The row's quant spec
must say ``bits: 8`` and ``format: int`` (anything else is an error rather than silently a
different format), and must not ask for ``clip``, ``double_quant`` or ``per_tensor``; its
``group_size``, ``symmetric``, ``partial_groups`` and ``scale_dtype`` are ignored, because
LLM.int8() fixes them (one float32 absmax per output row) and a config row always carries the
:class:`~lowbit.runner.config.QuantCfg` defaults (``group_size: 128``) whether written or not.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowbit import ops
from lowbit.core import transforms
from lowbit.core.nodes import register_node
from lowbit.core.qtensor import QuantizedMatrix, QuantSpec
from lowbit.core.quantizers import check_matrix
from lowbit.methods.registry import register
from lowbit.core.checks import float_matrix, is_arraylike, is_real

__all__ = ["Int8Weight", "LLMInt8Options", "OutlierStat", "DEFAULT_THRESHOLD", "QMAX", "MM_DEQUANT",
           "quantize_weight", "quantize_rows", "outlier_columns", "int8_matmul", "with_threshold", "llm_int8"]

#: the paper's outlier threshold (bitsandbytes' ``Linear8bitLt`` defaults to 0.0: no decomposition)
DEFAULT_THRESHOLD = 6.0
#: largest int8 code magnitude (symmetric: codes in ``[-127, 127]``)
QMAX = 127
#: ``1 / 127**2``: rescales ``int32`` products of two absmax-scaled operands
MM_DEQUANT = 1.0 / (QMAX * QMAX)


def check_threshold(threshold, name: str = "threshold") -> float:
    """``threshold`` as a float, or a ValueError unless it is a finite real ``>= 0``."""
    if not (is_real(threshold) and math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"{name}={threshold!r}: expected a finite outlier threshold >= 0 (|x| >= threshold "
                         f"marks an outlier feature; 0 disables the decomposition; the paper uses "
                         f"{DEFAULT_THRESHOLD})")
    return float(threshold)


# ----------------------------------------------------------------------------- the weight type


@dataclasses.dataclass(frozen=True)
class Int8Weight(QuantizedMatrix):
    """An LLM.int8() linear weight ``(out, in)``: ``codes (out, in)`` int8 in ``[-127, 127]`` and the
    per-row ``absmax (out,)`` float32, with the static outlier ``threshold`` of its matmul (see the
    module docstring). A pytree (``threshold`` is aux data: part of ``jax.jit``'s cache key).

    Like a :class:`~lowbit.core.qtensor.QuantizedTensor` it has ``shape == (out, in)`` and no ``T``:
    use :func:`lowbit.ops.linear`, or :meth:`dequantize` for a dense matrix.
    """

    codes: jax.Array
    absmax: jax.Array
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self):
        check_threshold(self.threshold, "Int8Weight.threshold")
        # JAX rebuilds nodes from placeholders in tree_unflatten (None, object(), vmap specs): only
        # check when the children are arrays.
        if not (is_arraylike(self.codes) and is_arraylike(self.absmax)):
            return
        if self.codes.ndim != 2 or self.codes.dtype != jnp.int8:
            raise ValueError(f"Int8Weight: codes must be a 2-D (out, in) int8 array, got "
                             f"{self.codes.dtype}{list(self.codes.shape)}")
        if tuple(self.absmax.shape) != (self.codes.shape[0],) or not jnp.issubdtype(self.absmax.dtype, jnp.floating):
            raise ValueError(f"Int8Weight: absmax must be a float ({self.codes.shape[0]},) array (one per output "
                             f"row of codes {list(self.codes.shape)}), got {self.absmax.dtype}{list(self.absmax.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def dtype(self):
        """The dtype of :meth:`dequantize` (float32)."""
        return jnp.dtype(jnp.float32)

    @property
    def bits(self) -> int:
        return 8

    @property
    def T(self):
        raise TypeError("Int8Weight has no transpose; use lowbit.ops.linear, or .dequantize() for a dense matrix")

    def dequantize(self, dtype=jnp.float32):
        """The dense ``(out, in)`` matrix ``codes * absmax / 127`` (bitsandbytes' ``int8_vectorwise_dequant``)."""
        return _dequantize(self.codes, self.absmax).astype(dtype)

    def bits_per_param(self) -> float:
        """8-bit codes plus one float32 absmax per output row."""
        out, inp = self.shape
        return 8.0 + 8.0 * np.dtype(self.absmax.dtype).itemsize * out / (out * inp)

    def describe(self) -> dict:
        """The calibration driver's report fields (one absmax per output row: a group is a whole row)."""
        return dict(format="llm_int8", bits=8, group_size=self.shape[1], act_order=False,
                    bits_per_param=self.bits_per_param(), threshold=self.threshold)

    def ckpt_fields(self) -> tuple[dict, dict]:
        return {"codes": self.codes, "absmax": self.absmax}, {"threshold": float(self.threshold)}

    @classmethod
    def from_ckpt(cls, fields: dict, meta: dict) -> "Int8Weight":
        return cls(codes=fields["codes"], absmax=fields["absmax"], threshold=float(meta["threshold"]))

    def __repr__(self):
        return f"Int8Weight(shape={self.shape}, threshold={self.threshold:g})"


jax.tree_util.register_dataclass(Int8Weight, data_fields=["codes", "absmax"], meta_fields=["threshold"])
register_node("int8", Int8Weight)


def _dequantize(codes, absmax):
    return codes.astype(jnp.float32) * absmax.astype(jnp.float32)[:, None] * (1.0 / QMAX)


# ----------------------------------------------------------------------------- the pure core


def _absmax_codes(a, absmax):
    """``clip(round(a * (127 / absmax)), -127, 127)`` int8 per row of ``a``; rows with absmax 0 -> 0."""
    inv = jnp.where(absmax > 0, QMAX / jnp.where(absmax > 0, absmax, 1.0), 0.0)
    return jnp.clip(jnp.round(a * inv[:, None]), -QMAX, QMAX).astype(jnp.int8)


@functools.partial(jax.jit, static_argnames=("threshold",))
def quantize_rows(a, threshold: float = 0.0):
    """Row-wise absmax int8 quantization of ``a (rows, cols)`` with outlier columns held out
    (bitsandbytes' ``int8_vectorwise_quant(A, threshold)``).

    Returns ``(codes (rows, cols) int8, absmax (rows,) float32, outlier (cols,) bool)``. With
    ``threshold > 0`` the entries ``|a| >= threshold`` are left out of their row's absmax and the
    codes of every column holding one (``outlier``) are 0; ``threshold = 0``: plain row-wise absmax
    and no outlier column.
    """
    a = jnp.asarray(a).astype(jnp.float32)
    if threshold > 0:
        big = jnp.abs(a) >= threshold
        outlier = jnp.any(big, axis=0)
        kept = jnp.where(big, 0.0, a)
    else:
        outlier = jnp.zeros(a.shape[-1], bool)
        kept = a
    absmax = jnp.max(jnp.abs(kept), axis=-1, initial=0.0)
    codes = _absmax_codes(kept, absmax)
    if threshold > 0:
        codes = jnp.where(outlier[None, :], jnp.int8(0), codes)
    return codes, absmax, outlier


def outlier_columns(x, threshold: float):
    """``(in,)`` bool: the columns (last axis) of ``x (..., in)`` where some entry has
    ``|x| >= threshold``; none when ``threshold == 0``."""
    threshold = check_threshold(threshold)
    x = jnp.asarray(x)
    if threshold == 0:
        return jnp.zeros(x.shape[-1], bool)
    return jnp.any(jnp.abs(x.reshape(-1, x.shape[-1]).astype(jnp.float32)) >= threshold, axis=0)


def quantize_weight(W, threshold: float = DEFAULT_THRESHOLD) -> Int8Weight:
    """LLM.int8() weight ``W (out, in)`` -> :class:`Int8Weight` (row-wise absmax int8) whose matmul
    decomposes at ``threshold``."""
    threshold = check_threshold(threshold)
    W = check_matrix(W, "W")
    codes, absmax, _ = quantize_rows(W, 0.0)
    return Int8Weight(codes, absmax, threshold)


def _int8_dot(ca, cb):
    """``ca (t, in) @ cb (out, in).T`` as an int8 x int8 -> int32 matmul."""
    return jax.lax.dot_general(ca, cb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)


def int8_matmul(x, w: Int8Weight):
    """``y (..., out)`` = LLM.int8() ``x @ W.T`` for ``x (..., in)`` and an :class:`Int8Weight` (see the
    module docstring), in ``x.dtype``. Traceable: outlier columns are a boolean mask, not a gather."""
    if not isinstance(w, Int8Weight):
        raise ValueError(f"w: expected an Int8Weight, got {type(w).__name__}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x: expected floating activations, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"x: last axis {x.shape[-1] if x.ndim else None} does not match in_features "
                         f"{w.shape[1]} of {w!r}")
    return _int8_matmul(x, w)


@jax.jit
def _int8_matmul(x, w: Int8Weight):
    lead, k = x.shape[:-1], x.shape[-1]
    a = x.reshape(-1, k).astype(jnp.float32)
    ca, sx, outlier = quantize_rows(a, w.threshold)
    acc = _int8_dot(ca, w.codes)
    y = acc.astype(jnp.float32) * (sx[:, None] * w.absmax.astype(jnp.float32)[None, :]) * MM_DEQUANT
    if w.threshold > 0:
        def float_path(y):
            sub = jnp.where(outlier[None, :], a, 0.0)
            return y + sub @ _dequantize(w.codes, w.absmax).T

        y = jax.lax.cond(jnp.any(outlier), float_path, lambda y: y, y)
    return y.reshape(*lead, w.shape[0]).astype(x.dtype)


ops.register_matmul(Int8Weight, int8_matmul)


def with_threshold(tree, threshold: float):
    """``tree`` with every :class:`Int8Weight` switched to ``threshold`` (codes and scales shared):
    evaluate one quantized model at several thresholds without re-quantizing."""
    threshold = check_threshold(threshold)
    return jax.tree_util.tree_map(
        lambda v: dataclasses.replace(v, threshold=threshold) if isinstance(v, Int8Weight) else v, tree,
        is_leaf=lambda v: isinstance(v, Int8Weight))


# ----------------------------------------------------------------------------- the transform


class OutlierStat(NamedTuple):
    """Calibration statistics of one linear's inputs (for the report; the weights don't use them)."""
    colmax: jax.Array       # (in,) float32: max |x| per input column over every calibration token
    frac_sum: jax.Array     # float32: sum over batches of that batch's outlier-column fraction
    n: jax.Array            # float32: number of batches folded in


@jax.jit
def _batch_stats(x, threshold):
    ax = jnp.abs(x.reshape(-1, x.shape[-1]).astype(jnp.float32))
    colmax = jnp.max(ax, axis=0, initial=0.0)
    frac = jnp.where(threshold > 0, jnp.mean(colmax >= threshold), 0.0)
    return colmax, frac


@jax.jit
def _fold(stat: OutlierStat, colmax, frac) -> OutlierStat:
    return OutlierStat(jnp.maximum(stat.colmax, colmax), stat.frac_sum + frac, stat.n + 1)


@dataclasses.dataclass(frozen=True)
class LLMInt8Options:
    """Options of the ``llm_int8`` method."""
    #: ``|x| >= threshold`` marks an outlier feature (0: no decomposition, bitsandbytes' default)
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self):
        # checked here so that a bad CLI flag or config value fails before any model is loaded
        check_threshold(self.threshold)


def check_spec(spec: QuantSpec | None) -> None:
    """A ValueError unless ``spec`` is compatible with LLM.int8() (``bits=8``, ``format="int"``, no
    clip / double quantization / per-tensor scale); ``None`` is accepted (see the module docstring
    for the fields that are ignored)."""
    if spec is None:
        return
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"spec: expected a QuantSpec or None, got {type(spec).__name__}")
    if spec.bits != 8 or spec.format != "int":
        raise ValueError(f"quant: llm_int8 stores int8 weights; expected bits: 8 and format: int, got bits: "
                         f"{spec.bits} and format: {spec.format}")
    asked = [f for f in ("clip", "double_quant", "per_tensor") if getattr(spec, f)]
    if asked:
        raise ValueError(f"quant: llm_int8 has one float32 absmax per output row; {', '.join(asked)} "
                         f"cannot apply (set {', '.join(f + ': false' for f in asked)})")


@register("llm_int8", options=LLMInt8Options,
          help="LLM.int8(): int8 weights, outlier features in float at matmul time (Dettmers et al. 2022)",
          # one absmax per output row whatever quant.group_size says
          report=lambda spec: {"bits": spec.bits, "group_size": None})
def _llm_int8_method(spec: QuantSpec | None, opts: LLMInt8Options) -> transforms.Transform:
    check_spec(spec)
    return llm_int8(opts.threshold)


def llm_int8(threshold: float = DEFAULT_THRESHOLD) -> transforms.Transform:
    """LLM.int8() as a :class:`~lowbit.core.transforms.Transform`.

    ``init`` allocates an :class:`OutlierStat` per 2-D weight, ``update`` folds in each weight's input
    activations (an input shared by several weights, e.g. q/k/v, is reduced once) and hands them on
    unchanged, and ``apply`` replaces every weight by :func:`quantize_weight` (data-free) and returns
    per-weight metrics ``outlier_frac``, ``outlier_frac_batch`` and ``act_absmax`` (NaN when no
    calibration data reached the weight). ``apply`` is traceable.
    """
    threshold = check_threshold(threshold)

    def init(params):
        stats = {}
        for path, w in params.items():
            float_matrix(path, w, "llm_int8")
            stats[path] = OutlierStat(jnp.zeros((w.shape[1],), jnp.float32), jnp.float32(0), jnp.float32(0))
        return stats

    def update(stats, acts, context=None):
        del context
        return transforms.fold_inputs(stats, acts, lambda x: _batch_stats(x, jnp.float32(threshold)), _fold,
                                      lambda stat: stat.colmax.shape[0]), acts

    def apply(params, stats):
        out, metrics = {}, {}
        for path, w in params.items():
            try:
                out[path] = quantize_weight(w, threshold)
            except ValueError as e:
                raise ValueError(f"params[{path!r}]: {e}") from None
            stat = stats[path]
            seen = stat.n > 0
            frac = jnp.mean(stat.colmax >= threshold) if threshold > 0 else jnp.float32(0)
            metrics[path] = {"outlier_frac": jnp.where(seen, frac, jnp.nan),
                             "outlier_frac_batch": jnp.where(seen, stat.frac_sum / jnp.maximum(stat.n, 1), jnp.nan),
                             "act_absmax": jnp.where(seen, jnp.max(stat.colmax), jnp.nan)}
        return out, metrics

    return transforms.Transform(init, update, apply)
