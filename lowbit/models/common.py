"""Building blocks shared by the decoder families :mod:`lowbit.models.llama` and
:mod:`lowbit.models.gemma3`: one implementation of each piece, parameterised where the families
differ.

* :class:`DecoderConfig`: the conversions (``compute_dtype``, ``replace``, ``to_dict``,
  ``from_dict``) and the checks every family config makes (sizes, grouped-query attention, dtype,
  special ids); :func:`hf_common` reads the fields every HF ``config.json`` spells the same way.
* RMSNorm (:func:`rms_norm`: ``w * x / rms(x)`` in the activation dtype, or with
  ``unit_offset=True`` Gemma's ``x / rms(x) * (1 + w)`` in float32), RoPE (:func:`rope_frequencies`,
  :func:`rope_tables`, :func:`apply_rope`), attention (:func:`causal_mask`, :func:`attend`,
  :func:`causal_self_attend`: grouped-query, float32 softmax, chunked over the queries).
* The decoder layer (:func:`block`, :func:`block_with_cache`) described by a :class:`LayerSpec`
  (norm, RoPE frequencies and style, score scale, sliding window, q/k norms, MLP activation,
  Llama's pre-norm residuals or Gemma's "sandwich" norms around each branch); the model ends
  (:func:`embed`, :func:`lm_head`, :func:`head_params`) and :func:`forward`.
* Parameters: :func:`linear_shapes` / :func:`model_shapes`, :func:`check_param_shapes`,
  :func:`nest`, :func:`init_from_shapes`; and :func:`register_decoder`, the family registration.

Every linear goes through :func:`lowbit.ops.linear` (dense or quantized weights alike).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lowbit import ops
from lowbit.core.qtensor import QuantizedTensor

__all__ = ["LINEARS", "SEQUENTIAL_GROUPS", "DTYPES", "ROPE_STYLES", "ATTN_CHUNK", "DecoderConfig", "hf_common",
           "rms_norm", "rope_frequencies", "rope_tables", "apply_rope", "dense", "causal_mask", "attend",
           "causal_self_attend", "LayerSpec", "project_qkv", "attention_out_and_mlp", "block",
           "block_with_cache", "embed", "lm_head", "head_params", "forward", "linear_shapes", "model_shapes",
           "check_param_shapes", "nest", "init_from_shapes", "producers", "register_decoder"]

#: Paths (relative to a layer) of the linear weights of a block, in execution order.
LINEARS = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
           "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")

#: true-sequential order of a block's linears (the GPTQ reference's ``sequential`` groups)
SEQUENTIAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"),
    ("self_attn/o_proj",),
    ("mlp/gate_proj", "mlp/up_proj"),
    ("mlp/down_proj",),
)

DTYPES = ("float32", "bfloat16", "float16")
ROPE_STYLES = ("half", "interleaved")

#: Query rows per attention chunk in :func:`causal_self_attend`: causal self-attention is computed
#: chunk by chunk against the keys up to the chunk's end only (skipping the masked upper triangle and
#: keeping the score tiles cache-sized: ~5x faster than one (T, T) softmax at T=2048 on CPU).
ATTN_CHUNK = 128


# ----------------------------------------------------------------------------- configs

@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Base of the frozen family config dataclasses (``LlamaConfig``, ``Gemma3Config``): their
    leading fields (the sizes every family has), checks and conversions."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None

    def check_sizes(self, names: tuple[str, ...]) -> None:
        """Default ``num_kv_heads`` to ``num_heads``; then ``names`` must be positive ints, the query
        heads a multiple of the key/value heads and ``head_dim`` even (RoPE)."""
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        cls = type(self).__name__
        for name in names:
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{cls}.{name}={v!r}: expected a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{cls}: num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"{cls}.head_dim={self.head_dim}: RoPE needs an even head_dim")

    def check_dtype_and_special_ids(self) -> None:
        cls = type(self).__name__
        if self.dtype not in DTYPES:
            raise ValueError(f"{cls}.dtype={self.dtype!r}: expected one of {DTYPES}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                raise ValueError(f"{cls}.{name}={v}: outside the vocabulary [0, {self.vocab_size})")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """Inverse of :meth:`to_dict` (``dataclasses.asdict``); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown keys {unknown}")
        return cls(**d)


