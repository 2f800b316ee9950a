"""The jitted train step over pure params: gradients of the trainable subset only.

::

    part = partition_params(params, trainable=r"lm_head|norm")   # which leaves train (regex on paths)
    opt = build_optimizer(OptimCfg(lr=1e-3), steps=100, accum=2)
    state = init_state(part, params, opt, jax.random.key(0))     # float32 masters + optimizer state
    frozen = part.split(params)[1]
    step = make_train_step(causal_lm_loss(cfg), opt, part, compute_dtype="bfloat16")
    state, metrics = step(state, frozen, batch)                  # metrics: loss, grad_norm, aux terms

**Partition.** Parameters are split into two nested dicts with the structure of their paths
(``params["layers"][0]["mlp"]["up_proj"]`` lives at ``trainable["layers"]["0"]["mlp"]["up_proj"]``):
the *trainable* float leaves and the *frozen* rest. Only the trainable dict is an argument of
``jax.value_and_grad``, so no gradient is computed, stored or seen by the optimizer for a frozen
leaf; :class:`~lowbit.core.qtensor.QuantizedTensor` and integer leaves are always frozen (a
quantized base weight is read through :func:`lowbit.ops.linear`, never differentiated). The
optimizer state therefore only covers the trainable leaves (no ``optax.masked`` needed; weight-decay
masking happens inside :func:`lowbit.train.optim.build_optimizer`).

**Precision.** The state holds float32 master copies of the trainable leaves and a float32
optimizer state. Inside the loss the trainable leaves are cast to ``compute_dtype`` (``"bfloat16"``
for bf16 compute; ``"float32"`` leaves them alone); the gradient flows back through the cast to the
float32 masters. Frozen leaves are used as given (:func:`lowbit.ops.linear` casts a dense weight to
the activation dtype). The activation dtype itself is the model config's ``dtype`` (the training
loop sets it to ``compute_dtype``).

**Randomness.** ``state.rng`` is split once per micro-step; the loss function receives the fresh
half (for dropout or sampling, unused by the plain LM loss), the state keeps the other, so the key
sequence is a pure function of the seed and the step (and it is checkpointed).

:func:`make_train_step` is cached on its arguments (a loss function, an optimizer object, a
partition, a dtype), so runs that share them share one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowbit.core.qtensor import QuantizedTensor
from lowbit.core.transforms import path_str
from lowbit.train.optim import grad_norm_of

__all__ = ["Partition", "partition_params", "nest_paths", "flat_paths", "TrainState", "init_state",
           "loss_and_grads", "make_train_step", "make_eval_step", "COMPUTE_DTYPES"]

COMPUTE_DTYPES = ("float32", "bfloat16")


def _is_qt(x) -> bool:
    return isinstance(x, QuantizedTensor)


def flat_paths(tree) -> dict[str, Any]:
    """``{path: leaf}`` of a params tree (QuantizedTensors are leaves), in tree order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_qt)
    return {path_str(kp): v for kp, v in leaves}


def nest_paths(flat: dict[str, Any]) -> dict:
    """``{"a/b/c": leaf}`` -> ``{"a": {"b": {"c": leaf}}}`` (list indices become string keys)."""
    out: dict = {}
    for path, v in flat.items():
        parts = path.split("/")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def _is_float_leaf(x) -> bool:
    return not _is_qt(x) and hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


@dataclasses.dataclass(frozen=True)
class Partition:
    """A split of one params structure into trainable and frozen leaves (hashable: a static argument).

    Attributes:
      treedef: the structure of the full params (QuantizedTensors as leaves).
      paths: every leaf's path, in ``treedef`` order.
      trainable: the paths of the trainable leaves (float arrays), in the same order.
    """

    treedef: Any
    paths: tuple[str, ...]
    trainable: tuple[str, ...]

    @property
    def frozen(self) -> tuple[str, ...]:
        keep = set(self.trainable)
        return tuple(p for p in self.paths if p not in keep)

    def split(self, params) -> tuple[dict, dict]:
        """``(trainable, frozen)`` nested dicts (see the module docstring) of ``params``."""
        leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_qt)
        if treedef != self.treedef:
            got = tuple(path_str(kp) for kp, _ in leaves)
            missing = sorted(set(self.paths) - set(got))
            extra = sorted(set(got) - set(self.paths))
            raise ValueError("params: structure differs from the partition's "
                             f"(missing {missing[:5]}, unexpected {extra[:5]}; or leaf types differ)")
        flat = {path_str(kp): v for kp, v in leaves}
        keep = set(self.trainable)
        return (nest_paths({p: flat[p] for p in self.trainable}),
                nest_paths({p: flat[p] for p in self.paths if p not in keep}))

    def merge(self, trainable, frozen):
        """The full params tree from the two halves (inverse of :meth:`split`)."""
        flat = {**flat_paths(frozen), **flat_paths(trainable)}
        missing = [p for p in self.paths if p not in flat]
        if missing:
            raise ValueError(f"merge: missing leaves {missing[:5]}")
        return jax.tree_util.tree_unflatten(self.treedef, [flat[p] for p in self.paths])


