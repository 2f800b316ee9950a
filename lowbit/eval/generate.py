"""Autoregressive sampling with a preallocated KV cache, and self-generated calibration data.

:func:`generate` prefills the prompt in one pass, then runs ``lax.scan`` over the new tokens; the
whole program is jit-compiled (one compilation per config, batch/prompt shape, length and sampling
options). It does not stop at EOS: it always returns ``prompt + max_new_tokens`` tokens (callers
that want chat-style output cut at ``cfg.eos_token_id`` themselves).

:func:`self_generated_calibration` draws calibration sequences from the model itself (data-free
calibration, as in LLM-QAT, Liu et al. 2023, Sec. 2.1, reused by OneBit, Xu et al. 2024). The exact
procedure, per sequence:

1. token 0: drawn uniformly from ``[0, vocab_size)`` minus ``exclude_ids`` (default: the BOS and EOS
   ids; pass e.g. the control-token ids to exclude those too) with ``first_token="vocab"``, or the
   BOS id with ``first_token="bos"``;
2. tokens 1 .. ``n_greedy``: greedy (arg-max) continuations -- LLM-QAT's "deterministically select
   the top-1 predictions for the first 3~5 tokens" (default ``n_greedy=4``);
3. the remaining tokens up to ``seqlen``: sampled from ``softmax(logits / temperature)``
   (restricted to the ``top_k`` most likely tokens when ``top_k`` is set; default: the full
   distribution at temperature 1, as in LLM-QAT); no stop at EOS.

Keys: sequence batch ``b`` uses ``jax.random.fold_in(key, b)``; inside it, the first token and each
sampling step use their own split, so a (key, nsamples, seqlen, batch_size) tuple fixes the data.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.models.protocol import family_of
from lowbit.progress import Bar

__all__ = ["generate", "self_generated_calibration", "sample_logits"]


def sample_logits(logits, key, temperature: float = 1.0, top_k: int | None = None):
    """Sample ids from ``logits (B, V)``; ``temperature == 0`` is greedy arg-max."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _forward_cached(params, tokens, cfg, caches, pos):
    """Run ``tokens (B, t)`` at positions ``pos..`` through the model; logits of the last position."""
    fam = family_of(cfg)
    x = fam.embed_jit(fam.embed_params(params), tokens, cfg)
    new = []
    for i, (layer, cache) in enumerate(zip(fam.layers(params), caches)):
        x, cache = fam.block_with_cache(layer, x, cfg, cache, pos, **fam.layer_kwargs(cfg, i))
        new.append(cache)
    return fam.head_jit(fam.head_params(params, cfg), x[:, -1:], cfg)[:, 0], new


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "n_greedy"))
def _generate(params, prompt, key, cfg, max_new_tokens: int, temperature: float,
              top_k: int | None, n_greedy: int):
    B, P = prompt.shape
    L = P + max_new_tokens
    dt = cfg.compute_dtype
    shape = (B, L, cfg.num_kv_heads, cfg.head_dim)
    caches = [(jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in params["layers"]]
    logits, caches = _forward_cached(params, prompt, cfg, caches, 0)

    def step(carry, i):
        caches, logits, key = carry
        key, sub = jax.random.split(key)
        tok = sample_logits(logits, sub, temperature, top_k)
        if n_greedy and temperature != 0:
            tok = jnp.where(i < n_greedy, jnp.argmax(logits, -1).astype(jnp.int32), tok)
        logits, caches = _forward_cached(params, tok[:, None], cfg, caches, P + i)
        return (caches, logits, key), tok

    _, toks = jax.lax.scan(step, (caches, logits, key), jnp.arange(max_new_tokens))
    return jnp.concatenate([prompt, toks.T.astype(prompt.dtype)], axis=1)


def generate(params, cfg, prompt_tokens, max_new_tokens: int, key=None, temperature: float = 1.0,
             top_k: int | None = None, *, n_greedy: int = 0):
    """Continue ``prompt_tokens`` (``(B, P)`` or ``(P,)`` int ids) by ``max_new_tokens`` tokens.

    ``temperature=0`` is greedy decoding; ``top_k`` restricts sampling to the k most likely tokens;
    the first ``n_greedy`` new tokens are greedy even when sampling. Returns the prompt followed by
    the new tokens, int32, shaped like the prompt (``(B, P + max_new_tokens)`` or ``(P + N,)``).
    """
    prompt = jnp.asarray(prompt_tokens, jnp.int32)
    if prompt.ndim not in (1, 2) or prompt.shape[-1] < 1:
        raise ValueError(f"prompt_tokens: expected a non-empty (batch, len) or (len,) array, got {prompt.shape}")
    squeeze = prompt.ndim == 1
    prompt = prompt[None] if squeeze else prompt
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected a positive integer")
    total = prompt.shape[1] + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                         f"the model's context max_position_embeddings={cfg.max_position_embeddings}")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: expected >= 0 (0 = greedy)")
    if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
        raise ValueError(f"top_k={top_k}: expected None or 1..{cfg.vocab_size}")
    lo, hi = int(prompt.min()), int(prompt.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(f"prompt_tokens: ids must be in [0, {cfg.vocab_size}), got range [{lo}, {hi}]")
    if key is None:
        if temperature != 0:
            raise ValueError("key: sampling with temperature > 0 needs a jax.random key")
        key = jax.random.key(0)
    out = _generate(params, prompt, key, cfg, int(max_new_tokens), float(temperature),
                    None if top_k is None else int(top_k), int(n_greedy))
    return out[0] if squeeze else out


def self_generated_calibration(params, cfg, nsamples: int, seqlen: int, key, *,
                               batch_size: int = 8, temperature: float = 1.0, top_k: int | None = None,
                               n_greedy: int = 4, first_token: str = "vocab", exclude_ids=None,
                               progress: bool = True) -> np.ndarray:
    """``(nsamples, seqlen)`` int32 calibration sequences sampled from the model (module docstring)."""
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"nsamples={nsamples}, seqlen={seqlen}: expected nsamples >= 1 and seqlen >= 2")
    if seqlen > cfg.max_position_embeddings:
        raise ValueError(f"seqlen={seqlen} exceeds the model's context "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    if first_token == "bos":
        if cfg.bos_token_id is None:
            raise ValueError("first_token='bos' but cfg.bos_token_id is None")
        candidates = None
    elif first_token == "vocab":
        excl = {cfg.bos_token_id, cfg.eos_token_id} if exclude_ids is None else set(int(i) for i in exclude_ids)
        candidates = np.setdiff1d(np.arange(cfg.vocab_size), [i for i in excl if i is not None]).astype(np.int32)
        if candidates.size == 0:
            raise ValueError("exclude_ids: excludes the whole vocabulary")
    else:
        raise ValueError(f"first_token={first_token!r}: expected 'vocab' or 'bos'")
    out = np.zeros((nsamples, seqlen), np.int32)
    batches = range(0, nsamples, batch_size)
    bar = Bar(len(batches), "self-generated calibration", progress)
    for b, start in enumerate(batches):
        n = min(batch_size, nsamples - start)
        kb = jax.random.fold_in(key, b)
        k_first, k_gen = jax.random.split(kb)
        if candidates is None:
            first = np.full((batch_size, 1), cfg.bos_token_id, np.int32)
        else:
            first = np.asarray(jax.random.choice(k_first, candidates, (batch_size, 1)), np.int32)
        seq = generate(params, cfg, first, seqlen - 1, k_gen, temperature, top_k, n_greedy=n_greedy)
        out[start:start + n] = np.asarray(seq)[:n]
        bar.advance()
    bar.close()
    return out