def hf_common(d: dict) -> dict:
    """The config fields every HF ``config.json`` spells the same way: sizes and special ids (the
    first of a list of ``eos_token_id``)."""
    eos = d.get("eos_token_id")
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    heads = int(d["num_attention_heads"])
    return dict(vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]), num_layers=int(d["num_hidden_layers"]),
                num_heads=heads, num_kv_heads=int(d.get("num_key_value_heads") or heads),
                bos_token_id=d.get("bos_token_id"), eos_token_id=eos)


# ----------------------------------------------------------------------------- norms, RoPE, attention

def rms_norm(x, weight, eps: float, dtype=None, *, unit_offset: bool = False):
    """RMSNorm over the last axis, statistics in float32, result in ``dtype`` (default ``x.dtype``).

    ``unit_offset=False`` (Llama): ``weight * x / sqrt(mean(x**2) + eps)`` with the product taken in
    ``dtype``; ``unit_offset=True`` (Gemma, HF convention): ``x / sqrt(mean(x**2) + eps) * (1 + weight)``
    with the product taken in float32.
    """
    dtype = x.dtype if dtype is None else dtype
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if unit_offset:
        return (xf * (1.0 + weight.astype(jnp.float32))).astype(dtype)
    return weight.astype(dtype) * xf.astype(dtype)


def rope_frequencies(head_dim: int, theta: float, *, scaling: str | None = None, factor: float = 1.0,
                     low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                     original_max_position: int | None = None) -> np.ndarray:
    """float32 inverse frequencies ``theta ** (-2j / head_dim)`` for ``j < head_dim / 2``, scaled by
    ``scaling``: ``None``, ``"linear"`` (divided by ``factor``) or ``"llama3"`` (Llama 3.1)."""
    d = head_dim
    inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if scaling == "linear":
        inv = inv / factor
    elif scaling == "llama3":
        # Llama 3.1: long wavelengths slowed down by `factor`, short ones kept, smooth in between.
        old, lo, hi = original_max_position, low_freq_factor, high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = np.clip((old / wavelen - lo) / (hi - lo), 0.0, 1.0)
        inv = (1 - smooth) * inv / factor + smooth * inv
    return inv.astype(np.float32)


def rope_tables(positions, inv_freq):
    """``cos, sin (T, head_dim / 2)`` of the angles ``positions * inv_freq`` (float32)."""
    ang = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin, style: str):
    """Rotate ``x (B, T, H, head_dim)`` by the angles of ``cos, sin (T, head_dim/2)``: ``"half"``
    rotates the pairs ``(j, j + head_dim/2)`` (HF/NeoX), ``"interleaved"`` ``(2j, 2j+1)`` (GPT-J/GGUF)."""
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


def dense(w):
    """``w`` as a float array (a QuantizedTensor is dequantized to float32)."""
    if isinstance(w, QuantizedTensor):
        from lowbit.core.quantizers import dequantize

        return dequantize(w, jnp.float32)
    return w


def causal_mask(q_pos, k_pos, window: int | None = None):
    """Boolean (T, S): query at ``q_pos`` may attend key at ``k_pos`` (causal; with ``window``, only
    the keys ``q - window < k <= q``)."""
    diff = q_pos[:, None] - k_pos[None, :]
    m = diff >= 0
    if window is not None:
        m = m & (diff < window)
    return m


