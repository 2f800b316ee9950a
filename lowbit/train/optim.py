"""The optimizer of every lowbit training run: an optax chain built from one frozen dataclass.

::

    opt = build_optimizer(OptimCfg(lr=1e-3, warmup_steps=10, schedule="cosine"), steps=200, accum=4)
    opt_state = opt.init(trainable)                 # float32 state of the trainable subset only
    updates, opt_state = opt.update(grads, opt_state, trainable)

The chain, applied to the gradient of the trainable parameters (float32 master copies)::

    MultiSteps(every_k=accum,                       # gradient accumulation (mean of micro-batches)
               chain(record_grad_norm(),            # ||g||_2 of the accumulated gradient, for logging
                     clip_by_global_norm(clip_norm),
                     adamw(schedule, b1, b2, eps, weight_decay, mask=matrices only)))

* ``MultiSteps`` is always there (``accum=1`` included) so the optimizer state has one structure:
  a checkpoint of a run with ``accum=1`` looks like any other. Mid-accumulation it returns zero
  updates; the inner chain (clipping, AdamW, the schedule's step count) only advances on the
  ``accum``-th micro-batch, so ``steps`` and the schedule count *optimizer* steps.
* Schedule (:meth:`OptimCfg.schedule`): linear warmup from 0 to ``lr`` over ``warmup_steps``
  optimizer steps, then ``"constant"`` (``lr``), ``"cosine"`` (half cosine down to
  ``lr * min_lr_ratio`` at ``steps``) or ``"linear"`` (straight line down to ``lr * min_lr_ratio``).
* Weight decay (decoupled, AdamW) only on leaves with ``ndim >= 2`` (linear weights and
  embeddings), never on norm weights or biases: the usual LLM practice.
* Defaults: ``b1=0.9, b2=0.999, eps=1e-8`` (Adam's / optax's), ``clip_norm=1.0`` (the common LLM
  fine-tuning value; ``None`` disables clipping), ``weight_decay=0.0`` (fine-tuning few parameters,
  e.g. adapters or scales, usually wants none), ``warmup_steps=0``, ``schedule="cosine"``,
  ``min_lr_ratio=0.0``.

:func:`build_optimizer` is cached on its (hashable) arguments, so two runs with the same optimizer
configuration share one optimizer object and therefore one compiled train step
(:func:`lowbit.train.step.make_train_step` is cached on it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowbit.core.checks import is_int

__all__ = ["OptimCfg", "SCHEDULES", "build_optimizer", "GradNormState", "record_grad_norm", "grad_norm_of",
           "global_norm"]

SCHEDULES = ("constant", "cosine", "linear")


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class OptimCfg:
    """AdamW + warmup/decay schedule + global-norm clipping (see the module docstring).

    Attributes:
      lr: peak learning rate (finite, > 0).
      warmup_steps: optimizer steps of linear warmup from 0 (``0``: start at ``lr``).
      schedule: after warmup, one of :data:`SCHEDULES`.
      min_lr_ratio: ``cosine`` / ``linear`` end at ``lr * min_lr_ratio`` (in ``[0, 1]``).
      weight_decay: AdamW's decoupled decay (>= 0), on ``ndim >= 2`` leaves only.
      b1, b2, eps: Adam's moments and denominator epsilon.
      clip_norm: clip the (accumulated) gradient to this global L2 norm; ``None``: no clipping.
    """

    lr: float = 3e-4
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0

    def __post_init__(self):
        errors = self.problems()
        if errors:
            raise ValueError("OptimCfg: " + "; ".join(errors))

    def problems(self) -> list[str]:
        """Every invalid field, as ``"name=value: expected ..."`` strings (empty when valid)."""
        out = []
        if not _finite_number(self.lr) or self.lr <= 0:
            out.append(f"lr={self.lr!r}: expected a finite number > 0")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            out.append(f"warmup_steps={self.warmup_steps!r}: expected an int >= 0")
        if self.schedule not in SCHEDULES:
            out.append(f"schedule={self.schedule!r}: expected one of {SCHEDULES}")
        if not _finite_number(self.min_lr_ratio) or not 0.0 <= self.min_lr_ratio <= 1.0:
            out.append(f"min_lr_ratio={self.min_lr_ratio!r}: expected a number in [0, 1]")
        if not _finite_number(self.weight_decay) or self.weight_decay < 0:
            out.append(f"weight_decay={self.weight_decay!r}: expected a finite number >= 0")
        for name in ("b1", "b2"):
            v = getattr(self, name)
            if not _finite_number(v) or not 0.0 <= v < 1.0:
                out.append(f"{name}={v!r}: expected a number in [0, 1)")
        if not _finite_number(self.eps) or self.eps <= 0:
            out.append(f"eps={self.eps!r}: expected a finite number > 0")
        if self.clip_norm is not None and (not _finite_number(self.clip_norm) or self.clip_norm <= 0):
            out.append(f"clip_norm={self.clip_norm!r}: expected a finite number > 0, or None (no clipping)")
        return out

    def schedule_fn(self, steps: int) -> optax.Schedule:
        """The learning rate as a function of the optimizer step count ``0 .. steps - 1``."""
        if not is_int(steps) or steps < 1:
            raise ValueError(f"steps={steps!r}: expected a positive int")
        if self.warmup_steps > steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds steps={steps}")
        lr, end = float(self.lr), float(self.lr) * float(self.min_lr_ratio)
        decay = max(steps - self.warmup_steps, 1)
        if self.schedule == "constant":
            after = optax.constant_schedule(lr)
        elif self.schedule == "cosine":
            after = optax.cosine_decay_schedule(lr, decay_steps=decay, alpha=float(self.min_lr_ratio))
        else:
            after = optax.linear_schedule(lr, end, transition_steps=decay)
        if self.warmup_steps == 0:
            return after
        warm = optax.linear_schedule(0.0, lr, transition_steps=self.warmup_steps)
        return optax.join_schedules([warm, after], boundaries=[self.warmup_steps])


class GradNormState(NamedTuple):
    """State of :func:`record_grad_norm`: the global L2 norm of the last gradient it saw."""
    grad_norm: jax.Array


def record_grad_norm() -> optax.GradientTransformation:
    """An identity transformation that keeps the global L2 norm of ``updates`` in its state (float32).

    Placed first inside ``MultiSteps`` it records the norm of the accumulated gradient, before
    clipping, at every optimizer step; read it with :func:`grad_norm_of`."""

    def init(params):
        del params
        return GradNormState(jnp.zeros((), jnp.float32))

    def update(updates, state, params=None):
        del state, params
        return updates, GradNormState(global_norm(updates))

    return optax.GradientTransformation(init, update)


def global_norm(tree) -> jax.Array:
    """``sqrt(sum of squares)`` over every leaf of ``tree``, accumulated in float32."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)) if leaves else jnp.float32(0)