def partition_params(params, trainable: str | Callable[[str, Any], bool] | Iterable[str] = ".*") -> Partition:
    """Choose the trainable leaves of ``params``.

    ``trainable`` is a regex searched in each leaf's path (``re.search``, e.g. ``r"lm_head|norm"``;
    ``".*"``: every float leaf), a predicate ``(path, leaf) -> bool``, or a collection of exact
    paths. Only float arrays can train: QuantizedTensors and integer leaves are always frozen (an
    exact path naming one is an error). Selecting nothing is an error.
    """
    flat = flat_paths(params)
    _, treedef = jax.tree_util.tree_flatten(params, is_leaf=_is_qt)
    floats = [p for p, v in flat.items() if _is_float_leaf(v)]
    if isinstance(trainable, str):
        try:
            rx = re.compile(trainable)
        except re.error as e:
            raise ValueError(f"trainable={trainable!r}: not a valid regular expression ({e})") from None
        chosen = [p for p in floats if rx.search(p)]
    elif callable(trainable):
        chosen = [p for p in floats if trainable(p, flat[p])]
    else:
        want = list(trainable)
        unknown = [p for p in want if p not in flat]
        if unknown:
            raise ValueError(f"trainable: unknown paths {unknown[:5]} (e.g. {list(flat)[:3]})")
        bad = [p for p in want if p not in floats]
        if bad:
            raise ValueError(f"trainable: {bad[:5]} are not float arrays (QuantizedTensor or integer leaves "
                             "cannot train)")
        chosen = [p for p in floats if p in set(want)]
    if not chosen:
        raise ValueError(f"trainable={trainable!r} selects no float leaf of the params "
                         f"(float leaves: {floats[:6]}{' ...' if len(floats) > 6 else ''})")
    return Partition(treedef=treedef, paths=tuple(flat), trainable=tuple(chosen))


class TrainState(NamedTuple):
    """What a train step carries: float32 ``params`` (the trainable half), the optimizer state and
    the RNG key (a typed ``jax.random.key``)."""
    params: dict
    opt_state: Any
    rng: jax.Array


def init_state(partition: Partition, params, optimizer: optax.GradientTransformation, rng) -> TrainState:
    """The initial state: float32 copies of the trainable leaves of ``params`` and ``optimizer.init``."""
    trainable, _ = partition.split(params)
    masters = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32), trainable)
    return TrainState(masters, optimizer.init(masters), rng)


def _check_dtype(compute_dtype: str) -> jnp.dtype:
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype!r}: expected one of {COMPUTE_DTYPES}")
    return jnp.dtype(compute_dtype)


def loss_and_grads(loss_fn: Callable, partition: Partition, compute_dtype: str = "float32") -> Callable:
    """``f(trainable, frozen, batch, rng, consts) -> ((loss, aux), grads)``: ``grads`` has exactly the
    structure of ``trainable`` (nothing for frozen leaves). Not jitted (call it inside jit)."""
    dt = _check_dtype(compute_dtype)

    def objective(trainable, frozen, batch, rng, consts):
        cast = jax.tree.map(lambda x: x.astype(dt), trainable)
        loss, aux = loss_fn(partition.merge(cast, frozen), batch, rng, consts)
        return loss.astype(jnp.float32), aux

    return jax.value_and_grad(objective, has_aux=True)


@functools.lru_cache(maxsize=32)
def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, partition: Partition,
                    compute_dtype: str = "float32") -> Callable:
    """``step(state, frozen, batch, consts=None) -> (state, metrics)``, jitted.

    One micro-step: loss and gradient of the trainable leaves on ``batch``, then
    ``optimizer.update`` (with :func:`~lowbit.train.optim.build_optimizer`'s ``MultiSteps`` the
    parameters change every ``accum``-th call). ``metrics``: ``loss``, ``grad_norm`` (of the last
    *accumulated* gradient, before clipping, from the optimizer state), and the loss's ``aux``
    terms. ``consts`` is passed to ``loss_fn`` untouched (e.g. a teacher's params).
    """
    grad_fn = loss_and_grads(loss_fn, partition, compute_dtype)

    def step(state: TrainState, frozen, batch, consts=None):
        rng, sub = jax.random.split(state.rng)
        (loss, aux), grads = grad_fn(state.params, frozen, batch, sub, consts)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**aux, "loss": loss, "grad_norm": grad_norm_of(opt_state)}
        return TrainState(params, opt_state, rng), metrics

    return jax.jit(step)


@functools.lru_cache(maxsize=32)
def make_eval_step(loss_fn: Callable, partition: Partition, compute_dtype: str = "float32") -> Callable:
    """``evaluate(trainable, frozen, batch, consts=None) -> (loss, aux)``, jitted, no gradient (the
    loss function gets ``rng=None``: evaluation is deterministic, e.g. LoRA dropout is off)."""
    dt = _check_dtype(compute_dtype)

    def evaluate(trainable, frozen, batch, consts=None):
        cast = jax.tree.map(lambda x: x.astype(dt), trainable)
        loss, aux = loss_fn(partition.merge(cast, frozen), batch, None, consts)
        return loss.astype(jnp.float32), aux

    return jax.jit(evaluate)
