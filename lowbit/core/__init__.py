"""The quantizer algebra, on arrays only (no model, no data):

* :mod:`.pack` — the one bit layout (1/2/3/4/8-bit codes in uint32 words);
* :mod:`.numerics` — NF4 / FP4 / log grids, nearest-level search;
* :mod:`.qtensor` — :class:`QuantSpec` (what to do) and :class:`QuantizedTensor` (the packed result);
* :mod:`.quantizers` — RTN / absmax / non-uniform / double quantization, dequantize, STE fake-quant;
* :mod:`.transforms` — optax-shaped :class:`Transform` s and their combinators (``chain``, ``partition``).
"""