def attend(q, k, v, mask, scale: float):
    """Grouped-query attention. q (B,T,H,d), k/v (B,S,KV,d), mask (T,S) -> (B,T,H*d); the scores
    are multiplied by ``scale``.

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
    s = s.reshape(B, kv, g, T, S) * scale
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    denom = jnp.sum(p, axis=-1, keepdims=True)                  # (B, KV, G, T, 1) >= 1
    o = jnp.einsum("bkqs,bksd->bkqd", p.reshape(B, kv, g * T, S).astype(v.dtype), vt,
                   preferred_element_type=jnp.float32)
    o = (o.reshape(B, kv, g, T, d) / denom).astype(q.dtype)
    return o.transpose(0, 3, 1, 2, 4).reshape(B, T, H * d)


def causal_self_attend(q, k, v, positions, scale: float, window: int | None = None, chunk: int = ATTN_CHUNK):
    """Self-attention of a sequence with strictly increasing integer ``positions``, computed in
    chunks of ``chunk`` queries (see :data:`ATTN_CHUNK`)."""
    T = q.shape[1]
    if T <= chunk:
        return attend(q, k, v, causal_mask(positions, positions, window), scale)
    outs = []
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        # keys after the chunk's last query are in its future; with a sliding window, keys more
        # than `window` indices before its first query are out of reach (positions step >= 1)
        lo = 0 if window is None else max(0, s - window + 1)
        outs.append(attend(q[:, s:e], k[:, lo:e], v[:, lo:e],
                           causal_mask(positions[s:e], positions[lo:e], window), scale))
    return jnp.concatenate(outs, axis=1)


# ----------------------------------------------------------------------------- the decoder layer

@dataclasses.dataclass(frozen=True, eq=False)
class LayerSpec:
    """What a family's decoder layer computes, for :func:`block` / :func:`block_with_cache`.

    Attributes:
      eps: RMSNorm epsilon; unit_offset: Gemma's ``(1 + w)`` RMSNorm (see :func:`rms_norm`).
      inv_freq: the layer's RoPE inverse frequencies (:func:`rope_frequencies`); rope_style:
        ``"half"`` or ``"interleaved"``.
      scale: multiplier of the attention scores; window: sliding window (``None``: all positions).
      qk_norm: q and k RMS-normalised over each head's features (weights ``q_norm``/``k_norm``)
        after the projection and before RoPE.
      activation: of the gated MLP, ``down(act(gate(h)) * up(h))``.
      mlp_norm: the layer norm whose output feeds the MLP.
      sandwich: the attention and MLP outputs are normalised (``post_attention_layernorm`` /
        ``post_feedforward_layernorm``) before their residual add (Gemma); else added as they are.
    """
    eps: float
    inv_freq: Any
    scale: float
    rope_style: str = "half"
    window: int | None = None
    qk_norm: bool = False
    unit_offset: bool = False
    activation: Callable = jax.nn.silu
    mlp_norm: str = "post_attention_layernorm"
    sandwich: bool = False

    def norm(self, x, weight, dtype=None):
        return rms_norm(x, weight, self.eps, dtype, unit_offset=self.unit_offset)


def project_qkv(layer, h, cfg, spec: LayerSpec, cos, sin):
    """q (B,T,H,d), k, v (B,T,KV,d) of the normalised input ``h``; q and k rotated."""
    B, T, _ = h.shape
    a = layer["self_attn"]
    q = ops.linear(h, a["q_proj"], a.get("q_bias")).reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = ops.linear(h, a["k_proj"], a.get("k_bias")).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = ops.linear(h, a["v_proj"], a.get("v_bias")).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    if spec.qk_norm:  # RMSNorm over each head's features, before RoPE
        q = spec.norm(q, a["q_norm"])
        k = spec.norm(k, a["k_norm"])
    return apply_rope(q, cos, sin, spec.rope_style), apply_rope(k, cos, sin, spec.rope_style), v


def attention_out_and_mlp(layer, x, attn, spec: LayerSpec, inputs, stop: int = len(LINEARS)):
    """The block after attention: o_proj and its residual, then the MLP half. With ``inputs`` (a
    dict) records each linear's input; returns ``None`` as soon as the input of ``LINEARS[stop]``
    is recorded (``stop < len(LINEARS)``)."""
    a, m = layer["self_attn"], layer["mlp"]
    if inputs is not None:
        inputs["self_attn/o_proj"] = attn
    if stop == LINEARS.index("self_attn/o_proj"):
        return None
    o = ops.linear(attn, a["o_proj"], a.get("o_bias"))
    if spec.sandwich:
        o = spec.norm(o, layer["post_attention_layernorm"])
    x = x + o.astype(x.dtype)
    h2 = spec.norm(x, layer[spec.mlp_norm])
    if inputs is not None:
        inputs.update({"mlp/gate_proj": h2, "mlp/up_proj": h2})
    if stop in (LINEARS.index("mlp/gate_proj"), LINEARS.index("mlp/up_proj")):
        return None
    act = spec.activation(ops.linear(h2, m["gate_proj"])) * ops.linear(h2, m["up_proj"])
    if inputs is not None:
        inputs["mlp/down_proj"] = act
    if stop == LINEARS.index("mlp/down_proj"):
        return None
    d = ops.linear(act, m["down_proj"])
    if spec.sandwich:
        d = spec.norm(d, layer["post_feedforward_layernorm"])
    return x + d.astype(x.dtype)


def block(layer, x, cfg, spec: LayerSpec, *, capture: bool = False, positions=None,
          capture_upto: str | None = None):
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
    h = spec.norm(x, layer["input_layernorm"])
    inputs = {"self_attn/q_proj": h, "self_attn/k_proj": h, "self_attn/v_proj": h} if capture else None
    if stop <= LINEARS.index("self_attn/v_proj"):
        return None, inputs
    cos, sin = rope_tables(positions, spec.inv_freq)
    q, k, v = project_qkv(layer, h, cfg, spec, cos, sin)
    attn = causal_self_attend(q, k, v, positions, spec.scale, spec.window)
    x = attention_out_and_mlp(layer, x, attn, spec, inputs, stop)
    return (x, inputs) if capture else x


def block_with_cache(layer, x, cfg, spec: LayerSpec, cache, pos):
    """Decode step: ``x (B, t, D)`` at positions ``pos .. pos+t-1`` against a preallocated KV cache.

    ``cache = (k, v)`` each ``(B, L, num_kv_heads, head_dim)``; the new keys/values are written at
    ``pos`` (a traced scalar is fine) and the queries attend to cache slots ``<=`` their position
    (and, with ``spec.window``, less than ``window`` positions back). Returns ``(x_out, new_cache)``.
    """
    t = x.shape[1]
    ck, cv = cache
    L = ck.shape[1]
    positions = pos + jnp.arange(t)
    cos, sin = rope_tables(positions, spec.inv_freq)
    h = spec.norm(x, layer["input_layernorm"])
    q, k, v = project_qkv(layer, h, cfg, spec, cos, sin)
    ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, pos, 0, 0))
    cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, pos, 0, 0))
    mask = causal_mask(positions, jnp.arange(L), spec.window)
    attn = attend(q, ck.astype(q.dtype), cv.astype(v.dtype), mask, spec.scale)
    return attention_out_and_mlp(layer, x, attn, spec, None), (ck, cv)


# ----------------------------------------------------------------------------- the model ends

def embed(params, tokens, cfg):
    """Token ids ``(B, T)`` -> ``embed_tokens[ids]`` ``(B, T, D)`` in ``cfg.dtype`` (ids checked
    against the vocabulary outside of jit)."""
    tokens = jnp.asarray(tokens)
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"tokens: ids must be in [0, {cfg.vocab_size}), got range [{lo}, {hi}]")
    table = dense(params["embed_tokens"])
    return jnp.take(table, tokens, axis=0).astype(cfg.compute_dtype)


def lm_head(params, h, cfg):
    """float32 logits of the final-normed hidden states ``h``: the lm_head (or the tied embedding)."""
    w = params["embed_tokens"] if cfg.tie_word_embeddings else params["lm_head"]
    return ops.linear(h, w).astype(jnp.float32)


def head_params(params, cfg) -> dict:
    """The parameters a family's ``head`` reads (final norm and lm_head, or the tied embedding)."""
    keys = ("norm", "embed_tokens") if cfg.tie_word_embeddings else ("norm", "lm_head")
    return {k: params[k] for k in keys}


