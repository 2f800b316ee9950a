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

lowbit model checkpoint convention (:func:`save_model` / :func:`load_model`): a
:func:`lowbit.io.checkpoint.save` directory of the params tree (QuantizedTensors allowed) whose
``extra.json`` holds::

    {"lowbit_model": 1,
     "model_config": dataclasses.asdict(cfg),      # LlamaConfig.from_dict() reads it back
     "tokenizer": Tokenizer.to_json() string | a path (absolute, or relative to the checkpoint) | null,
     ...}                                          # the caller's extra keys (recipe, source, metrics)

GGUF specifics: tensor dims are listed in ggml order (fastest first) and are reversed to get numpy
``(out, in)``; every tensor is dequantized to float32 with ``gguf.quants.dequantize``; llama.cpp's
converter stores the q/k projection rows permuted for interleaved RoPE, so by default they are
permuted back to HF order and the config uses half-split RoPE (``unpermute_qk=False`` keeps the
stored order with ``rope_style="interleaved"``: the same model).

Gemma-3 GGUF (``general.architecture == "gemma3"``, :func:`_load_gguf_gemma3`): llama.cpp's converter
does *not* permute Gemma's q/k rows (checked against transformers on the real model), stores every
RMSNorm weight as ``1 + w`` (the 1 is subtracted back: lowbit keeps the HF convention) and writes
neither the sliding-window pattern nor the local RoPE base, which llama.cpp fixes for Gemma-3 (every
6th layer global, local base 10000: used unless the file has ``gemma3.attention.sliding_window_pattern``
/ ``gemma3.rope.freq_base_swa``). The tokenizer is SentencePiece BPE (``tokenizer.ggml.model ==
"llama"``, :meth:`lowbit.data.tokenizer.Tokenizer.from_gguf_sentencepiece`). Model checkpoints of
another family than Llama record it in ``extra.json`` as ``"model_family"``.
"""

from __future__ import annotations

from lowbit.models.checkpoint import load_checkpoint, save_model
from lowbit.models.formats.gguf import GGUF_ARCHITECTURES, GGUF_GEMMA3_LAYER, GGUF_GLOBAL, load_gguf
from lowbit.models.formats.hf import load_hf_dir
from lowbit.models.resolve import DEFAULT_MODEL, GEMMA3_MODEL, load_model, model_fingerprint, resolve_model

__all__ = ["load_model", "save_model", "load_gguf", "load_hf_dir", "load_checkpoint",
           "resolve_model", "model_fingerprint", "DEFAULT_MODEL", "GEMMA3_MODEL", "GGUF_ARCHITECTURES",
           "GGUF_GLOBAL", "GGUF_GEMMA3_LAYER"]
