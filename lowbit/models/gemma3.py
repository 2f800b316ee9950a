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
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowbit import ops
from lowbit.core.qtensor import QuantizedTensor
from lowbit.models.llama import apply_rope, nest

__all__ = ["Gemma3Config", "LINEARS", "SEQUENTIAL_GROUPS", "PRODUCERS", "LAYER_TYPES", "rms_norm",
           "embed", "block", "block_with_cache", "head", "head_inputs", "head_params", "forward",
           "forward_jit", "block_jit", "embed_jit", "head_jit", "shapes", "check_params", "init_params",
           "layer_kwargs", "from_hf_state_dict", "FAMILY"]

#: Paths (relative to a layer) of the linear weights of a block, in execution order.
LINEARS = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
           "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")
LAYER_TYPES = ("sliding_attention", "full_attention")
DTYPES = ("float32", "bfloat16", "float16")
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
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

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
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
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings", "sliding_window",
                     "sliding_window_pattern"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"Gemma3Config.{name}={v!r}: expected a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"Gemma3Config: num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"Gemma3Config.head_dim={self.head_dim}: RoPE needs an even head_dim")
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
        if self.dtype not in DTYPES:
            raise ValueError(f"Gemma3Config.dtype={self.dtype!r}: expected one of {DTYPES}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                raise ValueError(f"Gemma3Config.{name}={v}: outside the vocabulary [0, {self.vocab_size})")

    # ------------------------------------------------------------------ conversions
    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **kw) -> "Gemma3Config":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(d["layer_types"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Gemma3Config":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Gemma3Config.from_dict: unknown keys {unknown}")
        return cls(**d)

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
        eos = d.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        heads = int(d["num_attention_heads"])
        kw: dict[str, Any] = dict(
            vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]), num_layers=int(d["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or 256),
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
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            bos_token_id=d.get("bos_token_id"), eos_token_id=eos)
        kw.update(overrides)
        return cls(**kw)


def layer_kwargs(cfg: Gemma3Config, i: int) -> dict:
    """Static keyword arguments of block ``i``: ``{"sliding": bool}``."""
    return {"sliding": cfg.layer_types[i] == "sliding_attention"}


# ----------------------------------------------------------------------------- building blocks

def rms_norm(x, weight, eps: float, dtype=None):
    """Gemma RMSNorm ``x / sqrt(mean(x**2) + eps) * (1 + weight)`` in float32, result in ``dtype``
    (default: ``x.dtype``)."""
    dtype = x.dtype if dtype is None else dtype
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * (1.0 + weight.astype(jnp.float32))).astype(dtype)


def _inv_freq(cfg: Gemma3Config, sliding: bool) -> np.ndarray:
    d = cfg.head_dim
    base = cfg.rope_local_theta if sliding else cfg.rope_theta
    inv = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if not sliding:
        inv = inv / cfg.rope_scaling_factor
    return inv.astype(np.float32)


def _rope_tables(positions, cfg: Gemma3Config, sliding: bool):
    ang = positions.astype(jnp.float32)[:, None] * jnp.asarray(_inv_freq(cfg, sliding))[None, :]
    return jnp.cos(ang), jnp.sin(ang)                     # (T, head_dim / 2)


def _dense(w):
    if isinstance(w, QuantizedTensor):
        from lowbit.core.quantizers import dequantize

        return dequantize(w, jnp.float32)
    return w


def _mask(q_pos, k_pos, window: int | None):
    """Boolean (T, S): query at ``q_pos`` may attend key at ``k_pos``."""
    diff = q_pos[:, None] - k_pos[None, :]
    m = diff >= 0
    if window is not None:
        m = m & (diff < window)
    return m


def _softcap(x, cap):
    return x if cap is None else cap * jnp.tanh(x / cap)