def forward(params, tokens, cfg, *, embed_fn, block_fn, head_fn, layer_kwargs=None):
    """Logits ``(B, T, vocab)`` float32 for tokens ``(B, T)`` (or ``(T,)`` -> ``(T, vocab)``) of the
    family whose pieces are ``embed_fn``, ``block_fn`` (called with ``layer_kwargs(cfg, i)``) and
    ``head_fn``."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim not in (1, 2):
        raise ValueError(f"tokens: expected shape (batch, seq) or (seq,), got {tokens.shape}")
    if tokens.ndim == 1:
        return forward(params, tokens[None], cfg, embed_fn=embed_fn, block_fn=block_fn, head_fn=head_fn,
                       layer_kwargs=layer_kwargs)[0]
    if tokens.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"tokens: sequence length {tokens.shape[1]} exceeds the model's context "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    x = embed_fn(params, tokens, cfg)
    for i, layer in enumerate(params["layers"]):
        x = block_fn(layer, x, cfg, **(layer_kwargs(cfg, i) if layer_kwargs is not None else {}))
    return head_fn(params, x, cfg)


# ----------------------------------------------------------------------------- params

def linear_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Shapes ``(out, in)`` of a block's linears (relative paths, :data:`LINEARS` order)."""
    D, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    return {"self_attn/q_proj": (q, D), "self_attn/k_proj": (kv, D), "self_attn/v_proj": (kv, D),
            "self_attn/o_proj": (D, q), "mlp/gate_proj": (F, D), "mlp/up_proj": (F, D),
            "mlp/down_proj": (D, F)}


