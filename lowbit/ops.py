"""Linear algebra entry points that accept dense or quantized weights.

Convention: a linear weight ``w`` is shaped ``(out_features, in_features)`` (the PyTorch / GPTQ
paper convention) and ``linear(x, w) = x @ w.T``.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["linear"]


def linear(x, w, bias=None):
    """``y = x @ w.T (+ bias)`` for ``x (..., in)`` and ``w (out, in)`` dense or QuantizedTensor."""
    from lowbit.qtensor import QuantizedTensor  # local: qtensor imports numerics only

    if isinstance(w, QuantizedTensor):
        from lowbit.quantizers import qlinear

        y = qlinear(x, w)
    else:
        if w.ndim != 2:
            raise ValueError(f"w: expected a 2-D (out, in) weight, got shape {w.shape}")
        if x.shape[-1] != w.shape[1]:
            raise ValueError(f"x: last axis {x.shape[-1]} does not match w in_features {w.shape[1]}")
        y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y
