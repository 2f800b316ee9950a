"""Perplexity with the GPTQ / AWQ protocol, and logit comparisons between two models.

Protocol (IST-DASLab/gptq ``llama_eval``, also used by AWQ and most quantization papers):

1. the whole evaluation text is tokenized in one go, *without* inserting BOS (or EOS) anywhere
   (:meth:`lowbit.data.tokenizer.Tokenizer.encode`; GPTQ's Llama tokenizer call adds a single BOS at the
   very start of the text -- we add none, which only changes the first window's context);
2. the token stream is cut into ``n = len(tokens) // seqlen`` non-overlapping windows of ``seqlen``
   tokens (the tail shorter than a window is dropped; ``max_windows`` keeps the first K);
3. each window is an independent sequence: position ``t`` (``1 <= t < seqlen``) is predicted from
   positions ``0..t-1`` of the *same* window; the first token of every window is never predicted;
4. ``nll`` = mean of ``-log p(token)`` over all ``n * (seqlen - 1)`` predicted tokens (float32
   log-softmax per token, float64 accumulation) and ``ppl = exp(nll)``.

GPTQ computes ``exp(sum_i loss_i * seqlen / (n * seqlen))`` where ``loss_i`` is the mean NLL over
the ``seqlen - 1`` predictions of window ``i``: since every window has the same number of
predictions, this is exactly the mean over all predicted tokens, i.e. the same number as step 4
(``n_tokens`` reported below is ``n * (seqlen - 1)``, the count actually predicted).
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from lowbit import dist
from lowbit.models.protocol import family_of, hidden_layerwise
from lowbit.progress import Bar

__all__ = ["perplexity", "window_nll", "make_windows", "compare_logits", "DEFAULT_SEQLEN", "HEAD_ROWS"]

DEFAULT_SEQLEN = 2048


def make_windows(tokens, seqlen: int, max_windows: int | None = None) -> np.ndarray:
    """``(n, seqlen)`` non-overlapping windows from a 1-D token stream (tail dropped): the
    evaluation windowing of :func:`lowbit.data.corpora.eval_windows`, which defines it."""
    from lowbit.data.corpora import eval_windows

    if not isinstance(seqlen, (int, np.integer)) or seqlen < 2:
        raise ValueError(f"seqlen={seqlen!r}: expected an integer >= 2 (one token predicts the next)")
    return eval_windows(tokens, seqlen, max_windows)


#: Rows (predicted positions) per lm_head tile in the NLL computation: the (rows, vocab) float32
#: logits tile is reduced right away instead of materialising (B, T-1, vocab) logits.
HEAD_ROWS = 256


@functools.partial(jax.jit, static_argnames=("cfg",))
def _head_nll(hp, x, windows, cfg):
    B, T, D = x.shape
    h = x[:, :-1].reshape(-1, D)
    targets = windows[:, 1:].reshape(-1)
    n = h.shape[0]
    rows = min(HEAD_ROWS, n)
    pad = (-n) % rows
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, rows, D)
    tg = jnp.pad(targets, (0, pad)).reshape(-1, rows)

    def tile(args):
        hh, tt = args
        logits = family_of(cfg).head_jit(hp, hh, cfg)              # float32 (rows, V)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, tt[:, None], axis=-1)[:, 0]
        return lse - tgt, jnp.argmax(logits, axis=-1) == tt

    nll, hits = jax.lax.map(tile, (h, tg))
    return nll.reshape(-1)[:n].reshape(B, T - 1), hits.reshape(-1)[:n].reshape(B, T - 1)


def window_nll(params, windows, cfg):
    """Per-token NLL ``(B, T-1)`` (float32) and top-1 hits of predicting ``windows[:, 1:]``.

    Runs layer by layer with jitted pieces (:func:`lowbit.models.protocol.hidden_layerwise`): one
    compilation per distinct layer structure and window shape, asynchronous dispatch.
    """
    windows = jnp.asarray(windows, jnp.int32)
    x = hidden_layerwise(params, windows, cfg)
    return _head_nll(family_of(cfg).head_params(params, cfg), x, windows, cfg)


def _check(windows, cfg, batch_size: int):
    if windows.ndim != 2 or windows.shape[0] < 1:
        raise ValueError(f"windows: expected a non-empty (n, seqlen) array, got shape {windows.shape}")
    seqlen = windows.shape[1]
    if seqlen < 2:
        raise ValueError(f"seqlen={seqlen}: expected >= 2")
    if seqlen > cfg.max_position_embeddings:
        raise ValueError(f"seqlen={seqlen} exceeds the model's context "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    lo, hi = int(windows.min()), int(windows.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(f"tokens: ids must be in [0, {cfg.vocab_size}) for this model, got [{lo}, {hi}] "
                         "(tokenizer / model mismatch?)")
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, (bool, np.bool_)) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive int")


def _ppl(nll: float) -> float:
    """``exp(nll)``, ``inf`` where it overflows a float (a mean NLL above ~709 nats)."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def _batches(windows: np.ndarray, batch_size: int):
    """Fixed-shape batches (the last one padded with copies of window 0): one compilation."""
    n = windows.shape[0]
    for s in range(0, n, batch_size):
        b = windows[s:s + batch_size]
        k = b.shape[0]
        if k < batch_size:
            b = np.concatenate([b, np.repeat(windows[:1], batch_size - k, axis=0)])
        yield s, k, b