def model_shapes(cfg, layer: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Flat path -> shape of a whole model whose every layer has the relative shapes ``layer``."""
    D, V = cfg.hidden_size, cfg.vocab_size
    out = {"embed_tokens": (V, D), "norm": (D,)}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = (V, D)
    for i in range(cfg.num_layers):
        out.update({f"layers/{i}/{k}": s for k, s in layer.items()})
    return out


def check_param_shapes(params, want: dict[str, tuple[int, ...]], *, module: str, what: str = "the config") -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped parameter (``want``: flat
    path -> shape; ``module`` is named in the error for a params tree without a ``layers`` list)."""
    from lowbit.core.transforms import flatten

    if not isinstance(params, dict) or not isinstance(params.get("layers"), list):
        raise ValueError(f"params: expected a dict with a 'layers' list (see {module})")
    flat = flatten(params)
    problems = [f"missing {p} {s}" for p, s in want.items() if p not in flat]
    problems += [f"unexpected {p}" for p in flat if p not in want]
    problems += [f"{p}: shape {tuple(flat[p].shape)} != expected {s}" for p, s in want.items()
                 if p in flat and tuple(flat[p].shape) != s]
    if problems:
        raise ValueError(f"params do not match {what} ({len(problems)} problems): "
                         + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))


def nest(flat: dict[str, Any], num_layers: int) -> dict:
    """Flat ``"a/b/c"`` paths -> the nested params tree (``params["layers"]`` a list of dicts)."""
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


def init_from_shapes(key, want: dict[str, tuple[int, ...]], num_layers: int, dtype,
                     draw: Callable[[str, tuple[int, ...], Any], Any]) -> dict:
    """Random params: one key per path (sorted), ``draw(path, shape, z)`` maps a standard normal
    ``z`` to the leaf's values (cast to ``dtype``)."""
    keys = jax.random.split(key, len(want))
    flat = {}
    for k, (path, shape) in zip(keys, sorted(want.items())):
        z = jax.random.normal(k, shape, jnp.float32)
        flat[path] = draw(path, shape, z).astype(dtype)
    return nest(flat, num_layers)


