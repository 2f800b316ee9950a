"""lowbit: a JAX research suite for compressing large language models.

The public surface: :class:`QuantSpec`, :class:`QuantizedTensor`, :func:`quantize`,
:func:`dequantize`, :func:`fake_quant`, :func:`bits_per_param`, :func:`nf4_qlora_spec` (QLoRA's
NF4 + double-quantized base format, also ``QuantSpec.qlora_nf4()``), the transforms in
:mod:`lowbit.core.transforms`, and :func:`lowbit.ops.linear`.
"""

from lowbit import ops
from lowbit.core.qtensor import FORMATS, QuantizedTensor, QuantSpec
from lowbit.core.quantizers import bits_per_param, dequantize, fake_quant, nf4_qlora_spec, quantize

__version__ = "0.1.0"
__all__ = ["FORMATS", "QuantSpec", "QuantizedTensor", "quantize", "dequantize", "fake_quant",
           "bits_per_param", "nf4_qlora_spec", "ops", "__version__"]