def _windows(tokens, cfg, seqlen: int, max_windows, batch_size: int) -> np.ndarray:
    """A 1-D stream cut into windows, or pre-cut ``(n, seqlen)`` windows, checked against ``cfg``."""
    windows = np.asarray(tokens)
    if windows.ndim == 1:
        windows = make_windows(windows, seqlen, max_windows)
    elif max_windows is not None:
        windows = windows[:max_windows]
    _check(windows, cfg, batch_size)
    return windows


def perplexity(params, cfg, tokens, *, seqlen: int = DEFAULT_SEQLEN, batch_size: int = 1,
               max_windows: int | None = None, progress: bool = True, desc: str = "perplexity",
               return_nlls: bool = False, token_bytes=None, bos_id: int | None = None) -> dict:
    """Perplexity of ``tokens`` (a 1-D stream, windowed here, or pre-cut ``(n, seqlen)`` windows).

    Returns ``{"ppl", "nll", "n_tokens" (predicted), "n_windows", "seqlen", "batch_size",
    "top1_acc", "tokens_per_s", "tokens_per_s_steady", "wall_s", "first_batch_s"}``; with
    ``return_nlls`` also ``"nlls"``, the ``(n, seqlen-1)`` per-token NLLs. ``tokens_per_s`` counts
    every evaluated token (``n * seqlen``) over the whole loop, compilation included;
    ``tokens_per_s_steady`` excludes the first batch (which compiles), None with one batch.

    With ``token_bytes`` (``(vocab,)`` UTF-8 bytes per id, :meth:`lowbit.data.tokenizer.Tokenizer.token_bytes`)
    also ``"n_bytes"`` (bytes of the predicted tokens' text) and ``"bits_per_byte"`` = total NLL in
    bits / ``n_bytes``: a tokenizer-independent number that compares across tokenizers and tools.

    With ``bos_id`` every window starts with that BOS token and holds ``seqlen - 1`` text tokens
    (a stream is cut into windows of ``seqlen - 1``; pre-cut windows get the BOS prepended), so
    every text token is predicted and the first one is conditioned on BOS: models trained to always
    see BOS (Gemma) are far off without it. The default (``None``) is the GPTQ protocol: no BOS.

    A mean NLL whose exponential overflows reports ``ppl = inf``; a NaN loss (NaN logits) raises a
    ValueError.
    """
    if bos_id is not None:
        if not 0 <= int(bos_id) < cfg.vocab_size:
            raise ValueError(f"bos_id={bos_id}: outside the vocabulary [0, {cfg.vocab_size})")
        text = np.asarray(tokens)
        if text.ndim == 1:
            text = make_windows(text, seqlen - 1, max_windows)
        tokens = np.concatenate([np.full((text.shape[0], 1), int(bos_id), text.dtype), text], axis=1)
    windows = _windows(tokens, cfg, seqlen, max_windows, batch_size)
    n, seqlen = windows.shape
    t0 = time.perf_counter()
    total_nll, total_hits, first_s = 0.0, 0, None
    nlls = np.zeros((n, seqlen - 1), np.float32) if return_nlls else None
    bar = Bar(math.ceil(n / batch_size), desc, progress)
    try:
        for s, k, b in _batches(windows, batch_size):
            nll, hits = window_nll(params, dist.place_batch(jnp.asarray(b)), cfg)   # data-parallel on a mesh
            nll, hits = dist.to_host(nll)[:k], dist.to_host(hits)[:k]
            if np.isnan(nll).any():
                raise ValueError(f"NaN loss in windows {s}..{s + k - 1}: the model produced NaN (or infinite) "
                                 "logits (diverged or broken weights); no perplexity to report")
            total_nll += float(nll.astype(np.float64).sum())
            total_hits += int(hits.sum())
            if nlls is not None:
                nlls[s:s + k] = nll
            if first_s is None:
                first_s = time.perf_counter() - t0
            done = s + k
            bar.advance(1, f"ppl {_ppl(total_nll / (done * (seqlen - 1))):.3f}")
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    n_pred = n * (seqlen - 1)
    steady_windows = n - min(batch_size, n)
    out = {
        "ppl": _ppl(total_nll / n_pred), "nll": total_nll / n_pred, "n_tokens": n_pred,
        "n_windows": n, "seqlen": seqlen, "batch_size": batch_size, "top1_acc": total_hits / n_pred,
        "tokens_per_s": n * seqlen / wall, "wall_s": wall, "first_batch_s": first_s,
        "tokens_per_s_steady": (steady_windows * seqlen / (wall - first_s)) if steady_windows else None,
    }
    if token_bytes is not None:
        n_bytes = int(np.asarray(token_bytes, np.int64)[windows[:, 1:]].sum())
        out["n_bytes"] = n_bytes
        out["bits_per_byte"] = total_nll / math.log(2) / n_bytes if n_bytes else float("nan")
    if nlls is not None:
        out["nlls"] = nlls
    return out


