"""The file formats lowbit reads models from: :mod:`.gguf` (llama.cpp) and :mod:`.hf` (Hugging Face
safetensors directories). Both return ``(params, cfg, tokenizer)`` with every tensor as float in the
requested dtype."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["to_jnp"]


def to_jnp(flat: dict[str, np.ndarray], dtype) -> dict[str, Any]:
    """Numpy tensors as jax arrays of ``dtype`` (through float32 when the stored dtype differs)."""
    dt = jnp.dtype(dtype)
    return {k: jnp.asarray(np.asarray(v, np.float32) if v.dtype != dt else v, dtype=dt) for k, v in flat.items()}
