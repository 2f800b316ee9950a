"""Data-free quantizers: ``quantize(w, spec) -> QuantizedTensor`` and ``dequantize(q) -> array``.

The element-level primitives (:func:`compute_params`, :func:`quantize_codes`,
:func:`dequantize_codes`) are shared with the calibration algorithms (GPTQ quantizes one column at a
time with them), so every method rounds onto exactly the same grids.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.core import numerics
from lowbit.core.pack import pack, unpack
from lowbit.core.qtensor import QuantizedTensor, QuantSpec

__all__ = ["quantize", "nf4_qlora_spec", "scale_table", "dequantize", "fake_quant", "qlinear", "bits_per_param",
           "compute_params", "quantize_codes", "dequantize_codes", "QParams", "check_matrix", "resolve_group_size",
           "group_params", "pack_result", "grouped", "check_scales"]


class QParams(NamedTuple):
    scale: jax.Array          # float32, stored precision
    zero: jax.Array | None    # float32 integer-valued zero code (asymmetric "int" only)


# ----------------------------------------------------------------------------- validation

def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_matrix(w, name: str = "w"):
    """Return ``w`` as a float array after checking it is a finite, non-empty 2-D float matrix."""
    if not hasattr(w, "shape") or not hasattr(w, "dtype"):
        raise ValueError(f"{name}: expected a 2-D float array, got {type(w).__name__}")
    if w.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (out_features, in_features) matrix, got shape {tuple(w.shape)}"
                         + (" (use jax.vmap for stacks of matrices)" if w.ndim > 2 else ""))
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating dtype, got {w.dtype}")
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty matrix, got shape {tuple(w.shape)}")
    if not _is_tracer(w) and not bool(jnp.isfinite(w).all()):
        raise ValueError(f"{name}: contains NaN or Inf values; quantizing them would produce garbage")
    return jnp.asarray(w)


@jax.jit
def _stored_finite(q: QuantizedTensor):
    """One device-side reduction: are all floating leaves of ``q`` (scales, double-quant offset and
    nested scales, OneBit value vectors) finite?"""
    leaves = [x for x in jax.tree_util.tree_leaves(q) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def check_scales(q: QuantizedTensor, w, spec: QuantSpec, name: str = "w") -> QuantizedTensor:
    """Raise a ValueError when a stored scale of ``q`` (quantized from ``w``) is not finite, e.g. a
    float16 scale of a weight near 1e6 (65504 is float16's largest value): dequantizing would give
    NaN/Inf silently. One host sync at the API boundary; skipped under tracing (no values)."""
    if any(_is_tracer(x) for x in jax.tree_util.tree_leaves(q)) or _is_tracer(w):
        return q
    if bool(_stored_finite(q)):
        return q
    m = float(jnp.max(jnp.abs(jnp.asarray(w, jnp.float32))))
    dt = spec.scale_dtype
    if dt == "float32":
        raise ValueError(f"{name}: max |{name}| = {m:.4g} is too large to quantize: its scales overflow "
                         f"float32 (rescale the weights)")
    raise ValueError(f"{name}: max |{name}| = {m:.4g} gives a quantization scale that is not finite in "
                     f"scale_dtype={dt!r} (largest finite {dt}: {float(jnp.finfo(dt).max):.4g}); dequantizing "
                     f"would give NaN/Inf: quantize with scale_dtype=\"float32\"")


def resolve_group_size(spec: QuantSpec, cols: int) -> int:
    """Columns per group for a matrix with ``cols`` input features."""
    if spec.per_tensor or spec.group_size is None:
        return cols
    if cols % spec.group_size and not spec.partial_groups:
        raise ValueError(f"group_size={spec.group_size} must divide in_features={cols} (pick a divisor of "
                         f"{cols}, group_size=None for per-channel, or partial_groups=True for a shorter last "
                         f"group as the GPTQ reference does)")
    return spec.group_size


def grouped(x, g: int):
    """``(rows, cols) -> (rows, ceil(cols / g), g)``, zero-padding a partial last group, and the
    matching boolean mask of real (non-padding) elements."""
    rows, cols = x.shape
    ng = -(-cols // g)
    pad = ng * g - cols
    valid = None
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)))
        valid = (jnp.arange(ng * g) < cols).reshape(1, ng, g)
    return x.reshape(rows, ng, g), valid


# ----------------------------------------------------------------------------- element primitives

def _store(scale, spec: QuantSpec):
    """Round a float32 scale *up* to its storage dtype (and back), so codes are computed against
    the stored value and the range [lo, hi] still fits in the grid (error <= half a step)."""
    dt = jnp.dtype(spec.scale_dtype)
    s = scale.astype(dt)
    s = jnp.where(s.astype(jnp.float32) < scale, jnp.nextafter(s, jnp.asarray(jnp.inf, dt)), s)
    return s.astype(jnp.float32)


def _levels(spec_or_q) -> tuple[float, ...] | None:
    return spec_or_q.table if isinstance(spec_or_q, QuantSpec) else spec_or_q.levels


def _maxq(spec: QuantSpec, bits=None):
    """The largest int code: ``2**bits - 1``; ``bits`` (a traced per-group width, int format only)
    overrides ``spec.bits``."""
    return 2**spec.bits - 1 if bits is None else 2.0**bits - 1.0


def _raw_scale_and_zero(lo, hi, spec: QuantSpec, bits=None):
    maxq = _maxq(spec, bits)
    if spec.format == "int":
        if spec.symmetric:
            a = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
            a = jnp.where(a == 0, 1.0, a)
            return _store(2 * a / maxq, spec), None
        degenerate = (lo == 0) & (hi == 0)
        lo, hi = jnp.where(degenerate, -1.0, lo), jnp.where(degenerate, 1.0, hi)
        scale = _store((hi - lo) / maxq, spec)
        scale = jnp.where(scale == 0, jnp.finfo(jnp.float32).tiny, scale)  # underflow in fp16
        return scale, jnp.clip(jnp.round(-lo / scale), 0, maxq)
    # table formats: absmax onto the largest |level|
    a = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    a = jnp.where(a == 0, 1.0, a)
    top = float(np.max(np.abs(spec.table)))
    scale = _store(a / top, spec)
    return jnp.where(scale == 0, jnp.finfo(jnp.float32).tiny, scale), None


def quantize_codes(x, scale, zero, spec: QuantSpec, bits=None):
    """Round ``x`` onto the grid given by broadcastable ``scale``/``zero``; returns uint8 codes.
    ``bits`` (int format): a width that overrides ``spec.bits`` (may be traced: per-group widths)."""
    if spec.format == "int":
        maxq = _maxq(spec, bits)
        z = (2 ** (spec.bits - 1) if bits is None else 2.0 ** (bits - 1)) if zero is None else zero
        return jnp.clip(jnp.round(x / scale) + z, 0, maxq).astype(jnp.uint8)
    if spec.format in ("sign", "onebit"):
        return (x >= 0).astype(jnp.uint8)
    return numerics.nearest_level(x / scale, spec.table)


def dequantize_codes(codes, scale, zero, *, format: str, bits: int, levels=None):
    """Map codes back to values: the element-level form of the :class:`QuantizedTensor` invariant."""
    c = codes.astype(jnp.float32)
    if format == "int":
        z = 2.0 ** (bits - 1) if zero is None else zero
        return (c - z) * scale
    if format in ("sign", "onebit"):
        return (2.0 * c - 1.0) * scale
    return jnp.asarray(levels, jnp.float32)[codes.astype(jnp.int32)] * scale


def compute_params(x, spec: QuantSpec, valid=None, bits=None) -> QParams:
    """Scale (and zero) for each group: ``x (..., n)`` reduced over its last axis -> ``(...)``.

    ``valid`` (broadcastable boolean, optional) marks real elements when groups are zero-padded;
    zeros never change the min/max range (it always contains 0), but they must not count in a mean
    or in the clipping error. ``bits`` (int format): a width overriding ``spec.bits`` (may be
    traced: GPTQ with a bit width per group).

    With ``spec.clip`` the range is shrunk by the factor in ``{1 - i / clip_grid}`` that minimises
    ``sum |x - deq(q(x))| ** clip_norm`` per group (a ``lax.fori_loop`` over candidates).
    """
    x = x.astype(jnp.float32)
    if spec.format in ("sign", "onebit"):
        if valid is None:
            return QParams(_store(jnp.mean(jnp.abs(x), axis=-1), spec), None)
        count = jnp.maximum(jnp.sum(jnp.broadcast_to(valid, x.shape), axis=-1), 1)
        return QParams(_store(jnp.sum(jnp.where(valid, jnp.abs(x), 0.0), axis=-1) / count, spec), None)
    lo = jnp.minimum(x.min(axis=-1), 0.0)
    hi = jnp.maximum(x.max(axis=-1), 0.0)
    if not spec.clip:
        return QParams(*_raw_scale_and_zero(lo, hi, spec, bits))

    def err(p):
        s, z = _raw_scale_and_zero(p * lo, p * hi, spec, bits)
        zz = None if z is None else z[..., None]
        q = dequantize_codes(quantize_codes(x, s[..., None], zz, spec, bits), s[..., None], zz,
                             format=spec.format, bits=spec.bits if bits is None else bits, levels=spec.table)
        e = jnp.abs(q - x) ** spec.clip_norm
        return jnp.sum(e if valid is None else jnp.where(valid, e, 0.0), axis=-1)

    def body(i, carry):
        best_p, best_err = carry
        p = 1.0 - i / spec.clip_grid
        e = err(p)
        better = e < best_err
        return jnp.where(better, p, best_p), jnp.where(better, e, best_err)

    n = int(spec.clip_maxshrink * spec.clip_grid)
    best_p, _ = jax.lax.fori_loop(1, n, body, (jnp.ones_like(lo), err(1.0)))
    return QParams(*_raw_scale_and_zero(best_p * lo, best_p * hi, spec, bits))


# ----------------------------------------------------------------------------- quantize / dequantize

def _double_quantize(scale, spec: QuantSpec):
    """QLoRA double quantization: (scales - mean) in blocks of ``dq_block``, to a symmetric
    ``dq_bits`` integer grid (``dq_map="linear"``) or to bitsandbytes' dynamic map (``"dynamic"``)."""
    flat = scale.reshape(-1).astype(jnp.float32)
    offset = jnp.mean(flat)
    n = flat.shape[0]
    nb = -(-n // spec.dq_block)
    blocks = jnp.pad(flat - offset, (0, nb * spec.dq_block - n)).reshape(nb, spec.dq_block)
    if spec.dq_map == "dynamic":
        nested = _dynamic_blockwise(blocks)
    else:
        inner = QuantSpec(bits=spec.dq_bits, group_size=None, symmetric=True, scale_dtype="float32")
        nested = _quantize_impl(blocks, inner)
    return (nested, offset.reshape(1).astype(jnp.float32))


def _dynamic_blockwise(blocks) -> QuantizedTensor:
    """bitsandbytes' ``quantize_blockwise`` (default dynamic code) of float32 ``blocks (nb, B)``, one
    block per row: ``absmax = max |block|`` (float32, stored as is), codes = nearest entry of
    :data:`numerics.DYNAMIC_MAP` to ``x * (1 / absmax)`` (the kernel multiplies by the float32
    reciprocal) with the CUDA kernel's tie rule; a block of zeros stores absmax 0 and codes 0 (what
    bitsandbytes writes). Zero padding in the last block never changes its absmax and maps to the
    exact 0 code. Dequantizes (codebook format) as ``DYNAMIC_MAP[code] * absmax``, bitsandbytes'
    ``dequantize_blockwise``."""
    nb, b = blocks.shape
    absmax = jnp.max(jnp.abs(blocks), axis=1, keepdims=True)
    inv = 1.0 / jnp.where(absmax == 0, 1.0, absmax)
    codes = numerics.nearest_dynamic_code(blocks * inv)
    codes = jnp.where(absmax == 0, jnp.uint8(0), codes)
    return QuantizedTensor(data=pack(codes, 8), scales=absmax, shape=(nb, b), bits=8, group_size=b,
                           format="codebook", levels=numerics.DYNAMIC_MAP, per_tensor=False)


def scale_table(q: QuantizedTensor):
    """The logical ``(rows or 1, n_groups)`` float32 scale table of ``q``.

    Double-quantized: ``dequantize(nested) + offset``, two float32 roundings as bitsandbytes'
    ``dequantize_blockwise(...) + offset``. (Inside a larger jitted computation XLA may fuse the
    multiply and the add into one FMA: the same value or 1 ulp closer to exact.)"""
    if isinstance(q.scales, tuple):  # double quantization: (nested QuantizedTensor, offset)
        nested, offset = q.scales
        rows, groups = q.scale_shape
        flat = dequantize(nested).reshape(-1)[: rows * groups] + offset[0]
        return flat.reshape(rows, groups)
    return q.scales.astype(jnp.float32)


def group_params(w, spec: QuantSpec):
    """Per-group quantization parameters of a float32 ``(rows, cols)`` matrix.

    Returns ``(scale, zero, scales_leaf)``: ``scale`` is the float32 ``(rows or 1, n_groups)`` table
    *as stored* (after fp16 rounding or double quantization), ``zero`` the matching float32 integer
    zero codes or ``None``, and ``scales_leaf`` what a :class:`QuantizedTensor` stores in ``scales``.
    """
    return _group_params(w, spec)[2:]


def _group_params(w, spec: QuantSpec):
    """:func:`group_params` plus the scale and zero *before* double quantization (what the scales
    were computed as; the same as stored without ``double_quant``):
    ``(raw_scale, raw_zero, stored_scale, stored_zero, scales_leaf)``."""
    rows, cols = w.shape
    g = resolve_group_size(spec, cols)
    if spec.per_tensor:
        red, valid = w.reshape(1, 1, rows * cols), None
    else:
        red, valid = grouped(w, g)
    scale, zero = compute_params(red, spec, valid)
    if not spec.double_quant:
        return scale, zero, scale, zero, scale.astype(spec.scale_dtype)
    raw_scale, raw_zero = scale, zero
    scales_leaf = _double_quantize(scale, spec)
    tmp = QuantizedTensor(data=None, scales=scales_leaf, group_size=g, shape=(rows, cols), bits=spec.bits,
                          format=spec.format, levels=spec.table, per_tensor=spec.per_tensor)
    stored = scale_table(tmp)
    if zero is not None:  # the zero point follows the scale actually stored
        lo = jnp.minimum(red.min(axis=-1), 0.0)
        zero = jnp.clip(jnp.round(-lo / stored), 0, 2**spec.bits - 1)
    return raw_scale, raw_zero, stored, zero, scales_leaf


def svid_svd(w):
    """OneBit's sign-value-independent decomposition by the leading singular pair of ``|w|``:
    ``|w| ~ outer(a, b)`` with ``a = |u_1| sqrt(s_1)``, ``b = |v_1| sqrt(s_1)`` (float32; ``|w|`` is
    non-negative, so its leading singular vectors are, up to one common sign). Traceable."""
    u, s, vt = jnp.linalg.svd(jnp.abs(jnp.asarray(w, jnp.float32)), full_matrices=False)
    r = jnp.sqrt(s[0])
    return jnp.abs(u[:, 0]) * r, jnp.abs(vt[0]) * r


@functools.partial(jax.jit, static_argnames="spec")
def _quantize_impl(w, spec: QuantSpec) -> QuantizedTensor:
    rows, cols = w.shape
    w = w.astype(jnp.float32)
    meta = dict(shape=(rows, cols), bits=spec.bits, format=spec.format, levels=spec.table,
                per_tensor=spec.per_tensor)
    if spec.format == "onebit":
        # SVID: sign(W) and the rank-1 approximation |W| ~ a b^T from the leading singular pair.
        a, b = svid_svd(w)
        codes = quantize_codes(w, None, None, spec)
        return QuantizedTensor(data=pack(codes, 1), scales=a[:, None].astype(spec.scale_dtype),
                               col_scale=b.astype(spec.scale_dtype), group_size=cols, **meta)
    g = resolve_group_size(spec, cols)
    wg, _ = grouped(w, g)
    raw_scale, raw_zero, scale, zero, scales_leaf = _group_params(w, spec)
    if spec.double_quant and spec.dq_map == "dynamic":
        # bitsandbytes (quantize_4bit with compress_statistics=True) rounds the weights against the
        # exact absmax and compresses the statistics afterwards; "linear" rounds against the stored ones.
        scale, zero = raw_scale, raw_zero
    zz = None if zero is None else zero[..., None]
    codes = quantize_codes(wg, scale[..., None], zz, spec).reshape(rows, -1)[:, :cols]
    return pack_result(codes, scales_leaf, zero, spec, group_size=g)


def pack_result(codes, scales_leaf, zero, spec: QuantSpec, *, group_size: int, perm=None) -> QuantizedTensor:
    """Assemble a :class:`QuantizedTensor` from uint8 ``codes (rows, cols)`` and its group parameters."""
    zeros = None if zero is None else pack(zero.astype(jnp.uint8), spec.bits)
    return QuantizedTensor(data=pack(codes, spec.bits), scales=scales_leaf, zeros=zeros, perm=perm,
                           shape=tuple(codes.shape), bits=spec.bits, group_size=group_size,
                           format=spec.format, levels=spec.table, per_tensor=spec.per_tensor)


def nf4_qlora_spec(**overrides) -> QuantSpec:
    """QLoRA's base-weight format (NF4, groups of 64, bitsandbytes' double quantization of the
    float32 absmax in blocks of 256 with the dynamic map): :meth:`QuantSpec.qlora_nf4`, 4.127 bits
    per parameter."""
    return QuantSpec.qlora_nf4(**overrides)


def quantize(w, spec: QuantSpec) -> QuantizedTensor:
    """Quantize a ``(out_features, in_features)`` matrix; groups run along ``in_features``."""
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"spec: expected a QuantSpec, got {type(spec).__name__}")
    w = check_matrix(w, "w")
    resolve_group_size(spec, w.shape[1])
    return check_scales(_quantize_impl(w, spec), w, spec, "w")


def dequantize(q: QuantizedTensor, dtype=jnp.float32, *, unpermute: bool = True):
    """Reconstruct the matrix (see the invariant in :mod:`lowbit.core.qtensor`)."""
    if not isinstance(q, QuantizedTensor):
        raise ValueError(f"q: expected a QuantizedTensor, got {type(q).__name__}")
    return _dequantize_impl(q, jnp.dtype(dtype), unpermute)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _dequantize_impl(q: QuantizedTensor, dtype, unpermute: bool):
    rows, cols = q.shape
    codes = unpack(q.data, q.bits, cols)
    scale = scale_table(q)
    groups = q.n_groups
    zero = None if q.zeros is None else unpack(q.zeros, q.bits, groups).astype(jnp.float32)[..., None]
    v = dequantize_codes(grouped(codes, q.group_size)[0], scale[..., None], zero,
                         format=q.format, bits=q.bits, levels=q.levels).reshape(rows, -1)[:, :cols]
    if q.col_scale is not None:
        v = v * q.col_scale.astype(jnp.float32)
    if unpermute and q.perm is not None:
        v = v[:, jnp.argsort(q.perm)]
    return v.astype(dtype)


def qlinear(x, q: QuantizedTensor):
    """Reference ``x @ dequantize(q).T``; act-order permutes ``x`` instead of the weight."""
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"x: last axis {x.shape[-1]} does not match in_features {q.shape[1]} of {q}")
    if q.perm is not None:
        x = jnp.take(x, q.perm, axis=-1)
    w = dequantize(q, jnp.float32, unpermute=False)
    y = jnp.einsum("...i,oi->...o", x.astype(jnp.float32), w)
    return y.astype(x.dtype)


