"""Quantization methods, one module each: a pure core on arrays (``W, H, X -> QuantizedTensor``)
plus a thin :class:`~lowbit.core.transforms.Transform` factory, registered by name in
:mod:`.registry` (configs, ``lowbit run`` and ``lowbit quantize`` derive from it).

* :mod:`.rtn` — ``rtn`` (round-to-nearest, data-free) and ``fp`` (the unquantized reference row);
* :mod:`.gptq` — ``gptq`` (Hessian-based error correction, Frantar et al. 2023).
"""

from lowbit.methods import gptq, rtn  # noqa: F401  (register the built-in methods)
from lowbit.methods.registry import METHODS, Method, build, get, names, register

__all__ = ["METHODS", "Method", "register", "get", "names", "build"]
