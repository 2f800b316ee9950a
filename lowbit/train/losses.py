"""Training losses and the training forward pass (remat per block).

Pure functions on logits / hidden states::

    cross_entropy(logits, targets, mask=None)         # mean NLL over the counted tokens
    kd_kl(student_logits, teacher_logits, T, mask)    # T^2 * KL(softmax(t/T) || softmax(s/T))
    hidden_mse(student_h, teacher_h, mask)            # MSE of L2-normalised hidden states

and loss functions for :func:`lowbit.train.step.make_train_step`, with the signature
``loss_fn(params, batch, rng, consts) -> (loss, aux)``::

    causal_lm_loss(cfg, remat=True)                    # next-token cross-entropy of the model
    distill_loss(cfg, teacher_cfg, temperature=2.0, kl_weight=1.0, ce_weight=0.0,
                 mse_weight=0.0, layers=(), remat=True) # consts = the teacher's params

``batch`` is an int array ``(B, T)`` of token ids, or a dict ``{"tokens": (B, T), "mask": (B, T)}``
where ``mask[b, t]`` says whether token ``t`` counts as a target (1) or not (0, e.g. padding or a
prompt). Causal-LM losses predict ``tokens[:, 1:]`` from ``logits[:, :-1]``: the first token of a
window is never predicted (as in :mod:`lowbit.eval.likelihood`), and means are over the predicted,
unmasked tokens (a batch whose mask is all zeros gives 0, not NaN).

Knowledge distillation (Hinton et al. 2015): both distributions are softened by the temperature
``T``; the KL is multiplied by ``T^2`` so that its gradient with respect to the student logits,
``T * (softmax(s/T) - softmax(t/T)) / N`` for ``N`` counted tokens, keeps the same scale whatever
``T``. The hidden-state term (OneBit, Xu et al. 2024) compares the outputs of the chosen blocks
after scaling every token's hidden vector to unit L2 norm (``h * rsqrt(sum(h^2) + 1e-12)``): the
squared distance of the unit vectors (in ``[0, 4]``), averaged over positions and layers.

Every loss function carries a ``config`` attribute (a JSON-able dict: its name and options) that
:func:`lowbit.train.loop.train` stores with a run, so resuming with other loss options is refused.
The builders are cached: equal arguments give the same function, hence one compiled train step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lowbit.models.protocol import check_tokens, family_of

__all__ = ["cross_entropy", "kd_kl", "hidden_mse", "forward_train", "causal_lm_loss", "distill_loss",
           "tokens_and_mask", "NORM_EPS"]

#: added to the squared norm before the reciprocal square root in :func:`hidden_mse`: keeps an
#: all-zero hidden vector finite (it normalises to zero) and is far below any real squared norm.
NORM_EPS = 1e-12


def _masked_mean(x, mask):
    """Mean of ``x`` over the entries where ``mask`` is nonzero (0 when there are none)."""
    x = x.astype(jnp.float32)
    if mask is None:
        return jnp.mean(x)
    m = jnp.broadcast_to(mask, x.shape).astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def cross_entropy(logits, targets, mask=None):
    """Mean negative log-likelihood of ``targets (...,)`` under ``logits (..., V)`` (float32
    log-softmax), over the entries where ``mask`` (same shape as ``targets``) is nonzero."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return _masked_mean(nll, mask)