def _attend(q, k, v, mask, cfg: Gemma3Config):
    """Grouped-query attention. q (B,T,H,d), k/v (B,S,KV,d), mask (T,S) -> (B,T,H*d); scores,
    softmax and normalisation in float32 (the layout of :func:`lowbit.models.llama._attend`)."""
    B, T, H, d = q.shape
    S, kv = k.shape[1], k.shape[2]
    g = H // kv
    qt = q.reshape(B, T, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(B, kv, g * T, d)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    s = jnp.einsum("bkqd,bksd->bkqs", qt, kt, preferred_element_type=jnp.float32)
    s = s.reshape(B, kv, g, T, S) * (1.0 / math.sqrt(cfg.query_pre_attn_scalar))
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bkqs,bksd->bkqd", p.reshape(B, kv, g * T, S).astype(v.dtype), vt,
                   preferred_element_type=jnp.float32)
    o = (o.reshape(B, kv, g, T, d) / denom).astype(q.dtype)
    return o.transpose(0, 3, 1, 2, 4).reshape(B, T, H * d)


#: Query rows per attention chunk (see :data:`lowbit.models.llama.ATTN_CHUNK`).
ATTN_CHUNK = 128


def _causal_self_attend(q, k, v, positions, cfg: Gemma3Config, window: int | None, chunk: int = ATTN_CHUNK):
    T = q.shape[1]
    if T <= chunk:
        return _attend(q, k, v, _mask(positions, positions, window), cfg)
    outs = []
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        lo = 0 if window is None else max(0, s - window + 1)   # positions step by >= 1
        outs.append(_attend(q[:, s:e], k[:, lo:e], v[:, lo:e], _mask(positions[s:e], positions[lo:e], window), cfg))
    return jnp.concatenate(outs, axis=1)


def _qkv(layer, h, cfg: Gemma3Config, cos, sin):
    B, T, _ = h.shape
    a = layer["self_attn"]
    q = ops.linear(h, a["q_proj"]).reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = ops.linear(h, a["k_proj"]).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = ops.linear(h, a["v_proj"]).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    q = rms_norm(q, a["q_norm"], cfg.rms_norm_eps)
    k = rms_norm(k, a["k_norm"], cfg.rms_norm_eps)
    return apply_rope(q, cos, sin, "half"), apply_rope(k, cos, sin, "half"), v


def _after_attention(layer, x, attn, cfg: Gemma3Config, inputs, stop: int = len(LINEARS)):
    """o_proj, the post-attention norm and residual, then the MLP half of the block. With ``inputs``
    records each linear's input; returns ``None`` once the input of ``LINEARS[stop]`` is recorded."""
    a, m = layer["self_attn"], layer["mlp"]
    if inputs is not None:
        inputs["self_attn/o_proj"] = attn
    if stop == LINEARS.index("self_attn/o_proj"):
        return None
    o = ops.linear(attn, a["o_proj"])
    x = x + rms_norm(o, layer["post_attention_layernorm"], cfg.rms_norm_eps).astype(x.dtype)
    h2 = rms_norm(x, layer["pre_feedforward_layernorm"], cfg.rms_norm_eps)
    if inputs is not None:
        inputs.update({"mlp/gate_proj": h2, "mlp/up_proj": h2})
    if stop in (LINEARS.index("mlp/gate_proj"), LINEARS.index("mlp/up_proj")):
        return None
    act = jax.nn.gelu(ops.linear(h2, m["gate_proj"]), approximate=True) * ops.linear(h2, m["up_proj"])
    if inputs is not None:
        inputs["mlp/down_proj"] = act
    if stop == LINEARS.index("mlp/down_proj"):
        return None
    d = ops.linear(act, m["down_proj"])
    return x + rms_norm(d, layer["post_feedforward_layernorm"], cfg.rms_norm_eps).astype(x.dtype)


# ----------------------------------------------------------------------------- the model

def embed(params, tokens, cfg: Gemma3Config):
    """Token ids ``(B, T)`` -> ``embed_tokens[ids] * sqrt(hidden_size)`` in ``cfg.dtype``."""
    tokens = jnp.asarray(tokens)
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"tokens: ids must be in [0, {cfg.vocab_size}), got range [{lo}, {hi}]")
    dt = cfg.compute_dtype
    x = jnp.take(_dense(params["embed_tokens"]), tokens, axis=0).astype(dt)
    return x * jnp.asarray(math.sqrt(cfg.hidden_size), dt)


