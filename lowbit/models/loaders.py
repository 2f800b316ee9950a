"""Load checkpoints into :mod:`lowbit.models.llama` params (or :mod:`lowbit.models.gemma3` params for
Gemma-3 GGUF files and checkpoints): GGUF, HF safetensors directories, lowbit checkpoints, hub
names. Every loader returns ``(params, cfg, tokenizer)``. This module is their index; each lives with
its format: :mod:`lowbit.models.formats.gguf`, :mod:`lowbit.models.formats.hf`,
:mod:`lowbit.models.checkpoint` (lowbit checkpoints), :mod:`lowbit.models.resolve` (names and
paths -> a loader, hub downloads, fingerprints).

``load_model(name_or_path)`` accepts, in this order:

* ``"smollm2-135m"`` -- the embedded default, SmolLM2-135M-Instruct Q4_1 GGUF (fetched and cached by
  :func:`lowbit.io.assets.smollm2_gguf`), dequantized to float: lowbit's float baseline;
* ``"gemma3-270m"`` -- Gemma-3-270M (base) Q4_K_M GGUF (:func:`lowbit.io.assets.gemma3_270m_gguf`,
  Gemma terms of use), dequantized to float: a :mod:`lowbit.models.gemma3` model;
* a ``.gguf`` file (architecture ``llama``, or ``gemma3``: see :func:`load_gguf`);
* a lowbit model checkpoint directory (``manifest.json``, written by :func:`save_model`);
* an HF model directory (``config.json`` + ``*.safetensors``; model_type llama / mistral / qwen2 / qwen3);
* a hub id ``owner/name``, downloaded with ``huggingface_hub.snapshot_download`` when the hub is
  reachable (offline it fails at once with the list of offline options).

The formats' specifics (GGUF's dimension order, the q/k row permutation, Gemma's ``1 + w`` norms;
the lowbit checkpoint's ``extra.json`` convention) are written down in their modules.
"""

from __future__ import annotations

from lowbit.models.checkpoint import load_checkpoint, save_model
from lowbit.models.formats.gguf import GGUF_ARCHITECTURES, GGUF_GEMMA3_LAYER, GGUF_GLOBAL, load_gguf
from lowbit.models.formats.hf import load_hf_dir
from lowbit.models.resolve import DEFAULT_MODEL, GEMMA3_MODEL, load_model, model_fingerprint, resolve_model

__all__ = ["load_model", "save_model", "load_gguf", "load_hf_dir", "load_checkpoint",
           "resolve_model", "model_fingerprint", "DEFAULT_MODEL", "GEMMA3_MODEL", "GGUF_ARCHITECTURES",
           "GGUF_GLOBAL", "GGUF_GEMMA3_LAYER"]