def kd_kl(student_logits, teacher_logits, temperature: float = 1.0, mask=None):
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per token (float32), averaged over
    the tokens where ``mask`` is nonzero. Zero iff the two softened distributions are equal."""
    t = float(temperature)
    if not t > 0:
        raise ValueError(f"temperature={temperature!r}: expected a number > 0")
    log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
    return (t * t) * _masked_mean(kl, mask)


def _unit(h):
    h = h.astype(jnp.float32)
    return h * jax.lax.rsqrt(jnp.sum(h * h, axis=-1, keepdims=True) + NORM_EPS)


def hidden_mse(student_h, teacher_h, mask=None):
    """Squared distance between the L2-normalised hidden vectors ``(..., D)``, averaged over the
    positions where ``mask`` (shape ``(...)``) is nonzero. ``student_h`` / ``teacher_h`` may also
    be equal-length sequences of such arrays (one per layer): the per-layer values are averaged."""
    if isinstance(student_h, (list, tuple)):
        if len(student_h) != len(teacher_h) or not student_h:
            raise ValueError(f"hidden_mse: {len(student_h)} student vs {len(teacher_h)} teacher layers")
        return sum(hidden_mse(s, t, mask) for s, t in zip(student_h, teacher_h)) / len(student_h)
    if student_h.shape != teacher_h.shape:
        raise ValueError(f"hidden_mse: student hidden states {student_h.shape} vs teacher {teacher_h.shape}")
    d = jnp.sum(jnp.square(_unit(student_h) - _unit(teacher_h)), axis=-1)
    return _masked_mean(d, mask)


def forward_train(params, tokens, cfg, *, remat: bool = True, hidden_layers: tuple[int, ...] = ()):
    """Logits ``(B, T, V)`` (float32) of any registered model family for tokens ``(B, T)``, with every
    block wrapped in :func:`jax.checkpoint` when ``remat``: the backward pass keeps only each block's
    input and recomputes the block's inside (attention scores, MLP activations), trading one more
    forward for activation memory that no longer grows with the block's width.

    With ``hidden_layers`` returns ``(logits, [x_i for i in hidden_layers])``, ``x_i`` the output of
    block ``i`` (before the final norm). Same computation as the family's ``forward`` (equal up to
    float rounding: the jit boundaries differ).
    """
    fam = family_of(cfg)
    layers = fam.layers(params)
    bad = [i for i in hidden_layers if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"hidden_layers={tuple(hidden_layers)}: {bad} outside the model's 0..{len(layers) - 1}")
    check_tokens(tokens, cfg)
    x = fam.embed_jit(fam.embed_params(params), tokens, cfg)
    hidden = []
    for i, layer in enumerate(layers):
        block = functools.partial(fam.block_jit, cfg=cfg, **fam.layer_kwargs(cfg, i))
        x = (jax.checkpoint(block) if remat else block)(layer, x)
        if i in hidden_layers:
            hidden.append(x)
    logits = fam.head_jit(fam.head_params(params, cfg), x, cfg)
    return (logits, hidden) if hidden_layers else logits


def tokens_and_mask(batch):
    """``(tokens (B, T) int32, mask (B, T) or None)`` of a batch (an array, or a dict with
    ``"tokens"`` and optionally ``"mask"``)."""
    if isinstance(batch, dict):
        if "tokens" not in batch:
            raise ValueError(f"batch: a dict batch needs a 'tokens' entry, got keys {sorted(batch)}")
        return jnp.asarray(batch["tokens"], jnp.int32), batch.get("mask")
    return jnp.asarray(batch, jnp.int32), None


def _shifted(mask):
    return None if mask is None else mask[:, 1:]


def _logits_and_hidden(params, tokens, cfg, remat, layers):
    out = forward_train(params, tokens, cfg, remat=remat, hidden_layers=layers)
    return out if layers else (out, [])


def _with_config(fn, **config):
    fn.config = config
    return fn


@functools.lru_cache(maxsize=64)
def causal_lm_loss(cfg, remat: bool = True):
    """``loss_fn(params, batch, rng, consts) -> (mean next-token NLL, {"ce": same})`` of the model
    ``cfg`` (its ``dtype`` is the activation dtype of the training forward)."""

    def loss_fn(params, batch, rng=None, consts=None):
        del rng, consts
        tokens, mask = tokens_and_mask(batch)
        logits = forward_train(params, tokens, cfg, remat=remat)
        ce = cross_entropy(logits[:, :-1], tokens[:, 1:], _shifted(mask))
        return ce, {"ce": ce}

    return _with_config(loss_fn, name="causal_lm", remat=bool(remat))


@functools.lru_cache(maxsize=64)
def distill_loss(cfg, teacher_cfg, *, temperature: float = 2.0, kl_weight: float = 1.0, ce_weight: float = 0.0,
                 mse_weight: float = 0.0, layers: tuple[int, ...] = (), remat: bool = True):
    """Knowledge distillation from a teacher whose params are the step's ``consts``::

        loss = kl_weight * kd_kl(student, teacher, temperature) + ce_weight * cross_entropy
             + mse_weight * hidden_mse(student block outputs, teacher block outputs at ``layers``)

    (logits terms over the predicted tokens ``[:, :-1]``; the hidden-state term over all
    positions). The teacher runs without remat and without gradient. ``aux`` holds each term.
    Defaults: ``temperature=2.0`` (a common KD value), KL only.
    """
    layers = tuple(int(i) for i in layers)
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: expected a number > 0")
    if min(kl_weight, ce_weight, mse_weight) < 0 or kl_weight + ce_weight + mse_weight <= 0:
        raise ValueError(f"kl_weight={kl_weight}, ce_weight={ce_weight}, mse_weight={mse_weight}: expected "
                         "weights >= 0, not all zero")
    if mse_weight > 0 and not layers:
        raise ValueError("mse_weight > 0 needs the block indices whose outputs are compared: layers=(...)")

    def loss_fn(params, batch, rng=None, teacher=None):
        del rng
        if teacher is None:
            raise ValueError("distill_loss: pass the teacher's params as the train step's consts")
        tokens, mask = tokens_and_mask(batch)
        s_logits, s_h = _logits_and_hidden(params, tokens, cfg, remat, layers)
        t_logits, t_h = _logits_and_hidden(teacher, tokens, teacher_cfg, False, layers)
        t_logits, t_h = jax.lax.stop_gradient((t_logits, t_h))
        if s_logits.shape != t_logits.shape:
            raise ValueError(f"distill_loss: student logits {s_logits.shape} vs teacher {t_logits.shape} "
                             "(the vocabularies must match)")
        m = _shifted(mask)
        aux = {"kl": kd_kl(s_logits[:, :-1], t_logits[:, :-1], temperature, m)}
        loss = kl_weight * aux["kl"]
        if ce_weight > 0:
            aux["ce"] = cross_entropy(s_logits[:, :-1], tokens[:, 1:], m)
            loss = loss + ce_weight * aux["ce"]
        if mse_weight > 0:
            aux["mse"] = hidden_mse(s_h, t_h, mask)
            loss = loss + mse_weight * aux["mse"]
        return loss, aux

    return _with_config(loss_fn, name="distill", temperature=float(temperature), kl_weight=float(kl_weight),
                        ce_weight=float(ce_weight), mse_weight=float(mse_weight), layers=list(layers),
                        remat=bool(remat), teacher=teacher_cfg.to_dict() if hasattr(teacher_cfg, "to_dict")
                        else repr(teacher_cfg))