def block(layer, x, cfg: Gemma3Config, *, sliding: bool = False, capture: bool = False, positions=None,
          capture_upto: str | None = None):
    """One decoder layer on ``x (B, T, D)`` (causal; ``positions``: strictly increasing ints, default
    ``0..T-1``); ``sliding``: a sliding-window layer (:func:`layer_kwargs`).

    With ``capture=True`` returns ``(x_out, inputs)``, ``inputs[path]`` the exact input of the linear
    ``layer[path]`` (paths of :data:`LINEARS`); with ``capture_upto`` (a path of :data:`LINEARS`)
    stops as soon as that input is known and returns ``(None, inputs)``.
    """
    if capture_upto is not None and (not capture or capture_upto not in LINEARS):
        raise ValueError(f"capture_upto={capture_upto!r}: expected one of {LINEARS}, with capture=True")
    stop = LINEARS.index(capture_upto) if capture_upto is not None else len(LINEARS)
    T = x.shape[1]
    positions = jnp.arange(T) if positions is None else jnp.asarray(positions)
    h = rms_norm(x, layer["input_layernorm"], cfg.rms_norm_eps)
    inputs = {"self_attn/q_proj": h, "self_attn/k_proj": h, "self_attn/v_proj": h} if capture else None
    if stop <= LINEARS.index("self_attn/v_proj"):
        return None, inputs
    cos, sin = _rope_tables(positions, cfg, sliding)
    q, k, v = _qkv(layer, h, cfg, cos, sin)
    attn = _causal_self_attend(q, k, v, positions, cfg, cfg.sliding_window if sliding else None)
    x = _after_attention(layer, x, attn, cfg, inputs, stop)
    return (x, inputs) if capture else x


def block_with_cache(layer, x, cfg: Gemma3Config, cache, pos, *, sliding: bool = False):
    """Decode step: ``x (B, t, D)`` at positions ``pos .. pos+t-1`` against a preallocated KV cache
    ``(k, v)`` each ``(B, L, num_kv_heads, head_dim)`` (written at ``pos``; a sliding layer masks
    the slots more than ``sliding_window - 1`` positions back). Returns ``(x_out, new_cache)``."""
    t = x.shape[1]
    ck, cv = cache
    L = ck.shape[1]
    positions = pos + jnp.arange(t)
    cos, sin = _rope_tables(positions, cfg, sliding)
    h = rms_norm(x, layer["input_layernorm"], cfg.rms_norm_eps)
    q, k, v = _qkv(layer, h, cfg, cos, sin)
    ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, pos, 0, 0))
    cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, pos, 0, 0))
    mask = _mask(positions, jnp.arange(L), cfg.sliding_window if sliding else None)
    attn = _attend(q, ck.astype(q.dtype), cv.astype(v.dtype), mask, cfg)
    return _after_attention(layer, x, attn, cfg, None), (ck, cv)


def head_inputs(params, x, cfg: Gemma3Config):
    """The inputs of ``lm_head``: the final (Gemma) RMSNorm of ``x`` in float32."""
    return rms_norm(x, params["norm"], cfg.rms_norm_eps, dtype=jnp.float32)


def head(params, x, cfg: Gemma3Config):
    """Final norm + lm_head (or the tied embedding) in float32 (+ optional soft-capping)."""
    w = params["embed_tokens"] if cfg.tie_word_embeddings else params["lm_head"]
    logits = ops.linear(head_inputs(params, x, cfg), w).astype(jnp.float32)
    return _softcap(logits, cfg.final_logit_softcapping)


def head_params(params, cfg: Gemma3Config) -> dict:
    """The parameters :func:`head` reads."""
    keys = ("norm", "embed_tokens") if cfg.tie_word_embeddings else ("norm", "lm_head")
    return {k: params[k] for k in keys}