def grad_norm_of(opt_state) -> jax.Array:
    """The gradient norm recorded by :func:`record_grad_norm` somewhere in ``opt_state``."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GradNormState))
             if isinstance(s, GradNormState)]
    if len(found) != 1:
        raise ValueError(f"opt_state: expected exactly one GradNormState (build_optimizer's chain), found {len(found)}")
    return found[0].grad_norm


def _decay_mask(params):
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


@functools.lru_cache(maxsize=64)
def build_optimizer(cfg: OptimCfg, steps: int, accum: int = 1) -> optax.GradientTransformation:
    """The optax chain of the module docstring for a run of ``steps`` optimizer steps, each the mean
    of ``accum`` micro-batch gradients. Cached: equal arguments give the same object."""
    if not isinstance(cfg, OptimCfg):
        raise ValueError(f"cfg: expected an OptimCfg, got {type(cfg).__name__}")
    if not is_int(accum) or accum < 1:
        raise ValueError(f"accum={accum!r}: expected an int >= 1")
    parts: list[Any] = [record_grad_norm()]
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
    parts.append(optax.adamw(cfg.schedule_fn(steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask, mu_dtype=jnp.float32))
    inner = optax.chain(*parts)
    return optax.MultiSteps(inner, every_k_schedule=accum, use_grad_mean=True).gradient_transformation()
