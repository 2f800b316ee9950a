"""Hugging Face model directories (``config.json`` + ``*.safetensors``, sharded with
``model.safetensors.index.json``; model_type llama / mistral / qwen2 / qwen3) -> lowbit params; the
tokenizer from ``tokenizer.json``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import warnings

import jax.numpy as jnp
import numpy as np

from lowbit.data.tokenizer import Tokenizer
from lowbit.models.common import nest
from lowbit.models.formats import to_jnp
from lowbit.models.llama import LlamaConfig, check_params

__all__ = ["load_hf_dir"]


_HF_LAYER = {"input_layernorm.weight": "input_layernorm",
             "post_attention_layernorm.weight": "post_attention_layernorm",
             **{f"self_attn.{p}_proj.weight": f"self_attn/{p}_proj" for p in "qkvo"},
             **{f"self_attn.{p}_proj.bias": f"self_attn/{p}_bias" for p in "qkvo"},
             **{f"self_attn.{p}_norm.weight": f"self_attn/{p}_norm" for p in "qk"},  # Qwen3
             **{f"mlp.{p}_proj.weight": f"mlp/{p}_proj" for p in ("gate", "up", "down")}}
_HF_TENSOR = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_HF_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                wm = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(wm.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(f"{index}: lists shard(s) {missing} that are not in {path}")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        return files
    other = [os.path.basename(p) for p in glob.glob(os.path.join(path, "*.bin"))
             + glob.glob(os.path.join(path, "*.pt*"))]
    hint = f" (found {other}: PyTorch pickles are not read; convert them to safetensors)" if other else ""
    raise FileNotFoundError(f"{path}: no *.safetensors weights{hint}")


def _read_safetensors(files: list[str]) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    out = {}
    for fn in files:
        try:
            with safe_open(fn, framework="numpy") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k)
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise ValueError(f"{fn}: corrupt or truncated safetensors file ({type(e).__name__}: {e})") from None
    return out


def load_hf_dir(path: str, *, dtype="float32"):
    """Read an HF model directory (config.json + safetensors + tokenizer.json)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: model directory not found")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (not an HF model directory)")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: invalid JSON ({e})") from None
    try:
        cfg = LlamaConfig.from_hf_config(hf, dtype=str(jnp.dtype(dtype)))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{cfg_path}: missing or invalid field {e}") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    tensors = _read_safetensors(_weight_files(path))
    flat, unused = {}, []
    for name, a in tensors.items():
        m = _HF_TENSOR.match(name)
        if m and m.group(2) in _HF_LAYER and int(m.group(1)) < cfg.num_layers:
            flat[f"layers/{m.group(1)}/{_HF_LAYER[m.group(2)]}"] = a
        elif name in ("model.embed_tokens.weight", "embed_tokens.weight"):
            flat["embed_tokens"] = a
        elif name in ("model.norm.weight", "norm.weight"):
            flat["norm"] = a
        elif name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                flat["lm_head"] = a
        elif not _HF_IGNORED.search(name):
            unused.append(name)
    if unused:
        warnings.warn(f"{path}: ignoring {len(unused)} unexpected tensors, e.g. {unused[:3]}")
    from lowbit.models.llama import shapes

    missing = [p for p in shapes(cfg) if p not in flat]
    if missing:
        raise ValueError(f"{path}: missing tensors for {cfg.model_type} (lowbit paths): {missing[:6]}"
                         + (f" ... ({len(missing)} in all)" if len(missing) > 6 else ""))
    params = nest(to_jnp(flat, dtype), cfg.num_layers)
    check_params(params, cfg)
    return params, cfg, _hf_tokenizer(path, cfg)


def _hf_tokenizer(path: str, cfg: LlamaConfig) -> Tokenizer | None:
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
        warnings.warn(f"{path}: no tokenizer.json; the model is loaded without a tokenizer")
        return None
    return Tokenizer.from_file(tj, bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id)
