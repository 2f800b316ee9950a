"""Models: a Llama-family decoder in JAX (:mod:`lowbit.models.llama`), the Gemma-3 text decoder
(:mod:`lowbit.models.gemma3`), both built from the shared blocks of :mod:`lowbit.models.common` and
registered with the architecture protocol (:mod:`lowbit.models.protocol`), and checkpoint loaders
(:mod:`lowbit.models.loaders`: GGUF, HF safetensors directories, lowbit checkpoints, hub names)."""

from lowbit.models.llama import (LINEARS, LlamaConfig, block, block_with_cache, embed, forward,
                                 forward_jit, head, init_params)
from lowbit.models import gemma3  # noqa: F401  (registers the Gemma-3 family)
from lowbit.models.gemma3 import Gemma3Config

__all__ = ["LlamaConfig", "Gemma3Config", "gemma3", "LINEARS", "embed", "block", "block_with_cache", "head", "forward",
           "forward_jit", "init_params", "load_model", "save_model", "load_gguf", "load_hf_dir"]


def __getattr__(name):  # loaders pull in gguf/safetensors/tokenizers: import them lazily
    if name in ("load_model", "save_model", "load_gguf", "load_hf_dir"):
        from lowbit.models import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module 'lowbit.models' has no attribute {name!r}")
