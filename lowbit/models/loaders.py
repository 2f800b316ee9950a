"""Load checkpoints into :mod:`lowbit.models.llama` params (or :mod:`lowbit.models.gemma3` params for
Gemma-3 GGUF files and checkpoints): GGUF, HF safetensors directories, lowbit checkpoints, hub
names. Every loader returns ``(params, cfg, tokenizer)``.

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

import glob
import hashlib
import json
import os
import re
import sys
import threading
import warnings
from typing import Any

import jax.numpy as jnp
import numpy as np

from lowbit.models.common import nest
from lowbit.models.llama import LlamaConfig, check_params, permute_qk_interleaved_to_half
from lowbit.data.tokenizer import Tokenizer

__all__ = ["load_model", "save_model", "load_gguf", "load_hf_dir", "load_checkpoint",
           "resolve_model", "model_fingerprint", "DEFAULT_MODEL", "GEMMA3_MODEL", "GGUF_ARCHITECTURES",
           "GGUF_GLOBAL", "GGUF_GEMMA3_LAYER"]

DEFAULT_MODEL = "smollm2-135m"
GGUF_ARCHITECTURES = ("llama", "gemma3")
GEMMA3_MODEL = "gemma3-270m"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _to_jnp(flat: dict[str, np.ndarray], dtype) -> dict[str, Any]:
    dt = jnp.dtype(dtype)
    return {k: jnp.asarray(np.asarray(v, np.float32) if v.dtype != dt else v, dtype=dt) for k, v in flat.items()}


# ----------------------------------------------------------------------------- GGUF

#: GGUF tensor name -> lowbit path of the tensors outside the blocks (both architectures)
GGUF_GLOBAL = {"token_embd.weight": "embed_tokens", "output_norm.weight": "norm", "output.weight": "lm_head"}
_GGUF_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn/q_proj", "attn_k": "self_attn/k_proj", "attn_v": "self_attn/v_proj",
               "attn_output": "self_attn/o_proj", "ffn_gate": "mlp/gate_proj", "ffn_up": "mlp/up_proj",
               "ffn_down": "mlp/down_proj"}
_GGUF_BIAS = {"attn_q": "self_attn/q_bias", "attn_k": "self_attn/k_bias", "attn_v": "self_attn/v_bias",
              "attn_output": "self_attn/o_bias"}
#: GGUF block tensor ``blk.{i}.<name>.weight`` -> lowbit relative path, Gemma-3
GGUF_GEMMA3_LAYER = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                     "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
                     "attn_q": "self_attn/q_proj", "attn_k": "self_attn/k_proj", "attn_v": "self_attn/v_proj",
                     "attn_output": "self_attn/o_proj", "attn_q_norm": "self_attn/q_norm",
                     "attn_k_norm": "self_attn/k_norm", "ffn_gate": "mlp/gate_proj", "ffn_up": "mlp/up_proj",
                     "ffn_down": "mlp/down_proj"}
_GGUF_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def _gguf_value(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _gguf_key(reader, path: str, arch: str):
    """``key(k, default=None, required=False)``: the metadata value ``{arch}.{k}``."""
    def key(k, default=None, required=False):
        v = _gguf_value(reader, f"{arch}.{k}", default)
        if v is None and required:
            raise ValueError(f"{path}: GGUF metadata key {arch}.{k} is missing")
        return v

    return key


def _gguf_linear_rope_factor(key, path: str) -> float | None:
    """The factor of a linear RoPE scaling (``None`` without scaling); other kinds are refused."""
    scaling = key("rope.scaling.type")
    if scaling == "linear":
        return float(key("rope.scaling.factor", 1.0))
    if scaling not in (None, "none"):
        raise ValueError(f"{path}: GGUF rope scaling {scaling!r} is not supported (none, linear)")
    return None


def _gguf_vocab_size(key, tokens, path: str, arch: str) -> int:
    vocab = int(key("vocab_size", 0) or (len(tokens) if tokens else 0))
    if not vocab:
        raise ValueError(f"{path}: cannot tell the vocabulary size (no {arch}.vocab_size, no tokens)")
    return vocab


def _gguf_special_ids(reader) -> dict:
    return {"bos_token_id": _gguf_value(reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": _gguf_value(reader, "tokenizer.ggml.eos_token_id")}


def _gguf_params(reader, path: str, arch: str, tables: dict[str, dict[str, str]], cfg, check, *, dtype, convert):
    """Every tensor dequantized to float32, mapped to its lowbit path (:data:`GGUF_GLOBAL`, or
    ``tables[weight|bias][name]`` for ``blk.{i}.<name>.<weight|bias>``), passed through
    ``convert(lowbit_path, array)``, nested and checked with ``check(params, cfg)``."""
    import gguf

    flat: dict[str, np.ndarray] = {}
    unknown = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(list(t.shape)))
        if t.name in GGUF_GLOBAL:
            path_ = GGUF_GLOBAL[t.name]
        else:
            m = _GGUF_TENSOR.match(t.name)
            table = tables.get(m.group(3)) if m else None
            if table is None or m.group(2) not in table:
                unknown.append(t.name)
                continue
            if int(m.group(1)) >= cfg.num_layers:
                raise ValueError(f"{path}: tensor {t.name} names block {int(m.group(1))} but the metadata "
                                 f"{arch}.block_count={cfg.num_layers} (blocks 0..{cfg.num_layers - 1}): "
                                 "inconsistent GGUF file")
            path_ = f"layers/{m.group(1)}/{table[m.group(2)]}"
        try:
            a = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
        except Exception as e:
            raise ValueError(f"{path}: cannot dequantize tensor {t.name} ({t.tensor_type.name}): {e}") from None
        flat[path_] = convert(path_, a)
    if unknown:
        raise ValueError(f"{path}: unexpected GGUF tensors {unknown[:5]} for a {arch} model")
    params = nest(_to_jnp(flat, dtype), cfg.num_layers)
    check(params, cfg)
    return params


def load_gguf(path: str, *, dtype="float32", unpermute_qk: bool = True):
    """Read a llama GGUF file -> ``(params, cfg, tokenizer)`` with every tensor dequantized.

    Hyper-parameters come from the ``llama.*`` metadata keys, the tokenizer from
    ``tokenizer.ggml.*`` (byte-level BPE). ``dtype`` is both the parameter and the compute dtype.
    A ``gemma3`` file gives :mod:`lowbit.models.gemma3` params and a ``Gemma3Config`` instead
    (:func:`_load_gguf_gemma3`; ``unpermute_qk`` does not apply: Gemma's q/k rows are stored as is).
    """
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: GGUF file not found")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct errors on bad magic or truncation
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = _gguf_value(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{list(GGUF_ARCHITECTURES)} (Llama-family decoders: Llama, Mistral, SmolLM; "
                         "Gemma-3 text decoders)")
    if arch == "gemma3":
        return _load_gguf_gemma3(reader, path, dtype=dtype)

    key = _gguf_key(reader, path, arch)
    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    heads = int(key("attention.head_count", required=True))
    kv_heads = int(key("attention.head_count_kv", heads))
    hidden = int(key("embedding_length", required=True))
    head_dim = int(key("attention.key_length", 0) or key("rope.dimension_count", 0) or hidden // heads)
    if key("rope.dimension_count") not in (None, head_dim):
        raise ValueError(f"{path}: partial RoPE (rope.dimension_count={key('rope.dimension_count')} "
                         f"< head_dim={head_dim}) is not supported")
    factor = _gguf_linear_rope_factor(key, path)
    kw: dict[str, Any] = {} if factor is None else {"rope_scaling": "linear", "rope_scaling_factor": factor}

    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{path}: GGUF tensor rope_freqs.weight (Llama-3.1 style frequency factors) "
                         "is not supported; load the HF safetensors directory instead")
    cfg = LlamaConfig(
        vocab_size=_gguf_vocab_size(key, tokens, path, arch), hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length", required=True)),
        num_layers=int(key("block_count", required=True)), num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, rope_theta=float(key("rope.freq_base", 10000.0)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        rope_style="half" if unpermute_qk else "interleaved",
        qkv_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names,
        **_gguf_special_ids(reader), dtype=str(jnp.dtype(dtype)), model_type="llama", **kw)

    def unpermute(path_, a):
        if unpermute_qk and re.search(r"self_attn/[qk]_(proj|bias)$", path_):
            return permute_qk_interleaved_to_half(a, heads if "/q_" in path_ else kv_heads)
        return a

    params = _gguf_params(reader, path, arch, {"weight": _GGUF_LAYER, "bias": _GGUF_BIAS}, cfg, check_params,
                          dtype=dtype, convert=unpermute)
    return params, cfg, _gguf_tokenizer(reader, path, tokens)


def _load_gguf_gemma3(reader, path: str, *, dtype="float32"):
    """A Gemma-3 text GGUF -> ``(params, cfg: Gemma3Config, tokenizer)`` (see the module docstring)."""
    from lowbit.models import gemma3

    key = _gguf_key(reader, path, "gemma3")
    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    layers = int(key("block_count", required=True))
    heads = int(key("attention.head_count", required=True))
    hidden = int(key("embedding_length", required=True))
    head_dim = int(key("attention.key_length", 0) or hidden // heads)
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"{path}: attention.value_length != key_length is not supported")
    pattern = key("attention.sliding_window_pattern")
    kw: dict[str, Any] = {}
    if isinstance(pattern, (list, tuple)):          # per-layer flags (True = sliding window)
        if len(pattern) != layers:
            raise ValueError(f"{path}: gemma3.attention.sliding_window_pattern has {len(pattern)} "
                             f"entries for {layers} layers")
        kw["layer_types"] = tuple("sliding_attention" if f else "full_attention" for f in pattern)
    elif pattern is not None:
        kw["sliding_window_pattern"] = int(pattern)
    else:
        kw["sliding_window_pattern"] = 6            # llama.cpp's fixed Gemma-3 pattern
    factor = _gguf_linear_rope_factor(key, path)
    if factor is not None:
        kw["rope_scaling_factor"] = factor
    # llama.cpp: scores scaled by 1/sqrt(head_dim), except Gemma-3 27B (62 layers): 1/sqrt(hidden/heads)
    scalar = float(hidden // heads) if layers == 62 else float(head_dim)
    vocab = _gguf_vocab_size(key, tokens, path, "gemma3")
    names = {t.name for t in reader.tensors}
    cfg = gemma3.Gemma3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(key("feed_forward_length", required=True)),
        num_layers=layers, num_heads=heads, num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim, rope_theta=float(key("rope.freq_base", 1_000_000.0)),
        rope_local_theta=float(key("rope.freq_base_swa", 10_000.0)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(key("context_length", 32768)),
        sliding_window=int(key("attention.sliding_window", 4096)), query_pre_attn_scalar=scalar,
        final_logit_softcapping=key("final_logit_softcapping"),
        tie_word_embeddings="output.weight" not in names, **_gguf_special_ids(reader),
        dtype=str(jnp.dtype(dtype)), **kw)

    def unit_offset(path_, a):                      # llama.cpp stores Gemma norms as 1 + w
        return a - np.float32(1.0) if path_.endswith("norm") else a

    params = _gguf_params(reader, path, "gemma3", {"weight": GGUF_GEMMA3_LAYER}, cfg, gemma3.check_params,
                          dtype=dtype, convert=unit_offset)
    return params, cfg, _gguf_tokenizer(reader, path, tokens, sentencepiece=True)


def _gguf_tokenizer(reader, path: str, tokens, *, sentencepiece: bool = False) -> Tokenizer:
    """The tokenizer of the GGUF metadata ``tokenizer.ggml.*`` (BOS/EOS ids included): byte-level
    BPE (:meth:`Tokenizer.from_gguf_vocab`), or with ``sentencepiece=True`` and
    ``tokenizer.ggml.model == "llama"`` SentencePiece BPE (:meth:`Tokenizer.from_gguf_sentencepiece`)."""
    if tokens is None:
        raise ValueError(f"{path}: no tokenizer.ggml.tokens in the GGUF metadata")

    def get(k, default=None):
        return _gguf_value(reader, f"tokenizer.ggml.{k}", default)

    ids = {"bos_id": get("bos_token_id"), "eos_id": get("eos_token_id")}
    try:
        if sentencepiece and get("model") == "llama":
            return Tokenizer.from_gguf_sentencepiece(
                tokens, token_types=get("token_type"), merges=get("merges"),
                add_space_prefix=bool(get("add_space_prefix", False)), unk_id=get("unknown_token_id"), **ids)
        return Tokenizer.from_gguf_vocab(tokens, get("merges") or [], token_types=get("token_type"),
                                         model=get("model"), pre=get("pre"), **ids)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------- HF directories

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
    params = nest(_to_jnp(flat, dtype), cfg.num_layers)
    check_params(params, cfg)
    return params, cfg, _hf_tokenizer(path, cfg)


def _hf_tokenizer(path: str, cfg: LlamaConfig) -> Tokenizer | None:
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
        warnings.warn(f"{path}: no tokenizer.json; the model is loaded without a tokenizer")
        return None
    return Tokenizer.from_file(tj, bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id)


# ----------------------------------------------------------------------------- lowbit checkpoints

def _bases_view(params):
    """What a family's shape check sees of ``params``: LoRA adapters (:class:`lowbit.train.lora.
    LoraWeight`, restored by :mod:`lowbit.io.checkpoint` from adapter checkpoints) replaced by their
    bases. No LoraWeight can exist before :mod:`lowbit.train.lora` is imported."""
    lora = sys.modules.get("lowbit.train.lora")
    return params if lora is None else lora.strip_lora(params)


def save_model(path: str, params, cfg: LlamaConfig, tokenizer: Tokenizer | None, extra: dict | None = None, *,
               extra_files: dict | None = None, overwrite: bool = False, check_view=None) -> str:
    """Write a lowbit model checkpoint (see the module docstring for the ``extra.json`` convention).

    ``extra_files`` ({relative name: str or bytes}, e.g. ``layers.csv``) are written inside the atomic
    write and listed in the directory's marker; an existing ``path`` is replaced only as
    :func:`lowbit.io.outputs.prepare_output_dir` allows (``overwrite``: also another kind of lowbit output).
    ``check_view`` maps ``params`` to what the family's shape check sees (default: LoRA adapters
    replaced by their bases, so a model with adapters is checked on its bases).
    """
    from lowbit.io import checkpoint

    family, _, check = _family_api(cfg)
    check((check_view or _bases_view)(params), cfg)
    meta = dict(extra or {})
    clash = {"lowbit_model", "model_config", "tokenizer", "model_family"} & set(meta)
    if clash:
        raise ValueError(f"extra: keys {sorted(clash)} are reserved by save_model")
    meta.update({"lowbit_model": 1, "model_config": cfg.to_dict(),
                 "tokenizer": tokenizer.to_json() if tokenizer is not None else None})
    if family != "llama":  # Llama checkpoints stay as they were (no key = llama)
        meta["model_family"] = family
    return checkpoint.save(path, params, extra=meta, extra_files=extra_files, overwrite=overwrite)


def load_checkpoint(path: str, *, dtype=None, check_view=None):
    """Read a directory written by :func:`save_model` -> ``(params, cfg, tokenizer)``; a damaged
    checkpoint raises :class:`lowbit.io.checkpoint.CheckpointError` naming the directory.
    ``check_view``: as for :func:`save_model`."""
    from lowbit.io import checkpoint

    extra = checkpoint.read_extra(path)
    if not isinstance(extra, dict) or "model_config" not in extra:
        raise checkpoint.CheckpointError(f"{path}: lowbit checkpoint without 'model_config' in extra.json "
                                         "(not written by lowbit.models.save_model)")
    _, config_cls, check = _family_api(extra.get("model_family", "llama"), path)
    cfg = config_cls.from_dict(extra["model_config"])
    params = checkpoint.restore(path)
    if dtype is not None:
        import jax

        from lowbit.core.qtensor import QuantizedMatrix, QuantizedTensor

        dt = jnp.dtype(dtype)
        packed = (QuantizedTensor, QuantizedMatrix)  # stored as they are
        params = jax.tree_util.tree_map(
            lambda x: x if isinstance(x, packed) else x.astype(dt), params,
            is_leaf=lambda x: isinstance(x, packed))
        cfg = cfg.replace(dtype=str(dt))
    check((check_view or _bases_view)(params), cfg)
    tok = extra.get("tokenizer")
    if tok is None:
        tokenizer = None
    elif tok.lstrip().startswith("{"):
        tokenizer = Tokenizer.from_json(tok)
    else:
        tp = tok if os.path.isabs(tok) else os.path.join(path, tok)
        with open(tp) as f:
            text = f.read()
        try:
            tokenizer = Tokenizer.from_json(text)
        except ValueError:  # a plain HF tokenizer.json
            tokenizer = Tokenizer.from_file(tp, cfg.bos_token_id, cfg.eos_token_id)
    return params, cfg, tokenizer


def _family_api(cfg_or_name, where: str = ""):
    """``(family name, config class, check_params)`` of a config instance or a family name."""
    from lowbit.models import gemma3, llama

    api = {"llama": (llama.LlamaConfig, llama.check_params),
           "gemma3": (gemma3.Gemma3Config, gemma3.check_params)}
    if isinstance(cfg_or_name, str):
        if cfg_or_name not in api:
            raise ValueError(f"{where}: model_family {cfg_or_name!r} is not supported; supported: {sorted(api)}")
        return (cfg_or_name, *api[cfg_or_name])
    for name, (cls, check) in api.items():
        if isinstance(cfg_or_name, cls):
            return name, cls, check
    raise ValueError(f"cfg: {type(cfg_or_name).__name__} is not a config of a model family with "
                     f"checkpoint support ({sorted(api)})")


# ----------------------------------------------------------------------------- dispatch

def resolve_model(name_or_path: str) -> tuple[str, str]:
    """``(kind, path)`` with kind in gguf | checkpoint | hf_dir | hub; raises if nothing matches."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"model: expected a name or path, got {name_or_path!r}")
    if name_or_path.lower() in (DEFAULT_MODEL, "smollm2", "smollm2-135m-instruct"):
        from lowbit.io import assets

        return "gguf", assets.smollm2_gguf()
    if name_or_path.lower() in (GEMMA3_MODEL, "gemma-3-270m"):
        from lowbit.io import assets

        return "gguf", assets.gemma3_270m_gguf()
    from lowbit.io import remote

    if remote.is_remote(name_or_path):   # a checkpoint or model directory in a bucket: its local copy
        mirror = remote.Mirror(name_or_path)
        if not mirror.pull() and not os.listdir(mirror.stage):
            raise FileNotFoundError(f"{name_or_path}: nothing there")
        name_or_path = mirror.stage
    p = os.path.expanduser(name_or_path)
    if os.path.isfile(p):
        if p.endswith(".gguf"):
            return "gguf", p
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf", p
        raise ValueError(f"{p}: not a .gguf file; pass a GGUF file, an HF model directory or a "
                         "lowbit checkpoint directory")
    if os.path.isdir(p):
        if os.path.isfile(os.path.join(p, "manifest.json")):
            return "checkpoint", p
        if os.path.isfile(os.path.join(p, "config.json")):
            return "hf_dir", p
        ggufs = glob.glob(os.path.join(p, "*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise FileNotFoundError(f"{p}: directory has no config.json, manifest.json or single .gguf file")
    if _HUB_ID.match(name_or_path) and not name_or_path.startswith((".", "/")):
        return "hub", name_or_path
    raise FileNotFoundError(f"model {name_or_path!r}: no such file or directory; expected "
                            f"{DEFAULT_MODEL!r}, {GEMMA3_MODEL!r}, a .gguf file, an HF model directory, a lowbit "
                            "checkpoint directory or a hub id 'owner/name'")


def _offline_message(repo: str, why: str) -> str:
    return (f"model {repo!r}: cannot download from the Hugging Face hub ({why}). Offline options: "
            f"'{DEFAULT_MODEL}' (the embedded SmolLM2-135M GGUF), a local .gguf file, a local HF "
            "directory with config.json + *.safetensors (+ tokenizer.json), or a lowbit checkpoint "
            "directory written by save_model()")


def _hub_reachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """None if a TCP connection to the endpoint opens within ``timeout`` s, else the reason."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(endpoint)
    host, port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
    result: list[str | None] = ["timed out"]

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result[0] = None
        except OSError as e:
            result[0] = f"{host}:{port} unreachable: {e}"

    th = threading.Thread(target=probe, daemon=True)
    th.start()
    th.join(timeout + 1.0)
    return result[0]


def _download_hub(repo: str) -> str:
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise RuntimeError(_offline_message(repo, "huggingface_hub is not installed")) from None
    patterns = ["*.json", "*.safetensors", "tokenizer*"]
    try:  # already in the local cache?
        return huggingface_hub.snapshot_download(repo, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(_offline_message(repo, "HF_HUB_OFFLINE is set and it is not cached"))
    why = _hub_reachable(constants.ENDPOINT)
    if why is not None:
        raise RuntimeError(_offline_message(repo, why))
    try:
        return huggingface_hub.snapshot_download(repo, allow_patterns=patterns, etag_timeout=10)
    except Exception as e:
        raise RuntimeError(_offline_message(repo, f"{type(e).__name__}: {e}")) from None


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype="float32"):
    """Load any supported model -> ``(params, cfg, tokenizer)`` (see the module docstring).

    ``dtype`` is the dtype of the float parameters and of the forward pass (QuantizedTensor leaves
    of a checkpoint are kept as they are).
    """
    kind, path = resolve_model(name_or_path)
    if kind == "gguf":
        return load_gguf(path, dtype=dtype)
    if kind == "checkpoint":
        return load_checkpoint(path, dtype=dtype)
    if kind == "hub":
        path = _download_hub(path)
    return load_hf_dir(path, dtype=dtype)


def model_fingerprint(name_or_path: str) -> dict:
    """``{"kind", "path", "sha256", "files"}`` of what :func:`load_model` would read (no hub access:
    hub ids are reported as such with ``sha256=None``). Directories hash the sorted list of
    ``(relative path, sha256)`` of their files."""
    kind, path = resolve_model(name_or_path)
    if kind == "hub":
        return {"kind": kind, "path": path, "sha256": None, "files": None}

    def sha(fn):
        h = hashlib.sha256()
        with open(fn, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        return h.hexdigest()

    if os.path.isfile(path):
        return {"kind": kind, "path": os.path.abspath(path), "sha256": sha(path), "files": None}
    files = {}
    for root, _, names in os.walk(path):
        for n in names:
            fn = os.path.join(root, n)
            files[os.path.relpath(fn, path)] = sha(fn)
    h = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()
    return {"kind": kind, "path": os.path.abspath(path), "sha256": h, "files": files}
