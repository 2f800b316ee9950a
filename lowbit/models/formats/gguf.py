"""GGUF files (llama.cpp's format) -> lowbit params of the Llama or Gemma-3 family; the tokenizer
rebuilt from the file's own metadata.

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

import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from lowbit.data.tokenizer import Tokenizer
from lowbit.models.common import nest
from lowbit.models.formats import to_jnp
from lowbit.models.llama import LlamaConfig, check_params, permute_qk_interleaved_to_half

__all__ = ["load_gguf", "GGUF_ARCHITECTURES", "GGUF_GLOBAL", "GGUF_GEMMA3_LAYER"]


GGUF_ARCHITECTURES = ("llama", "gemma3")

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
    params = nest(to_jnp(flat, dtype), cfg.num_layers)
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