@functools.partial(jax.jit, static_argnames=("cfg_a", "cfg_b"))
def _kl(hp_a, xa, hp_b, xb, cfg_a, cfg_b):
    la = jax.nn.log_softmax(family_of(cfg_a).head_jit(hp_a, xa, cfg_a), axis=-1)
    lb = jax.nn.log_softmax(family_of(cfg_b).head_jit(hp_b, xb, cfg_b), axis=-1)
    kl = jnp.sum(jnp.exp(la) * (la - lb), axis=-1)               # KL(a || b) per position
    agree = jnp.argmax(la, -1) == jnp.argmax(lb, -1)
    return kl, agree


def _compare(params_a, params_b, windows, cfg_a, cfg_b):
    xa = hidden_layerwise(params_a, windows, cfg_a)
    xb = hidden_layerwise(params_b, windows, cfg_b)
    return _kl(family_of(cfg_a).head_params(params_a, cfg_a), xa, family_of(cfg_b).head_params(params_b, cfg_b), xb,
               cfg_a, cfg_b)


def compare_logits(params_ref, params, cfg, tokens, *, cfg_other = None,
                   seqlen: int = DEFAULT_SEQLEN, batch_size: int = 1, max_windows: int | None = None,
                   progress: bool = True) -> dict:
    """Mean KL(ref || model) and top-1 agreement of next-token distributions, over every position
    of the same windows (built as in :func:`perplexity`). Returns ``{"kl", "kl_max_window",
    "top1_agreement", "n_positions", "n_windows", "seqlen"}``."""
    cfg_other = cfg if cfg_other is None else cfg_other
    windows = _windows(tokens, cfg, seqlen, max_windows, batch_size)
    _check(windows, cfg_other, batch_size)
    n, seqlen = windows.shape
    kl_sum, agree_sum, kl_win = 0.0, 0, []
    bar = Bar(math.ceil(n / batch_size), "KL", progress)
    try:
        for s, k, b in _batches(windows, batch_size):
            kl, agree = _compare(params_ref, params, dist.place_batch(jnp.asarray(b)), cfg, cfg_other)
            kl, agree = dist.to_host(kl).astype(np.float64)[:k], dist.to_host(agree)[:k]
            kl_sum += float(kl.sum())
            agree_sum += int(agree.sum())
            kl_win += list(kl.mean(axis=1))
            bar.advance(1, f"KL {kl_sum / ((s + k) * seqlen):.4f}")
    finally:
        bar.close()
    npos = n * seqlen
    return {"kl": kl_sum / npos, "kl_max_window": float(max(kl_win)), "top1_agreement": agree_sum / npos,
            "n_positions": npos, "n_windows": n, "seqlen": seqlen}