def forward(params, tokens, cfg: Gemma3Config):
    """Logits ``(B, T, vocab)`` float32 for tokens ``(B, T)`` (or ``(T,)`` -> ``(T, vocab)``)."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim not in (1, 2):
        raise ValueError(f"tokens: expected shape (batch, seq) or (seq,), got {tokens.shape}")
    if tokens.ndim == 1:
        return forward(params, tokens[None], cfg)[0]
    if tokens.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"tokens: sequence length {tokens.shape[1]} exceeds the model's context "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    x = embed(params, tokens, cfg)
    for i, layer in enumerate(params["layers"]):
        x = block(layer, x, cfg, **layer_kwargs(cfg, i))
    return head(params, x, cfg)


forward_jit = jax.jit(forward, static_argnames=("cfg",))
block_jit = jax.jit(block, static_argnames=("cfg", "sliding", "capture", "capture_upto"))
embed_jit = jax.jit(embed, static_argnames=("cfg",))
head_jit = jax.jit(head, static_argnames=("cfg",))


# ----------------------------------------------------------------------------- params

def shapes(cfg: Gemma3Config) -> dict[str, tuple[int, ...]]:
    D, F, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    layer = {"input_layernorm": (D,), "post_attention_layernorm": (D,), "pre_feedforward_layernorm": (D,),
             "post_feedforward_layernorm": (D,), "self_attn/q_norm": (hd,), "self_attn/k_norm": (hd,),
             "self_attn/q_proj": (q, D), "self_attn/k_proj": (kv, D), "self_attn/v_proj": (kv, D),
             "self_attn/o_proj": (D, q), "mlp/gate_proj": (F, D), "mlp/up_proj": (F, D),
             "mlp/down_proj": (D, F)}
    out = {"embed_tokens": (V, D), "norm": (D,)}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = (V, D)
    for i in range(cfg.num_layers):
        out.update({f"layers/{i}/{k}": s for k, s in layer.items()})
    return out


def check_params(params, cfg: Gemma3Config) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped parameter."""
    from lowbit.core.transforms import flatten

    if not isinstance(params, dict) or not isinstance(params.get("layers"), list):
        raise ValueError("params: expected a dict with a 'layers' list (see lowbit.models.gemma3)")
    flat = flatten(params)
    want = shapes(cfg)
    problems = [f"missing {p} {s}" for p, s in want.items() if p not in flat]
    problems += [f"unexpected {p}" for p in flat if p not in want]
    problems += [f"{p}: shape {tuple(flat[p].shape)} != expected {s}" for p, s in want.items()
                 if p in flat and tuple(flat[p].shape) != s]
    if problems:
        raise ValueError(f"params do not match the Gemma-3 config ({len(problems)} problems): "
                         + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))


def init_params(key, cfg: Gemma3Config, dtype=jnp.float32) -> dict:
    """Random parameters for tests: linears ~ N(0, 1/in_features), embeddings ~ N(0, 1) / sqrt(D)
    (so that the scaled embeddings are ~ N(0, 1)), norm weights ~ N(0, 0.2) (HF convention: the
    norm multiplies by ``1 + w``)."""
    want = shapes(cfg)
    keys = jax.random.split(key, len(want))
    flat = {}
    for k, (path, shape) in zip(keys, sorted(want.items())):
        z = jax.random.normal(k, shape, jnp.float32)
        v = 0.2 * z if path.endswith("norm") else z / math.sqrt(shape[1])
        flat[path] = v.astype(dtype)
    return nest(flat, cfg.num_layers)


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

    pat = re.compile(r"^(?:model\.)?(?:language_model\.)?(?:model\.)?(layers\.(\d+)\.(.+)|embed_tokens\.weight|norm\.weight)$")
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

#: true-sequential order of a block's linears
SEQUENTIAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"),
    ("self_attn/o_proj",),
    ("mlp/gate_proj", "mlp/up_proj"),
    ("mlp/down_proj",),
)

#: what produces each linear's input (norm weights are Gemma-style ``1 + w``, see the module docstring)
PRODUCERS = {"self_attn/q_proj": "input_layernorm", "self_attn/k_proj": "input_layernorm",
             "self_attn/v_proj": "input_layernorm", "self_attn/o_proj": "self_attn/v_proj",
             "mlp/gate_proj": "pre_feedforward_layernorm", "mlp/up_proj": "pre_feedforward_layernorm",
             "mlp/down_proj": "mlp/up_proj"}


def _register():
    from lowbit.models.protocol import Family, register_family

    return register_family(Family(
        name="gemma3", config_cls=Gemma3Config, linears=lambda cfg: LINEARS,
        sequential_groups=lambda cfg: SEQUENTIAL_GROUPS, producers=lambda cfg: PRODUCERS,
        outside=("embed_tokens", "lm_head"), embed_jit=embed_jit, block_jit=block_jit, head_jit=head_jit,
        head_inputs=head_inputs, head_params=head_params, block_with_cache=block_with_cache,
        layer_kwargs=layer_kwargs))


FAMILY = _register()