def bits_per_param(q: QuantizedTensor) -> float:
    """Stored bits (codes, scales, zeros, value vectors, permutation, nested scales) per weight."""
    return q.bits_per_param()


def quantized_bytes(spec: QuantSpec, shape: tuple[int, int]) -> int:
    """Exact bytes :func:`quantize` stores for a ``shape`` matrix with ``spec`` (every array of the
    result, nested double-quantization scales included), from shapes only: nothing is quantized."""
    out = jax.eval_shape(lambda w: quantize(w, spec), jax.ShapeDtypeStruct(tuple(int(d) for d in shape), jnp.float32))
    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(out)))


# ----------------------------------------------------------------------------- STE fake quantization

@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fake_quant(w, spec: QuantSpec):
    """``dequantize(quantize(w))`` with a straight-through gradient (identity inside the grid's
    range, zero where values were clipped), for quantization-aware training."""
    return _fake_quant_fwd(w, spec)[0]


def _fake_quant_fwd(w, spec):
    q = _quantize_impl(w, spec)
    dq = dequantize(q, w.dtype)
    if q.format == "int" or q.format in ("nf4", "fp4", "codebook"):
        rows, cols = q.shape
        scale = scale_table(q)[..., None]
        if q.format == "int":
            z = 2.0 ** (q.bits - 1) if q.zeros is None else unpack(q.zeros, q.bits, q.n_groups).astype(jnp.float32)[..., None]
            lo, hi = (0 - z) * scale, (2**q.bits - 1 - z) * scale
            margin = scale / 2  # values within half a step of the ends round onto them unclipped
        else:
            lv = np.sort(np.asarray(q.levels))
            lo, hi = lv[0] * scale, lv[-1] * scale
            margin = min(lv[1] - lv[0], lv[-1] - lv[-2]) / 2 * scale
        lo, hi = lo - margin, hi + margin
        wg, _ = grouped(w, q.group_size)
        mask = ((wg >= lo) & (wg <= hi)).reshape(rows, -1)[:, :cols]
    else:
        mask = jnp.ones(w.shape, bool)
    return dq, mask


def _fake_quant_bwd(spec, mask, g):
    return (jnp.where(mask, g, 0.0).astype(g.dtype),)


fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)