# ----------------------------------------------------------------------------- the family

def producers(mlp_norm: str) -> dict[str, str]:
    """What produces each linear's input: a norm (a scale folds into its weight) or a linear (into
    its rows); ``mlp_norm`` is the norm feeding the MLP."""
    return {"self_attn/q_proj": "input_layernorm", "self_attn/k_proj": "input_layernorm",
            "self_attn/v_proj": "input_layernorm", "self_attn/o_proj": "self_attn/v_proj",
            "mlp/gate_proj": mlp_norm, "mlp/up_proj": mlp_norm, "mlp/down_proj": "mlp/up_proj"}


def scale_groups(producer_map: dict) -> tuple[tuple[str, tuple[str, ...], str | None], ...]:
    """AWQ's scale groups of a decoder block: ``(producer, linears fed by it, sub-module whose output
    the search compares)``; ``None``: the linear's own output (the llm-awq reference's Llama groups)."""
    return ((producer_map["self_attn/q_proj"], ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"),
             "self_attn"),
            (producer_map["self_attn/o_proj"], ("self_attn/o_proj",), None),
            (producer_map["mlp/gate_proj"], ("mlp/gate_proj", "mlp/up_proj"), "mlp"),
            (producer_map["mlp/down_proj"], ("mlp/down_proj",), None))


def submodule(layer, name: str, h, cfg, spec: LayerSpec, positions=None):
    """The output of a block's sub-module on its (normalised) input ``h (B, T, D)``: ``"self_attn"``
    (projections, RoPE, causal attention and ``o_proj``; no residual, no post-norm) or ``"mlp"``
    (gate / up, activation, ``down_proj``). What AWQ's scale search compares (llm-awq's
    ``module2inspect``: ``self_attn`` and ``mlp``)."""
    if name == "self_attn":
        positions = jnp.arange(h.shape[1]) if positions is None else jnp.asarray(positions)
        cos, sin = rope_tables(positions, spec.inv_freq)
        q, k, v = project_qkv(layer, h, cfg, spec, cos, sin)
        attn = causal_self_attend(q, k, v, positions, spec.scale, spec.window)
        return ops.linear(attn, layer["self_attn"]["o_proj"], layer["self_attn"].get("o_bias"))
    if name == "mlp":
        m = layer["mlp"]
        act = spec.activation(ops.linear(h, m["gate_proj"])) * ops.linear(h, m["up_proj"])
        return ops.linear(act, m["down_proj"])
    raise ValueError(f"name={name!r}: expected 'self_attn' or 'mlp'")


def register_decoder(name: str, config_cls: type, producer_map: dict, *, embed_jit, block_jit, head_jit,
                     head_inputs, block_with_cache, module_fn, layer_kwargs=None, norm_offset: float = 0.0):
    """Register a decoder family with :data:`LINEARS`, :data:`SEQUENTIAL_GROUPS`, the embedding and
    lm_head outside the blocks, :func:`head_params` and AWQ's :func:`scale_groups`."""
    from lowbit.models.protocol import Family, register_family

    extra = {} if layer_kwargs is None else {"layer_kwargs": layer_kwargs}
    groups = scale_groups(producer_map)
    return register_family(Family(
        name=name, config_cls=config_cls, linears=lambda cfg: LINEARS,
        sequential_groups=lambda cfg: SEQUENTIAL_GROUPS, producers=lambda cfg: producer_map,
        outside=("embed_tokens", "lm_head"), embed_jit=embed_jit, block_jit=block_jit, head_jit=head_jit,
        head_inputs=head_inputs, head_params=head_params, block_with_cache=block_with_cache,
        scale_groups=lambda cfg: groups, module_fn=module_fn, norm_offset=norm_offset, **extra))
