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
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowbit import ops
from lowbit.core.qtensor import QuantizedTensor

__all__ = ["LlamaConfig", "LINEARS", "embed", "block", "block_with_cache", "head", "forward",
           "forward_jit", "init_params", "rms_norm", "rope_inv_freq", "apply_rope", "check_params",
           "permute_qk_half_to_interleaved", "permute_qk_interleaved_to_half", "param_count",
           "block_jit", "embed_jit", "head_jit", "head_params", "head_inputs", "ATTN_CHUNK", "SEQUENTIAL_GROUPS", "PRODUCERS", "FAMILY", "shapes", "nest"]

#: Paths (relative to a layer) of the linear weights of a block, in execution order.
LINEARS = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
           "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")

ROPE_STYLES = ("half", "interleaved")
DTYPES = ("float32", "bfloat16", "float16")
_ROPE_SCALINGS = (None, "linear", "llama3")
_HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
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

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
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
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None and isinstance(self.num_heads, int) and self.num_heads > 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"LlamaConfig.{name}={v!r}: expected a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig: num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim}: RoPE needs an even head_dim")
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
        if self.dtype not in DTYPES:
            raise ValueError(f"LlamaConfig.dtype={self.dtype!r}: expected one of {DTYPES}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                raise ValueError(f"LlamaConfig.{name}={v}: outside the vocabulary [0, {self.vocab_size})")

    # ------------------------------------------------------------------ conversions
    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """Inverse of :meth:`to_dict` (``dataclasses.asdict``); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"LlamaConfig.from_dict: unknown keys {unknown}")
        return cls(**d)

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
        eos = d.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        heads = int(d["num_attention_heads"])
        kw.update(
            vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]), num_layers=int(d["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=d.get("head_dim") or None, rope_theta=float(theta),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), rope_style="half",
            qkv_bias=bool(d.get("attention_bias", False)) or mt == "qwen2",
            o_bias=bool(d.get("attention_bias", False)) and mt != "qwen2", qk_norm=mt == "qwen3",
            sliding_window=sliding, bos_token_id=d.get("bos_token_id"), eos_token_id=eos, model_type=mt)
        kw.update(overrides)
        return cls(**kw)


# ----------------------------------------------------------------------------- building blocks

def rms_norm(x, weight, eps: float, dtype=None):
    """``weight * x / sqrt(mean(x**2) + eps)``, statistics in float32, result in ``dtype``."""
    dtype = x.dtype if dtype is None else dtype
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(dtype) * xf.astype(dtype)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """float32 inverse frequencies ``theta ** (-2j / head_dim)`` for ``j < head_dim / 2`` (scaled)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if cfg.rope_scaling == "linear":
        inv = inv / cfg.rope_scaling_factor
    elif cfg.rope_scaling == "llama3":
        # Llama 3.1: long wavelengths slowed down by `factor`, short ones kept, smooth in between.
        old, f = cfg.rope_original_max_position, cfg.rope_scaling_factor
        lo, hi = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = np.clip((old / wavelen - lo) / (hi - lo), 0.0, 1.0)
        inv = (1 - smooth) * inv / f + smooth * inv
    return inv.astype(np.float32)


def _rope_tables(positions, cfg: LlamaConfig):
    ang = positions.astype(jnp.float32)[:, None] * jnp.asarray(rope_inv_freq(cfg))[None, :]
    return jnp.cos(ang), jnp.sin(ang)                     # (T, head_dim / 2)


def apply_rope(x, cos, sin, style: str):
    """Rotate ``x (B, T, H, head_dim)`` by the angles of ``cos, sin (T, head_dim/2)``."""
    dt = x.dtype
    x = x.astype(jnp.float32)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    if style == "half":
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    elif style == "interleaved":
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(x.shape)
    else:
        raise ValueError(f"style={style!r}: expected one of {ROPE_STYLES}")
    return out.astype(dt)


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


def _dense(w):
    if isinstance(w, QuantizedTensor):
        from lowbit.core.quantizers import dequantize

        return dequantize(w, jnp.float32)
    return w


def _mask(q_pos, k_pos, cfg: LlamaConfig):
    """Boolean (T, S): query at ``q_pos`` may attend key at ``k_pos``."""
    diff = q_pos[:, None] - k_pos[None, :]
    m = diff >= 0
    if cfg.sliding_window is not None:
        m = m & (diff < cfg.sliding_window)
    return m


def _attend(q, k, v, mask, cfg: LlamaConfig):
    """Grouped-query attention. q (B,T,H,d), k/v (B,S,KV,d), mask (T,S) -> (B,T,H*d).

    Laid out as batched matmuls over (B, KV) with the G = H/KV query heads of a group stacked on
    the row axis; scores, softmax statistics and the normalisation are float32, and the
    normalisation is applied to the (T, d) output instead of the (T, S) probabilities.
    """
    B, T, H, d = q.shape
    S, kv = k.shape[1], k.shape[2]
    g = H // kv
    qt = q.reshape(B, T, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(B, kv, g * T, d)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    s = jnp.einsum("bkqd,bksd->bkqs", qt, kt, preferred_element_type=jnp.float32)
    s = s.reshape(B, kv, g, T, S) * (1.0 / math.sqrt(d))
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    denom = jnp.sum(p, axis=-1, keepdims=True)                  # (B, KV, G, T, 1) >= 1
    o = jnp.einsum("bkqs,bksd->bkqd", p.reshape(B, kv, g * T, S).astype(v.dtype), vt,
                   preferred_element_type=jnp.float32)
    o = (o.reshape(B, kv, g, T, d) / denom).astype(q.dtype)
    return o.transpose(0, 3, 1, 2, 4).reshape(B, T, H * d)


#: Query rows per attention chunk in :func:`block`: causal self-attention is computed chunk by
#: chunk against the keys up to the chunk's end only (skipping the masked upper triangle and
#: keeping the score tiles cache-sized: ~5x faster than one (T, T) softmax at T=2048 on CPU).
ATTN_CHUNK = 128


def _causal_self_attend(q, k, v, positions, cfg: LlamaConfig, chunk: int = ATTN_CHUNK):
    """Self-attention of a sequence with strictly increasing integer ``positions``."""
    T = q.shape[1]
    if T <= chunk:
        return _attend(q, k, v, _mask(positions, positions, cfg), cfg)
    outs = []
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        # keys after the chunk's last query are in its future; with a sliding window, keys more
        # than `window` indices before its first query are out of reach (positions step >= 1)
        lo = 0 if cfg.sliding_window is None else max(0, s - cfg.sliding_window + 1)
        outs.append(_attend(q[:, s:e], k[:, lo:e], v[:, lo:e],
                            _mask(positions[s:e], positions[lo:e], cfg), cfg))
    return jnp.concatenate(outs, axis=1)


def _qkv(layer, h, cfg: LlamaConfig, cos, sin):
    B, T, _ = h.shape
    a = layer["self_attn"]
    q = ops.linear(h, a["q_proj"], a.get("q_bias")).reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = ops.linear(h, a["k_proj"], a.get("k_bias")).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = ops.linear(h, a["v_proj"], a.get("v_bias")).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:  # Qwen3: RMSNorm over each head's features, before RoPE
        q = rms_norm(q, a["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, a["k_norm"], cfg.rms_norm_eps)
    return apply_rope(q, cos, sin, cfg.rope_style), apply_rope(k, cos, sin, cfg.rope_style), v


def _mlp_and_residual(layer, x, attn, cfg: LlamaConfig, inputs, stop: int = len(LINEARS)):
    """The block after attention. With ``inputs`` (a dict) records each linear's input; returns
    ``None`` as soon as the input of ``LINEARS[stop]`` is recorded (``stop < len(LINEARS)``)."""
    a, m = layer["self_attn"], layer["mlp"]
    if inputs is not None:
        inputs["self_attn/o_proj"] = attn
    if stop == LINEARS.index("self_attn/o_proj"):
        return None
    x = x + ops.linear(attn, a["o_proj"], a.get("o_bias")).astype(x.dtype)
    h2 = rms_norm(x, layer["post_attention_layernorm"], cfg.rms_norm_eps)
    if inputs is not None:
        inputs.update({"mlp/gate_proj": h2, "mlp/up_proj": h2})
    if stop in (LINEARS.index("mlp/gate_proj"), LINEARS.index("mlp/up_proj")):
        return None
    act = jax.nn.silu(ops.linear(h2, m["gate_proj"])) * ops.linear(h2, m["up_proj"])
    if inputs is not None:
        inputs["mlp/down_proj"] = act
    if stop == LINEARS.index("mlp/down_proj"):
        return None
    return x + ops.linear(act, m["down_proj"]).astype(x.dtype)


# ----------------------------------------------------------------------------- the model

def embed(params, tokens, cfg: LlamaConfig):
    """Token ids ``(B, T)`` -> hidden states ``(B, T, D)`` in ``cfg.dtype``."""
    tokens = jnp.asarray(tokens)
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"tokens: ids must be in [0, {cfg.vocab_size}), got range [{lo}, {hi}]")
    table = _dense(params["embed_tokens"])
    return jnp.take(table, tokens, axis=0).astype(cfg.compute_dtype)


def block(layer, x, cfg: LlamaConfig, *, capture: bool = False, positions=None, capture_upto: str | None = None):
    """One decoder layer on ``x (B, T, D)`` (causal; ``positions``: strictly increasing ints, default
    ``0..T-1``).

    With ``capture=True`` returns ``(x_out, inputs)`` where ``inputs[path]`` is the exact input of
    the linear ``layer[path]`` (paths of :data:`LINEARS`), shaped ``(B, T, in_features)``. With
    ``capture_upto`` (a path of :data:`LINEARS`) the computation stops as soon as that linear's
    input is known and ``(None, inputs)`` is returned: a calibration pass for the q/k/v group costs
    one RMSNorm instead of a whole block.
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
    cos, sin = _rope_tables(positions, cfg)
    q, k, v = _qkv(layer, h, cfg, cos, sin)
    attn = _causal_self_attend(q, k, v, positions, cfg)
    x = _mlp_and_residual(layer, x, attn, cfg, inputs, stop)
    return (x, inputs) if capture else x


def block_with_cache(layer, x, cfg: LlamaConfig, cache, pos):
    """Decode step: ``x (B, t, D)`` at positions ``pos .. pos+t-1`` against a preallocated KV cache.

    ``cache = (k, v)`` each ``(B, L, num_kv_heads, head_dim)``; the new keys/values are written at
    ``pos`` (a traced scalar is fine) and the queries attend to cache slots ``<=`` their position.
    Returns ``(x_out, new_cache)``.
    """
    t = x.shape[1]
    ck, cv = cache
    L = ck.shape[1]
    positions = pos + jnp.arange(t)
    cos, sin = _rope_tables(positions, cfg)
    h = rms_norm(x, layer["input_layernorm"], cfg.rms_norm_eps)
    q, k, v = _qkv(layer, h, cfg, cos, sin)
    ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, pos, 0, 0))
    cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, pos, 0, 0))
    attn = _attend(q, ck.astype(q.dtype), cv.astype(v.dtype), _mask(positions, jnp.arange(L), cfg), cfg)
    return _mlp_and_residual(layer, x, attn, cfg, None), (ck, cv)


def head(params, x, cfg: LlamaConfig):
    """Final RMSNorm + lm_head (or the tied embedding), computed in float32 -> float32 logits."""
    h = rms_norm(x, params["norm"], cfg.rms_norm_eps, dtype=jnp.float32)
    w = params["embed_tokens"] if cfg.tie_word_embeddings else params["lm_head"]
    return ops.linear(h, w).astype(jnp.float32)


def forward(params, tokens, cfg: LlamaConfig):
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
    for layer in params["layers"]:
        x = block(layer, x, cfg)
    return head(params, x, cfg)


#: ``forward`` compiled with the config static (one compilation per config, param structure and shape).
forward_jit = jax.jit(forward, static_argnames=("cfg",))


# ----------------------------------------------------------------------------- params

def shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    D, F, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    layer = {"input_layernorm": (D,), "post_attention_layernorm": (D,),
             "self_attn/q_proj": (q, D), "self_attn/k_proj": (kv, D), "self_attn/v_proj": (kv, D),
             "self_attn/o_proj": (D, q), "mlp/gate_proj": (F, D), "mlp/up_proj": (F, D),
             "mlp/down_proj": (D, F)}
    if cfg.qkv_bias:
        layer.update({"self_attn/q_bias": (q,), "self_attn/k_bias": (kv,), "self_attn/v_bias": (kv,)})
    if cfg.o_bias:
        layer["self_attn/o_bias"] = (D,)
    if cfg.qk_norm:
        layer.update({"self_attn/q_norm": (hd,), "self_attn/k_norm": (hd,)})
    out = {"embed_tokens": (V, D), "norm": (D,)}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = (V, D)
    for i in range(cfg.num_layers):
        out.update({f"layers/{i}/{k}": s for k, s in layer.items()})
    return out


def check_params(params, cfg: LlamaConfig) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped parameter."""
    from lowbit.core.transforms import flatten

    if not isinstance(params, dict) or not isinstance(params.get("layers"), list):
        raise ValueError("params: expected a dict with a 'layers' list (see lowbit.models.llama)")
    flat = flatten(params)
    want = shapes(cfg)
    problems = [f"missing {p} {s}" for p, s in want.items() if p not in flat]
    problems += [f"unexpected {p}" for p in flat if p not in want]
    problems += [f"{p}: shape {tuple(flat[p].shape)} != expected {s}" for p, s in want.items()
                 if p in flat and tuple(flat[p].shape) != s]
    if problems:
        raise ValueError(f"params do not match the config ({len(problems)} problems): "
                         + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))


def nest(flat: dict[str, Any], num_layers: int) -> dict:
    out: dict[str, Any] = {"layers": [{} for _ in range(num_layers)]}
    for path, v in flat.items():
        parts = path.split("/")
        if parts[0] == "layers":
            node = out["layers"][int(parts[1])]
            parts = parts[2:]
        else:
            node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def init_params(key, cfg: LlamaConfig, dtype=jnp.float32) -> dict:
    """Random parameters for tests: linears ~ N(0, 1/in_features), embeddings ~ N(0, 1),
    norm weights ~ 1 + N(0, 0.1) and biases ~ N(0, 0.1) (non-trivial so tests catch mix-ups)."""
    want = shapes(cfg)
    keys = jax.random.split(key, len(want))
    flat = {}
    for k, (path, shape) in zip(keys, sorted(want.items())):
        z = jax.random.normal(k, shape, jnp.float32)
        if path.endswith(("layernorm", "norm")):
            v = 1.0 + 0.1 * z
        elif path.endswith("_bias"):
            v = 0.1 * z
        elif path in ("embed_tokens", "lm_head"):
            v = z if path == "embed_tokens" else z / math.sqrt(shape[1])
        else:
            v = z / math.sqrt(shape[1])
        flat[path] = v.astype(dtype)
    return nest(flat, cfg.num_layers)


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


def head_params(params, cfg: LlamaConfig) -> dict:
    """The parameters :func:`head` reads (final norm and lm_head, or the tied embedding)."""
    keys = ("norm", "embed_tokens") if cfg.tie_word_embeddings else ("norm", "lm_head")
    return {k: params[k] for k in keys}


def head_inputs(params, x, cfg: LlamaConfig):
    """The inputs of ``lm_head``: the final RMSNorm of ``x`` in float32."""
    return rms_norm(x, params["norm"], cfg.rms_norm_eps, dtype=jnp.float32)


head_jit = jax.jit(head, static_argnames=("cfg",))


# ----------------------------------------------------------------------------- the family

#: true-sequential order of a block's linears (the GPTQ reference's ``sequential`` groups)
SEQUENTIAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"),
    ("self_attn/o_proj",),
    ("mlp/gate_proj", "mlp/up_proj"),
    ("mlp/down_proj",),
)

#: what produces each linear's input: a norm (scale folds into its weight) or a linear (into its rows)
PRODUCERS = {"self_attn/q_proj": "input_layernorm", "self_attn/k_proj": "input_layernorm",
             "self_attn/v_proj": "input_layernorm", "self_attn/o_proj": "self_attn/v_proj",
             "mlp/gate_proj": "post_attention_layernorm", "mlp/up_proj": "post_attention_layernorm",
             "mlp/down_proj": "mlp/up_proj"}


def _register():
    from lowbit.models.protocol import Family, register_family

    return register_family(Family(
        name="llama", config_cls=LlamaConfig, linears=lambda cfg: LINEARS,
        sequential_groups=lambda cfg: SEQUENTIAL_GROUPS, producers=lambda cfg: PRODUCERS,
        outside=("embed_tokens", "lm_head"), embed_jit=embed_jit, block_jit=block_jit, head_jit=head_jit,
        head_inputs=head_inputs, head_params=head_params, block_with_cache=block_with_cache))


FAMILY = _register()
