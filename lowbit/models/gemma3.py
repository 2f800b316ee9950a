"""Gemma-3 text decoder (e.g. Gemma-3-270M) as pure JAX functions over a dict pytree: the second
model family of the architecture protocol (:mod:`lowbit.models.protocol`).

Parameters (``lowbit.core.transforms.flatten(params)``), HF names::

    embed_tokens                                  (vocab, hidden)
    layers/{i}/input_layernorm                    (hidden,)
    layers/{i}/self_attn/{q,k,v,o}_proj           (out, in)      q: (heads*head_dim, hidden)
    layers/{i}/self_attn/{q,k}_norm               (head_dim,)
    layers/{i}/post_attention_layernorm           (hidden,)
    layers/{i}/pre_feedforward_layernorm          (hidden,)
    layers/{i}/post_feedforward_layernorm         (hidden,)
    layers/{i}/mlp/{gate,up,down}_proj            (out, in)
    norm                                          (hidden,)
    lm_head                                       (vocab, hidden) absent when cfg.tie_word_embeddings

Every linear goes through :func:`lowbit.ops.linear` (dense or quantized weights alike); the linears
have the same relative paths as :mod:`lowbit.models.llama`, so recipes written for ``_proj$`` and
the calibration driver apply unchanged.

The model (checked against transformers' ``Gemma3ForCausalLM``, tests/test_gemma3.py):

* RMSNorm weights follow the HF convention: ``norm(x) = x / rms(x) * (1 + w)``, computed in float32
  and cast back to the input dtype (a GGUF stores ``1 + w``; :mod:`lowbit.models.loaders` subtracts
  the 1). Whoever folds a scale ``s`` into such a norm (AWQ / SmoothQuant via ``producers``) must
  write ``(1 + w) / s - 1``, not ``w / s``.
* embeddings are multiplied by ``sqrt(hidden_size)`` (the factor rounded to the activation dtype);
* block: ``x + post_attention_layernorm(attn(input_layernorm(x)))``, then
  ``x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``;
  attention: q and k are RMS-normalised over each head's ``head_dim`` features (``q_norm``,
  ``k_norm``) before RoPE (half-split / NeoX rotation); scores are scaled by
  ``query_pre_attn_scalar ** -0.5`` (never soft-capped: Gemma-3 replaced Gemma-2's attention
  soft-capping by the q/k norms, and transformers ignores ``attn_logit_softcapping``);
  MLP ``down(gelu_tanh(gate(h)) * up(h))``;
* per-layer attention kinds (``cfg.layer_types``): ``"sliding_attention"`` layers attend to the last
  ``sliding_window`` positions (the query's own included) and use the RoPE base ``rope_local_theta``;
  ``"full_attention"`` layers attend to every earlier position and use ``rope_theta`` (with the
  optional linear RoPE scaling of the larger Gemma-3 models). The kind is the static keyword
  ``sliding`` of :func:`block` (``FAMILY.layer_kwargs``), so the layer-wise path compiles two
  block variants;
* final RMSNorm, lm_head (tied to the embedding by default), optional final logit soft-capping.

Numerics as in :mod:`lowbit.models.llama`: activations in ``cfg.dtype``; norm statistics, RoPE, the
attention softmax, the final norm and the lm_head are float32; :func:`head` returns float32 logits.

The building blocks shared with :mod:`lowbit.models.llama` (RMSNorm with the ``unit_offset`` flag,
RoPE tables and rotation, grouped-query and chunked causal attention, the layer skeleton with
Gemma's "sandwich" norms as a :class:`~lowbit.models.common.LayerSpec` option, the embedding and
lm_head, parameter nesting / shape checks / init, config checks and conversions, the family
registration) live in :mod:`lowbit.models.common`; this module holds what is Gemma's own.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.models import common
from lowbit.models.common import LINEARS, SEQUENTIAL_GROUPS, head_params, nest

__all__ = ["Gemma3Config", "LINEARS", "SEQUENTIAL_GROUPS", "PRODUCERS", "LAYER_TYPES", "rms_norm",
           "embed", "block", "block_with_cache", "head", "head_inputs", "head_params", "forward",
           "forward_jit", "block_jit", "embed_jit", "head_jit", "shapes", "check_params", "init_params",
           "layer_kwargs", "from_hf_state_dict", "FAMILY"]

LAYER_TYPES = ("sliding_attention", "full_attention")
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class Gemma3Config(common.DecoderConfig):
    """Hyper-parameters of a Gemma-3 text decoder. Frozen and hashable (a static jit argument).

    Attributes:
      vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim:
        the usual sizes (``num_kv_heads=None`` -> ``num_heads``).
      rope_theta: RoPE base of the full-attention layers; rope_local_theta: of the sliding ones.
      rope_scaling_factor: linear RoPE scaling (positions / factor) of the full-attention layers
        (1.0 = none; Gemma-3 4B and larger use 8).
      rms_norm_eps, max_position_embeddings: as in HF configs.
      sliding_window: window of the ``"sliding_attention"`` layers (keys ``q - window < k <= q``).
      layer_types: per-layer ``"sliding_attention"`` / ``"full_attention"``; ``None`` -> every
        ``sliding_window_pattern``-th layer is full, the others sliding (HF's default, pattern 6).
      query_pre_attn_scalar: attention scores are multiplied by ``query_pre_attn_scalar ** -0.5``
        (``None`` -> ``head_dim``).
      final_logit_softcapping: ``c * tanh(logits / c)`` (``None`` = off, as in every Gemma-3 model).
      tie_word_embeddings: the lm_head is ``embed_tokens`` (no ``lm_head`` leaf).
      bos_token_id / eos_token_id: special ids (``None`` if unknown).
      dtype: activation dtype ("float32" | "bfloat16" | "float16").
      model_type: informational (``"gemma3_text"``).
    """

    # vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads: DecoderConfig
    head_dim: int = 256
    rope_theta: float = 1_000_000.0
    rope_local_theta: float = 10_000.0
    rope_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    sliding_window: int = 4096
    sliding_window_pattern: int = 6
    layer_types: tuple[str, ...] | None = None
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    dtype: str = "float32"
    model_type: str = "gemma3_text"

    def __post_init__(self):
        self.check_sizes(("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                          "num_kv_heads", "head_dim", "max_position_embeddings", "sliding_window",
                          "sliding_window_pattern"))
        if self.layer_types is None:
            p = self.sliding_window_pattern
            types = tuple("full_attention" if (i + 1) % p == 0 else "sliding_attention"
                          for i in range(self.num_layers))
            object.__setattr__(self, "layer_types", types)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
            raise ValueError(f"Gemma3Config.layer_types={self.layer_types!r}: expected {self.num_layers} "
                             f"entries from {LAYER_TYPES}")
        if self.query_pre_attn_scalar is None:
            object.__setattr__(self, "query_pre_attn_scalar", float(self.head_dim))
        for name in ("rope_theta", "rope_local_theta", "rope_scaling_factor", "rms_norm_eps",
                     "query_pre_attn_scalar"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Gemma3Config.{name}={getattr(self, name)!r}: expected a positive number")
        v = self.final_logit_softcapping
        if v is not None and not v > 0:
            raise ValueError(f"Gemma3Config.final_logit_softcapping={v!r}: expected None or a positive number")
        if self.hidden_activation not in _ACTIVATIONS:
            raise ValueError(f"Gemma3Config.hidden_activation={self.hidden_activation!r}: expected one of "
                             f"{_ACTIVATIONS} (GeGLU with the tanh approximation)")
        self.check_dtype_and_special_ids()

    # ------------------------------------------------------------------ conversions
    # compute_dtype, replace, from_dict: lowbit.models.common.DecoderConfig

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["layer_types"] = list(d["layer_types"])
        return d

    @classmethod
    def from_hf_config(cls, d: dict, **overrides) -> "Gemma3Config":
        """From a HF ``Gemma3TextConfig`` dict (``model_type`` ``gemma3_text``, or a ``gemma3``
        config whose ``text_config`` is used)."""
        if d.get("model_type") == "gemma3" and isinstance(d.get("text_config"), dict):
            d = d["text_config"]
        if d.get("model_type") not in ("gemma3_text", "gemma3"):
            raise ValueError(f"config: model_type={d.get('model_type')!r} is not a Gemma-3 text model")
        if d.get("use_bidirectional_attention"):
            raise ValueError("config: use_bidirectional_attention=true (embedding models) is not supported")
        rp = d.get("rope_parameters") or {}
        full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
        scaling = d.get("rope_scaling") or (full if full.get("rope_type", "default") != "default" else None)
        factor = 1.0
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind != "linear":
                raise ValueError(f"config: rope scaling {kind!r} is not supported (none, 'linear')")
            factor = float(scaling["factor"])
        if local.get("rope_type", "default") != "default":
            raise ValueError("config: RoPE scaling of the sliding-window layers is not supported")
        kw: dict[str, Any] = dict(
            **common.hf_common(d), head_dim=int(d.get("head_dim") or 256),
            rope_theta=float(full.get("rope_theta", d.get("rope_theta", 1_000_000.0))),
            rope_local_theta=float(local.get("rope_theta", d.get("rope_local_base_freq", 10_000.0))),
            rope_scaling_factor=factor, rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            sliding_window=int(d.get("sliding_window") or 4096),
            sliding_window_pattern=int(d.get("sliding_window_pattern") or 6),
            layer_types=tuple(d["layer_types"]) if d.get("layer_types") else None,
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or d.get("head_dim") or 256),
            final_logit_softcapping=d.get("final_logit_softcapping"),
            hidden_activation=d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh",
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)))
        kw.update(overrides)
        return cls(**kw)


def layer_kwargs(cfg: Gemma3Config, i: int) -> dict:
    """Static keyword arguments of block ``i``: ``{"sliding": bool}``."""
    return {"sliding": cfg.layer_types[i] == "sliding_attention"}


# ----------------------------------------------------------------------------- building blocks
# attention, RoPE tables and rotation, the layer skeleton: lowbit.models.common

def rms_norm(x, weight, eps: float, dtype=None):
    """Gemma RMSNorm ``x / sqrt(mean(x**2) + eps) * (1 + weight)`` in float32, result in ``dtype``
    (default: ``x.dtype``): :func:`lowbit.models.common.rms_norm` with ``unit_offset=True``."""
    return common.rms_norm(x, weight, eps, dtype, unit_offset=True)


def layer_spec(cfg: Gemma3Config, sliding: bool) -> common.LayerSpec:
    """The Gemma-3 layer for :func:`lowbit.models.common.block`: ``(1 + w)`` norms around both
    branches, q/k norms, half-split RoPE with the local base (sliding layers) or the global base and
    linear scaling (full layers), scores scaled by ``query_pre_attn_scalar ** -0.5``, GeGLU."""
    base = cfg.rope_local_theta if sliding else cfg.rope_theta
    inv = common.rope_frequencies(cfg.head_dim, base, scaling=None if sliding else "linear",
                                  factor=cfg.rope_scaling_factor)
    return common.LayerSpec(eps=cfg.rms_norm_eps, inv_freq=inv, scale=1.0 / math.sqrt(cfg.query_pre_attn_scalar),
                            rope_style="half", window=cfg.sliding_window if sliding else None, qk_norm=True,
                            unit_offset=True, activation=functools.partial(jax.nn.gelu, approximate=True),
                            mlp_norm="pre_feedforward_layernorm", sandwich=True)


# ----------------------------------------------------------------------------- the model

def embed(params, tokens, cfg: Gemma3Config):
    """Token ids ``(B, T)`` -> ``embed_tokens[ids] * sqrt(hidden_size)`` in ``cfg.dtype``."""
    x = common.embed(params, tokens, cfg)
    return x * jnp.asarray(math.sqrt(cfg.hidden_size), cfg.compute_dtype)


def block(layer, x, cfg: Gemma3Config, *, sliding: bool = False, capture: bool = False, positions=None,
          capture_upto: str | None = None):
    """One decoder layer on ``x (B, T, D)`` (causal; ``positions``: strictly increasing ints, default
    ``0..T-1``); ``sliding``: a sliding-window layer (:func:`layer_kwargs`).

    With ``capture=True`` returns ``(x_out, inputs)``, ``inputs[path]`` the exact input of the linear
    ``layer[path]`` (paths of :data:`LINEARS`); with ``capture_upto`` (a path of :data:`LINEARS`)
    stops as soon as that input is known and returns ``(None, inputs)``.
    """
    return common.block(layer, x, cfg, layer_spec(cfg, sliding), capture=capture, positions=positions,
                        capture_upto=capture_upto)


def block_with_cache(layer, x, cfg: Gemma3Config, cache, pos, *, sliding: bool = False):
    """Decode step: ``x (B, t, D)`` at positions ``pos .. pos+t-1`` against a preallocated KV cache
    ``(k, v)`` each ``(B, L, num_kv_heads, head_dim)`` (written at ``pos``; a sliding layer masks
    the slots more than ``sliding_window - 1`` positions back). Returns ``(x_out, new_cache)``."""
    return common.block_with_cache(layer, x, cfg, layer_spec(cfg, sliding), cache, pos)


def head_inputs(params, x, cfg: Gemma3Config):
    """The inputs of ``lm_head``: the final (Gemma) RMSNorm of ``x`` in float32."""
    return rms_norm(x, params["norm"], cfg.rms_norm_eps, dtype=jnp.float32)


def head(params, x, cfg: Gemma3Config):
    """Final norm + lm_head (or the tied embedding) in float32 (+ optional soft-capping
    ``c * tanh(logits / c)``)."""
    logits = common.lm_head(params, head_inputs(params, x, cfg), cfg)
    cap = cfg.final_logit_softcapping
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def forward(params, tokens, cfg: Gemma3Config):
    """Logits ``(B, T, vocab)`` float32 for tokens ``(B, T)`` (or ``(T,)`` -> ``(T, vocab)``)."""
    return common.forward(params, tokens, cfg, embed_fn=embed, block_fn=block, head_fn=head,
                          layer_kwargs=layer_kwargs)


forward_jit = jax.jit(forward, static_argnames=("cfg",))
block_jit = jax.jit(block, static_argnames=("cfg", "sliding", "capture", "capture_upto"))
embed_jit = jax.jit(embed, static_argnames=("cfg",))
head_jit = jax.jit(head, static_argnames=("cfg",))


# ----------------------------------------------------------------------------- params
# nest: lowbit.models.common

def shapes(cfg: Gemma3Config) -> dict[str, tuple[int, ...]]:
    D, hd = cfg.hidden_size, cfg.head_dim
    layer = {"input_layernorm": (D,), "post_attention_layernorm": (D,), "pre_feedforward_layernorm": (D,),
             "post_feedforward_layernorm": (D,), "self_attn/q_norm": (hd,), "self_attn/k_norm": (hd,),
             **common.linear_shapes(cfg)}
    return common.model_shapes(cfg, layer)


def check_params(params, cfg: Gemma3Config) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped parameter."""
    common.check_param_shapes(params, shapes(cfg), module="lowbit.models.gemma3", what="the Gemma-3 config")


def _init_value(path: str, shape, z):
    return 0.2 * z if path.endswith("norm") else z / math.sqrt(shape[1])


def init_params(key, cfg: Gemma3Config, dtype=jnp.float32) -> dict:
    """Random parameters for tests: linears ~ N(0, 1/in_features), embeddings ~ N(0, 1) / sqrt(D)
    (so that the scaled embeddings are ~ N(0, 1)), norm weights ~ N(0, 0.2) (HF convention: the
    norm multiplies by ``1 + w``)."""
    return common.init_from_shapes(key, shapes(cfg), cfg.num_layers, dtype, _init_value)


#: HF parameter names (``model.layers.{i}.<name>``) -> lowbit relative paths
_HF_LAYER = {"input_layernorm.weight": "input_layernorm",
             "post_attention_layernorm.weight": "post_attention_layernorm",
             "pre_feedforward_layernorm.weight": "pre_feedforward_layernorm",
             "post_feedforward_layernorm.weight": "post_feedforward_layernorm",
             **{f"self_attn.{p}_proj.weight": f"self_attn/{p}_proj" for p in "qkvo"},
             **{f"self_attn.{p}_norm.weight": f"self_attn/{p}_norm" for p in "qk"},
             **{f"mlp.{p}_proj.weight": f"mlp/{p}_proj" for p in ("gate", "up", "down")}}


def from_hf_state_dict(state: dict, cfg: Gemma3Config, *, dtype=None) -> dict:
    """lowbit params from a HF ``Gemma3ForCausalLM`` / ``Gemma3TextModel`` state dict (arrays or
    torch tensors; the ``model.`` / ``language_model.`` prefixes are accepted)."""
    import re

    pat = re.compile(r"^(?:model\.)?(?:language_model\.)?(?:model\.)?"
                     r"(layers\.(\d+)\.(.+)|embed_tokens\.weight|norm\.weight)$")
    dt = jnp.dtype(dtype or cfg.dtype)
    flat = {}
    for name, a in state.items():
        a = np.asarray(a.detach().float().cpu().numpy() if hasattr(a, "detach") else a, np.float32)
        if name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                flat["lm_head"] = a
            continue
        m = pat.match(name)
        if m is None:
            continue
        if m.group(2) is not None:
            if m.group(3) in _HF_LAYER:
                flat[f"layers/{m.group(2)}/{_HF_LAYER[m.group(3)]}"] = a
        else:
            flat[name.rsplit(".", 2)[-2]] = a
    params = nest({k: jnp.asarray(v, dt) for k, v in flat.items()}, cfg.num_layers)
    check_params(params, cfg)
    return params


# ----------------------------------------------------------------------------- the family
# SEQUENTIAL_GROUPS (true-sequential order of a block's linears) and head_params: lowbit.models.common

#: what produces each linear's input (norm weights are Gemma-style ``1 + w``, see the module docstring)
PRODUCERS = common.producers("pre_feedforward_layernorm")

def submodule(layer, name: str, h, cfg: Gemma3Config, *, sliding: bool = False):
    """:func:`lowbit.models.common.submodule` of a Gemma-3 block (no post-norms: the module's own output)."""
    return common.submodule(layer, name, h, cfg, layer_spec(cfg, sliding))


FAMILY = common.register_decoder("gemma3", Gemma3Config, PRODUCERS, embed_jit=embed_jit, block_jit=block_jit,
                                 head_jit=head_jit, head_inputs=head_inputs, block_with_cache=block_with_cache,
                                 module_fn=submodule, layer_kwargs=layer_kwargs, norm_offset=1.0)
