"""lowbit: a JAX research suite for compressing large language models.

The public surface: :class:`QuantSpec`, :class:`QuantizedTensor`, :func:`quantize`,
:func:`dequantize`, :func:`fake_quant`, :func:`bits_per_param`, :func:`nf4_qlora_spec` (QLoRA's
NF4 + double-quantized base format, also ``QuantSpec.qlora_nf4()``), the transforms in
:mod:`lowbit.core.transforms`, :func:`lowbit.ops.linear`, and :mod:`lowbit.pipeline` (the
quantize-a-model API). Importing ``lowbit`` registers the built-in methods (:mod:`lowbit.methods`)
and, with them, every built-in weight-node kind (:mod:`lowbit.core.nodes`).
"""

from lowbit import ops
from lowbit.core.qtensor import FORMATS, QuantizedTensor, QuantSpec
from lowbit.core.quantizers import bits_per_param, dequantize, fake_quant, nf4_qlora_spec, quantize
from lowbit import methods  # noqa: E402  (registers the built-in methods and their weight-node kinds)

__version__ = "0.1.0"
__all__ = ["FORMATS", "QuantSpec", "QuantizedTensor", "quantize", "dequantize", "fake_quant",
           "bits_per_param", "nf4_qlora_spec", "ops", "methods", "__version__"]
