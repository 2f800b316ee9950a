"""Mixed precision inside one matrix: a bit width per group of input columns.

A :class:`MixedWidthWeight` stores an ``(out, in)`` weight whose column groups (``group_size``
columns each, the last one possibly partial) have their own integer widths ``widths[g]``. It is
the storage of a column-block bit allocation (issue "learned bit allocation": picoLLM gives each
block of input columns its own width) and of GPTQ with a per-group width vector
(:func:`lowbit.methods.gptq.quantize_weight_mixed`)::

    parts[k]   a QuantizedTensor at width part_widths[k] holding the columns of every group of that
               width, concatenated in column order (its own groups are exactly those groups)
    widths     static: the width of each group of the original column order

so every stored array is an ordinary packed QuantizedTensor (codes, scales, zeros at the part's
width) and the bytes are those of the parts; the widths are static metadata like a
QuantizedTensor's ``bits``. ``x @ W^T`` is the sum over parts of ``linear(x[..., cols_k], part_k)``
(:func:`lowbit.ops.linear`, registered there for this node).

:func:`quantize_mixed` is the round-to-nearest form (the candidates of a column-block allocation);
:func:`assemble` packs codes / scales / zeros computed elsewhere (GPTQ).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.core.nodes import register_node
from lowbit.core.qtensor import QuantizedMatrix, QuantizedTensor, QuantSpec

__all__ = ["MixedWidthWeight", "quantize_mixed", "assemble", "check_widths", "mixed_bytes"]


def check_widths(widths: Sequence[int], spec: QuantSpec, cols: int | None = None, name: str = "widths") -> tuple[int, ...]:
    """``widths`` as a tuple of ints in 1..8, one per group of ``cols`` columns (any count when
    ``cols`` is None); a clear error otherwise. ``spec`` must be a group-wise int format without
    double quantization (the widths replace its ``bits``)."""
    if spec.format != "int" or spec.group_size is None or spec.per_tensor or spec.double_quant:
        raise ValueError(f"{name}: a width per group needs a group-wise int spec without double quantization, "
                         f"got format={spec.format!r} group_size={spec.group_size} per_tensor={spec.per_tensor} "
                         f"double_quant={spec.double_quant}")
    try:
        w = tuple(int(b) for b in widths)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={widths!r}: expected a sequence of ints (one bit width per group)") from None
    n = len(w) if cols is None else -(-int(cols) // spec.group_size)
    if isinstance(widths, str) or any(isinstance(b, bool) for b in widths) or len(w) != n or any(not 1 <= b <= 8 for b in w):
        raise ValueError(f"{name}: expected {n} widths in 1..8 (one per group of {spec.group_size} columns), "
                         f"got {list(widths)[:16]}{' ...' if len(w) > 16 else ''} ({len(w)} values)")
    return w


def _columns(cols: int, g: int, widths: Sequence[int], bits: int) -> np.ndarray:
    """The column indices of the groups of width ``bits``, in order."""
    return np.concatenate([np.arange(i * g, min((i + 1) * g, cols)) for i, b in enumerate(widths) if b == bits]
                          + [np.zeros(0, np.int64)]).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class MixedWidthWeight(QuantizedMatrix):
    """A weight with a bit width per column group (module docstring). A pytree: the parts are the
    children; ``shape``, ``group_size`` and ``widths`` are static."""

    parts: tuple
    shape: tuple[int, int] = (0, 0)
    group_size: int = 128
    widths: tuple[int, ...] = ()

    @property
    def part_widths(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.widths)))

    def columns(self, bits: int) -> np.ndarray:
        """The original column indices held by the part of width ``bits`` (in its order)."""
        return _columns(self.shape[1], self.group_size, self.widths, bits)

    @property
    def dtype(self):
        return jnp.dtype(jnp.float32)

    @property
    def bits(self) -> float:
        """Mean code width over the columns."""
        cols = self.shape[1]
        return float(sum(b * len(self.columns(b)) for b in self.part_widths) / cols)

    @property
    def T(self):
        raise TypeError("MixedWidthWeight has no transpose; use lowbit.ops.linear, or .dequantize()")

    def dequantize(self, dtype=jnp.float32):
        from lowbit.core.quantizers import dequantize

        w = jnp.zeros(self.shape, jnp.float32)
        for b, part in zip(self.part_widths, self.parts):
            w = w.at[:, self.columns(b)].set(dequantize(part, jnp.float32))
        return w.astype(dtype)

    def bits_per_param(self) -> float:
        total = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize * 8 for a in jax.tree_util.tree_leaves(self.parts))
        return total / (self.shape[0] * self.shape[1])

    def describe(self) -> dict:
        return dict(format="int-mixed", bits=round(self.bits, 4), group_size=self.group_size, act_order=False,
                    bits_per_param=self.bits_per_param(), widths=" ".join(map(str, self.widths)))

    def ckpt_fields(self) -> tuple[dict, dict]:
        return ({str(b): p for b, p in zip(self.part_widths, self.parts)},
                {"shape": list(self.shape), "group_size": int(self.group_size), "widths": list(self.widths)})

    @classmethod
    def from_ckpt(cls, fields: dict, meta: dict) -> "MixedWidthWeight":
        widths = tuple(int(b) for b in meta["widths"])
        return cls(tuple(fields[str(b)] for b in sorted(set(widths))), tuple(int(d) for d in meta["shape"]),
                   int(meta["group_size"]), widths)

    def __post_init__(self):
        if not self.widths or not isinstance(self.parts, tuple) or not all(isinstance(p, QuantizedTensor) for p in self.parts):
            return  # pytree placeholders (tree_unflatten, vmap specs)
        rows, cols = self.shape
        if len(self.widths) != -(-cols // self.group_size) or len(self.parts) != len(self.part_widths):
            raise ValueError(f"MixedWidthWeight: {len(self.widths)} widths / {len(self.parts)} parts do not fit shape "
                             f"{self.shape} with groups of {self.group_size}")
        for b, p in zip(self.part_widths, self.parts):
            if p.bits != b or p.shape != (rows, len(self.columns(b))) or p.group_size != self.group_size:
                raise ValueError(f"MixedWidthWeight: the {b}-bit part is {p!r:.120}; expected {b} bits, shape "
                                 f"{(rows, len(self.columns(b)))}, groups of {self.group_size}")

    def __repr__(self):
        return f"MixedWidthWeight(shape={self.shape}, group_size={self.group_size}, widths={self.widths})"


jax.tree_util.register_dataclass(MixedWidthWeight, data_fields=["parts"], meta_fields=["shape", "group_size", "widths"])
register_node("mixed", MixedWidthWeight)


def assemble(codes, scales, zeros, spec: QuantSpec, widths: Sequence[int]) -> MixedWidthWeight:
    """Pack uint8 ``codes (rows, cols)`` with per-group float ``scales`` / ``zeros (rows, n_groups)``
    (``zeros`` None for symmetric) into a :class:`MixedWidthWeight` at ``widths`` (one per group)."""
    from lowbit.core.quantizers import pack_result

    rows, cols = codes.shape
    g = spec.group_size
    widths = check_widths(widths, spec, cols)
    parts = []
    for b in sorted(set(widths)):
        groups = np.asarray([i for i, w in enumerate(widths) if w == b])
        c = _columns(cols, g, widths, b)
        parts.append(pack_result(codes[:, c], scales[:, groups].astype(spec.scale_dtype),
                                 None if zeros is None else zeros[:, groups],
                                 dataclasses.replace(spec, bits=b), group_size=g))
    return MixedWidthWeight(tuple(parts), (rows, cols), g, widths)


def quantize_mixed(w, spec: QuantSpec, widths: Sequence[int]) -> MixedWidthWeight:
    """Round-to-nearest ``w (out, in)`` with ``spec`` at a width per group."""
    from lowbit.core.quantizers import check_matrix, quantize

    w = check_matrix(w, "w")
    rows, cols = w.shape
    widths = check_widths(widths, spec, cols)
    parts = []
    for b in sorted(set(widths)):
        cols_b = _columns(cols, spec.group_size, widths, b)
        parts.append(quantize(w[:, cols_b], dataclasses.replace(spec, bits=b, partial_groups=True)))
    return MixedWidthWeight(tuple(parts), (rows, cols), spec.group_size, widths)


def mixed_bytes(spec: QuantSpec, shape: tuple[int, int], widths: Sequence[int]) -> int:
    """Exact bytes of :func:`quantize_mixed` / GPTQ's mixed result for ``shape`` at ``widths``."""
    from lowbit.core.quantizers import quantized_bytes

    rows, cols = shape
    widths = check_widths(widths, spec, cols)
    return sum(quantized_bytes(dataclasses.replace(spec, bits=b, partial_groups=True),
                               (rows, len(_columns(cols, spec.group_size, widths, b)))) for b in sorted(set(widths)))
