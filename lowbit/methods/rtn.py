"""Round-to-nearest: data-free quantization of every matrix it is given (any :class:`QuantSpec`
format: int zero-point / absmax, NF4, FP4, codebooks, sign), and ``fp``, the unquantized row."""

from __future__ import annotations

from lowbit.core.mixed import quantize_mixed
from lowbit.core.checks import float_matrix
from lowbit.core.qtensor import QuantSpec
from lowbit.core.quantizers import quantize
from lowbit.core.transforms import Transform
from lowbit.methods.registry import NoOptions, register

__all__ = ["rtn"]


@register("rtn", help="round-to-nearest (data-free) with the row's quant spec", data_free=True,
          mixed=lambda spec, opts, widths: rtn(spec, widths=widths))
def _rtn_method(spec: QuantSpec, opts: NoOptions) -> Transform:
    return rtn(spec)


@register("fp", help="no quantization: the model as loaded (the reference row)", quantizes=False, data_free=True)
def _fp_method(spec, opts: NoOptions) -> None:
    return None


def rtn(spec: QuantSpec, *, widths: dict | None = None) -> Transform:
    """Round-to-nearest (data-free) quantization of every 2-D float matrix it is given; ``widths``
    (path -> a bit width per column group): those paths become
    :class:`~lowbit.core.mixed.MixedWidthWeight` (:func:`lowbit.core.mixed.quantize_mixed`)."""
    widths = widths or {}

    def apply(params, state):
        del state
        out = {}
        for path, w in params.items():
            float_matrix(path, w, "rtn")
            try:
                out[path] = quantize_mixed(w, spec, widths[path]) if path in widths else quantize(w, spec)
            except ValueError as e:
                raise ValueError(f"params[{path!r}]: {e}") from None
        return out, {}

    return Transform(init=lambda params: (), apply=apply)
