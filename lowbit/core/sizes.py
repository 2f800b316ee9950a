"""Exact storage costs of quantization specs, from shapes only (nothing is quantized).

* :class:`MixedSpec`: a width per column group (group-wise int ``spec`` whose ``bits`` is the widest);
* :func:`spec_bytes`: the bytes :func:`lowbit.quantize` stores for a matrix shape (every array of
  the QuantizedTensor, nested double-quantization scales included), ``None`` (dense) at 2 bytes a
  weight, a :class:`MixedSpec` as its :class:`~lowbit.core.mixed.MixedWidthWeight`;
* :func:`code_bits`: the code width of an entry (16 for dense, the mean over groups for a MixedSpec).

The same count as :func:`lowbit.core.quantizers.bits_per_param`; bit allocation
(:mod:`lowbit.alloc`) prices its candidates and budgets with it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lowbit.core.mixed import mixed_bytes
from lowbit.core.qtensor import QuantSpec
from lowbit.core.quantizers import quantized_bytes

__all__ = ["MixedSpec", "spec_bytes", "code_bits", "DENSE_BYTES"]

#: bytes per weight of a dense entry (16-bit storage)
DENSE_BYTES = 2


@dataclasses.dataclass(frozen=True)
class MixedSpec:
    """A width per column group: ``spec`` (group-wise int; its ``bits`` is ``max(widths)``) with
    ``widths[g]`` bits for group ``g``."""
    spec: QuantSpec
    widths: tuple[int, ...]


def spec_bytes(spec: QuantSpec | MixedSpec | None, shape: tuple[int, int]) -> int:
    """Exact bytes that :func:`lowbit.quantize` stores for a ``shape`` matrix with ``spec`` (module
    docstring)."""
    rows, cols = (int(d) for d in shape)
    if spec is None:
        return DENSE_BYTES * rows * cols
    if isinstance(spec, MixedSpec):
        return mixed_bytes(spec.spec, (rows, cols), spec.widths)
    return quantized_bytes(spec, (rows, cols))


def code_bits(spec: QuantSpec | MixedSpec | None) -> float:
    """The code width of an entry: 16 for dense, the mean over the groups for a :class:`MixedSpec`."""
    if spec is None:
        return 16.0
    if isinstance(spec, MixedSpec):
        return float(np.mean(spec.widths))
    return float(spec.bits)
