"""A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM) as pure JAX functions over a dict pytree.

Parameters are a plain nested dict with HF-like names; ``lowbit.core.transforms.flatten(params)`` gives::

    embed_tokens                              (vocab, hidden)
    layers/{i}/input_layernorm                (hidden,)
    layers/{i}/self_attn/{q,k,v,o}_proj       (out, in)      q: (heads*head_dim, hidden)
    layers/{i}/self_attn/{q,k,v,o}_bias       (out,)         only when cfg.qkv_bias / cfg.o_bias
    layers/{i}/self_attn/{q,k}_norm           (head_dim,)    only when cfg.qk_norm (Qwen3)
    layers/{i}/post_attention_layernorm       (hidden,)
    layers/{i}/mlp/{gate,up,down}_proj        (out, in)
    norm                                      (hidden,)
    lm_head                                   (vocab, hidden) absent when cfg.tie_word_embeddings

``params["layers"]`` is a Python list (layers may hold different quantization formats, so they are
never stacked). Every linear goes through :func:`lowbit.ops.linear`, so any weight may be a dense
array or a :class:`~lowbit.core.qtensor.QuantizedTensor` and the same functions run the quantized model.
Biases are separate leaves named ``*_bias`` (not ``*_proj_bias``) so that a recipe regex such as
``q_proj`` only ever matches the weight matrix.

Layout conventions (HF): q/k rows are in "half-split" order, i.e. :data:`rope_style` ``"half"``
rotates the pairs ``(j, j + head_dim/2)`` (NeoX ``rotate_half``). ``"interleaved"`` rotates adjacent
pairs ``(2j, 2j+1)`` (GPT-J, GGUF/llama.cpp native); the two are the same model up to the row
permutation :func:`permute_qk_half_to_interleaved` of q_proj and k_proj (and, with ``qk_norm``, of
the q_norm/k_norm weights: ``permute_qk_half_to_interleaved(w, 1)``).

With ``cfg.qk_norm`` (Qwen3) q and k are RMS-normalised over each head's ``head_dim`` features
(weights ``q_norm``/``k_norm``, shared by all heads, eps ``rms_norm_eps``) after the projection
(and bias) and before RoPE, in both :func:`block` and :func:`block_with_cache`.

Numerics: activations are kept in ``cfg.dtype`` (float32 by default, "bfloat16" optional); RMSNorm
statistics, RoPE, the attention softmax, the final norm and the lm_head matmul are float32, and
:func:`head` always returns float32 logits.

Pieces for a layer-sequential calibration driver::

    x = embed(params, tokens, cfg)                       # (B, T, D)
    for layer in params["layers"]:
        x, inputs = block(layer, x, cfg, capture=True)   # inputs["self_attn/q_proj"] = its input
    logits = head(params, x, cfg)

The building blocks (RMSNorm, RoPE tables and rotation, grouped-query and chunked causal
attention, the layer skeleton, parameter nesting / shape checks / init, the config checks and
conversions, the family registration) live in :mod:`lowbit.models.common`, shared with
:mod:`lowbit.models.gemma3`; this module describes the Llama layer with a
:class:`~lowbit.models.common.LayerSpec` and re-exports the shared names it always had
(:func:`rms_norm`, :func:`apply_rope`, :func:`nest`, :data:`LINEARS`, :data:`ATTN_CHUNK`, ...).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.models import common
from lowbit.models.common import (ATTN_CHUNK, LINEARS, ROPE_STYLES, SEQUENTIAL_GROUPS, apply_rope,
                                  head_params, nest, rms_norm)

__all__ = ["LlamaConfig", "LINEARS", "embed", "block", "block_with_cache", "head", "forward",
           "forward_jit", "init_params", "rms_norm", "rope_inv_freq", "apply_rope", "check_params",
           "permute_qk_half_to_interleaved", "permute_qk_interleaved_to_half", "param_count",
           "block_jit", "embed_jit", "head_jit", "head_params", "head_inputs", "ATTN_CHUNK", "SEQUENTIAL_GROUPS",
           "PRODUCERS", "FAMILY", "shapes", "nest", "layer_spec"]

_ROPE_SCALINGS = (None, "linear", "llama3")
_HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(common.DecoderConfig):
    """Hyper-parameters of a Llama-family decoder. Frozen and hashable: pass it as a static jit arg.

    Attributes:
      vocab_size, hidden_size, intermediate_size, num_layers, num_heads: the usual sizes.
      num_kv_heads: key/value heads (grouped-query attention); ``None`` -> ``num_heads``.
      head_dim: per-head width; ``None`` -> ``hidden_size // num_heads``.
      rope_theta: RoPE base. rope_style: ``"half"`` (HF/NeoX) or ``"interleaved"`` (GPT-J/GGUF).
      rope_scaling / rope_scaling_factor / rope_low_freq_factor / rope_high_freq_factor /
        rope_original_max_position: ``None``, ``"linear"`` (positions / factor) or ``"llama3"``
        (Llama 3.1 frequency-dependent scaling), with their parameters.
      rms_norm_eps, max_position_embeddings: as in HF configs (the longest sequence accepted).
      tie_word_embeddings: the lm_head is ``embed_tokens`` (no ``lm_head`` leaf).
      qkv_bias / o_bias: biases on the q/k/v (Qwen2) and o projections.
      qk_norm: per-head RMSNorm of q and k over head_dim before RoPE (Qwen3; leaves ``q_norm``,
        ``k_norm`` of shape ``(head_dim,)``).
      sliding_window: attend only to the last ``sliding_window`` positions (Mistral); ``None`` = all.
      bos_token_id / eos_token_id: special ids (``None`` if unknown).
      dtype: activation dtype of the forward pass ("float32" | "bfloat16" | "float16").
      model_type: informational ("llama", "mistral", "qwen2", "qwen3").
    """

    # vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads: DecoderConfig
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope_style: str = "half"
    rope_scaling: str | None = None
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    dtype: str = "float32"
    model_type: str = "llama"

    def __post_init__(self):
        if self.head_dim is None and isinstance(self.num_heads, int) and self.num_heads > 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        self.check_sizes(("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                          "num_kv_heads", "head_dim", "max_position_embeddings"))
        if self.rope_style not in ROPE_STYLES:
            raise ValueError(f"LlamaConfig.rope_style={self.rope_style!r}: expected one of {ROPE_STYLES}")
        if self.rope_scaling not in _ROPE_SCALINGS:
            raise ValueError(f"LlamaConfig.rope_scaling={self.rope_scaling!r}: expected one of {_ROPE_SCALINGS}")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0 or not self.rope_scaling_factor > 0:
            raise ValueError(f"LlamaConfig: rope_theta={self.rope_theta}, rms_norm_eps={self.rms_norm_eps}, "
                             f"rope_scaling_factor={self.rope_scaling_factor} must be positive")
        if self.rope_scaling == "llama3" and (self.rope_original_max_position is None
                                              or self.rope_high_freq_factor <= self.rope_low_freq_factor):
            raise ValueError("LlamaConfig: rope_scaling='llama3' needs rope_original_max_position and "
                             "rope_high_freq_factor > rope_low_freq_factor")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, (int, np.integer))
                                                or self.sliding_window <= 0):
            raise ValueError(f"LlamaConfig.sliding_window={self.sliding_window!r}: expected None or a positive int")
        self.check_dtype_and_special_ids()

    # ------------------------------------------------------------------ conversions
    # compute_dtype, replace, to_dict, from_dict: lowbit.models.common.DecoderConfig

    @classmethod
    def from_hf_config(cls, d: dict, **overrides) -> "LlamaConfig":
        """Build from a HF ``config.json`` dict (model_type llama, mistral, qwen2 or qwen3).

        Qwen2 always has q/k/v biases (no o bias); Qwen3 has q/k norms and ``attention_bias`` on
        all of q/k/v/o (like Llama). Per-layer sliding windows (Qwen ``use_sliding_window``) are
        refused."""
        mt = d.get("model_type")
        if mt not in _HF_MODEL_TYPES:
            arch = d.get("architectures")
            raise ValueError(f"config.json: model_type={mt!r} (architectures={arch}) is not supported; "
                             f"supported model types: {list(_HF_MODEL_TYPES)} (decoder-only Llama family)")
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"config.json: hidden_act={act!r} is not supported (SwiGLU with silu only)")
        if d.get("mlp_bias"):
            raise ValueError("config.json: mlp_bias=true is not supported")
        rp = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
        theta = d.get("rope_theta", rp.get("rope_theta", 10000.0))
        kw: dict[str, Any] = {}
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "linear":
                kw.update(rope_scaling="linear", rope_scaling_factor=float(scaling["factor"]))
            elif kind == "llama3":
                kw.update(rope_scaling="llama3", rope_scaling_factor=float(scaling["factor"]),
                          rope_low_freq_factor=float(scaling["low_freq_factor"]),
                          rope_high_freq_factor=float(scaling["high_freq_factor"]),
                          rope_original_max_position=int(scaling["original_max_position_embeddings"]))
            elif kind not in (None, "default"):
                raise ValueError(f"config.json: rope scaling {kind!r} is not supported "
                                 "(supported: none, 'linear', 'llama3')")
        sliding = None
        if mt == "mistral":
            sliding = d.get("sliding_window")
        elif mt in ("qwen2", "qwen3") and (d.get("use_sliding_window")
                                           or "sliding_attention" in (d.get("layer_types") or ())):
            raise ValueError(f"config.json: {mt.capitalize()} use_sliding_window=true (per-layer sliding windows) "
                             "is not supported")
        kw.update(
            **common.hf_common(d), head_dim=d.get("head_dim") or None, rope_theta=float(theta),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), rope_style="half",
            qkv_bias=bool(d.get("attention_bias", False)) or mt == "qwen2",
            o_bias=bool(d.get("attention_bias", False)) and mt != "qwen2", qk_norm=mt == "qwen3",
            sliding_window=sliding, model_type=mt)
        kw.update(overrides)
        return cls(**kw)


# ----------------------------------------------------------------------------- building blocks
# rms_norm, apply_rope and attention: lowbit.models.common

def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """float32 inverse frequencies ``theta ** (-2j / head_dim)`` for ``j < head_dim / 2`` (scaled)."""
    return common.rope_frequencies(cfg.head_dim, cfg.rope_theta, scaling=cfg.rope_scaling,
                                   factor=cfg.rope_scaling_factor, low_freq_factor=cfg.rope_low_freq_factor,
                                   high_freq_factor=cfg.rope_high_freq_factor,
                                   original_max_position=cfg.rope_original_max_position)


def layer_spec(cfg: LlamaConfig) -> common.LayerSpec:
    """The Llama layer for :func:`lowbit.models.common.block`: pre-norm residuals, SwiGLU, scores
    scaled by ``head_dim ** -0.5``, optional q/k norms (Qwen3) and sliding window (Mistral)."""
    return common.LayerSpec(eps=cfg.rms_norm_eps, inv_freq=rope_inv_freq(cfg), scale=1.0 / math.sqrt(cfg.head_dim),
                            rope_style=cfg.rope_style, window=cfg.sliding_window, qk_norm=cfg.qk_norm)


def permute_qk_half_to_interleaved(w, n_heads: int):
    """Reorder the rows of a q/k projection (or bias) from HF half-split to interleaved RoPE order.

    Within each head, HF row ``j`` (``j < d/2``) and ``j + d/2`` form a rotation pair; interleaved
    order puts them at rows ``2j`` and ``2j + 1`` (what llama.cpp's converter stores in GGUF).
    """
    w = np.asarray(w) if not isinstance(w, jax.Array) else w
    rows = w.shape[0]
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk_interleaved_to_half(w, n_heads: int):
    """Inverse of :func:`permute_qk_half_to_interleaved` (GGUF rows -> HF rows)."""
    w = np.asarray(w) if not isinstance(w, jax.Array) else w
    rows = w.shape[0]
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- the model

def embed(params, tokens, cfg: LlamaConfig):
    """Token ids ``(B, T)`` -> hidden states ``(B, T, D)`` in ``cfg.dtype``."""
    return common.embed(params, tokens, cfg)


def block(layer, x, cfg: LlamaConfig, *, capture: bool = False, positions=None, capture_upto: str | None = None):
    """One decoder layer on ``x (B, T, D)``: :func:`lowbit.models.common.block` (causal; ``positions``
    default ``0..T-1``; ``capture=True`` returns ``(x_out, inputs)`` with the exact input of each
    linear of :data:`LINEARS`; ``capture_upto`` stops as soon as that linear's input is known)."""
    return common.block(layer, x, cfg, layer_spec(cfg), capture=capture, positions=positions,
                        capture_upto=capture_upto)


def block_with_cache(layer, x, cfg: LlamaConfig, cache, pos):
    """Decode step against a preallocated KV cache ``(k, v)``: :func:`lowbit.models.common.block_with_cache`.
    Returns ``(x_out, new_cache)``."""
    return common.block_with_cache(layer, x, cfg, layer_spec(cfg), cache, pos)


def head_inputs(params, x, cfg: LlamaConfig):
    """The inputs of ``lm_head``: the final RMSNorm of ``x`` in float32."""
    return rms_norm(x, params["norm"], cfg.rms_norm_eps, dtype=jnp.float32)


def head(params, x, cfg: LlamaConfig):
    """Final RMSNorm + lm_head (or the tied embedding), computed in float32 -> float32 logits."""
    return common.lm_head(params, head_inputs(params, x, cfg), cfg)


def forward(params, tokens, cfg: LlamaConfig):
    """Logits ``(B, T, vocab)`` float32 for tokens ``(B, T)`` (or ``(T,)`` -> ``(T, vocab)``)."""
    return common.forward(params, tokens, cfg, embed_fn=embed, block_fn=block, head_fn=head)


#: ``forward`` compiled with the config static (one compilation per config, param structure and shape).
forward_jit = jax.jit(forward, static_argnames=("cfg",))


# ----------------------------------------------------------------------------- params
# nest: lowbit.models.common

def shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    D, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    layer = {"input_layernorm": (D,), "post_attention_layernorm": (D,), **common.linear_shapes(cfg)}
    if cfg.qkv_bias:
        layer.update({"self_attn/q_bias": (q,), "self_attn/k_bias": (kv,), "self_attn/v_bias": (kv,)})
    if cfg.o_bias:
        layer["self_attn/o_bias"] = (D,)
    if cfg.qk_norm:
        layer.update({"self_attn/q_norm": (hd,), "self_attn/k_norm": (hd,)})
    return common.model_shapes(cfg, layer)


def check_params(params, cfg: LlamaConfig) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped parameter."""
    common.check_param_shapes(params, shapes(cfg), module="lowbit.models.llama")


def _init_value(path: str, shape, z):
    if path.endswith(("layernorm", "norm")):
        return 1.0 + 0.1 * z
    if path.endswith("_bias"):
        return 0.1 * z
    return z if path == "embed_tokens" else z / math.sqrt(shape[1])


def init_params(key, cfg: LlamaConfig, dtype=jnp.float32) -> dict:
    """Random parameters for tests: linears ~ N(0, 1/in_features), embeddings ~ N(0, 1),
    norm weights ~ 1 + N(0, 0.1) and biases ~ N(0, 0.1) (non-trivial so tests catch mix-ups)."""
    return common.init_from_shapes(key, shapes(cfg), cfg.num_layers, dtype, _init_value)


def param_count(params) -> int:
    """Number of (logical) parameters; QuantizedTensors count their matrix size."""
    from lowbit.core.transforms import flatten

    return int(sum(int(np.prod(v.shape)) for v in flatten(params).values()))


# ----------------------------------------------------------------------------- layer-wise execution

#: :func:`block` compiled with the config static: one compilation per distinct layer structure
#: (all dense layers share one; so do layers quantized with the same format and shapes).
block_jit = jax.jit(block, static_argnames=("cfg", "capture", "capture_upto"))

#: ``embed_jit({"embed_tokens": table}, tokens, cfg)``: :func:`embed` compiled.
embed_jit = jax.jit(embed, static_argnames=("cfg",))

head_jit = jax.jit(head, static_argnames=("cfg",))


# ----------------------------------------------------------------------------- the family
# SEQUENTIAL_GROUPS (true-sequential order of a block's linears) and head_params: lowbit.models.common

#: what produces each linear's input: a norm (scale folds into its weight) or a linear (into its rows)
PRODUCERS = common.producers("post_attention_layernorm")

def submodule(layer, name: str, h, cfg: LlamaConfig):
    """:func:`lowbit.models.common.submodule` of a Llama block (``"self_attn"`` or ``"mlp"``)."""
    return common.submodule(layer, name, h, cfg, layer_spec(cfg))


FAMILY = common.register_decoder("llama", LlamaConfig, PRODUCERS, embed_jit=embed_jit, block_jit=block_jit,
                                 head_jit=head_jit, head_inputs=head_inputs, block_with_cache=block_with_cache,
                                 module_fn=submodule)
