"""Quantization methods, one module each: a pure core on arrays (``W, H, X -> QuantizedTensor``)
plus a thin :class:`~lowbit.core.transforms.Transform` factory, registered by name in
:mod:`.registry` (configs, ``lowbit run`` and ``lowbit quantize`` derive from it).

* :mod:`.rtn` — ``rtn`` (round-to-nearest, data-free) and ``fp`` (the unquantized reference row);
* :mod:`.gptq` — ``gptq`` (Hessian-based error correction, Frantar et al. 2023; its pure core is
  :mod:`.gptq_core`);
* :mod:`.awq` — ``awq`` (activation-aware scaling and clipping, Lin et al. 2024, then RTN or GPTQ);
* :mod:`.llm_int8` — ``llm_int8`` (LLM.int8(): row-wise int8 weights, outlier features in float at
  matmul time, Dettmers et al. 2022; its weight type ``Int8Weight`` runs through ``lowbit.ops.linear``);
* :mod:`.onebit` — ``onebit`` (OneBit: sign matrix + two value vectors from SVID, Xu et al. 2024;
  trained by distillation in ``lowbit run`` rows with ``distill: true``, its ``training`` hook).

What a method does beyond its Transform (packing, a training stage, report fields, per-group
widths, export fields, being data-free) is declared by hooks in :mod:`.registry`: nothing outside
this package compares a method's name.
"""

from lowbit.methods import awq, gptq, rtn  # noqa: F401  (register the built-in methods)
from lowbit.methods import llm_int8  # noqa: F401  (LLM.int8())
from lowbit.methods import onebit  # noqa: F401  (OneBit)
from lowbit.methods.registry import METHODS, Method, Training, build, get, names, register, with_names

__all__ = ["METHODS", "Method", "Training", "register", "get", "names", "with_names", "build"]
