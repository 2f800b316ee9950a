"""Learned bit allocation: how many bits each weight matrix gets, optimised by gradient descent on a
task cost under a size budget (the idea of picoLLM Compression; issue "learned bit allocation").

::

    from lowbit.alloc import learned, problem
    cands = problem.int_candidates(bits=(2, 3, 4, 8), group_size=128) + [None]   # None: keep 16 bit
    cost = learned.kl_cost(model_cfg, params)              # KL(float model || relaxed model)
    res = learned.allocate(params, cost, cands, windows, budget_bits=3.25, cfg=learned.AllocCfg(steps=200))
    save_recipe(res.recipe, "alloc.yaml")                  # lowbit quantize --recipe alloc.yaml

**Units.** A unit is a linear weight (default: every ``*_proj`` matrix) or, with ``block=g``, a
block of ``g`` input columns of one (picoLLM's finer granularity): the final recipe then gives a
matrix whose blocks chose different widths a :class:`~lowbit.alloc.recipe.MixedSpec` (a width per
column group, quantized by GPTQ with per-group widths). Column blocks need group-wise int candidates
of one group size dividing ``g`` (no 16-bit candidate).

**Relaxation.** Every unit ``u`` has candidate
quantizers ``Q_1..Q_K`` (any :class:`~lowbit.core.qtensor.QuantSpec`, or ``None`` = 16-bit), each
with its exact storage bytes ``B_uk`` (:func:`lowbit.alloc.recipe.spec_bytes`), and logits
``theta_u``. The candidate weights ``Q_k(W_u)`` are computed once: round to nearest, or GPTQ at
each width from the same calibration windows (``candidate_weights``); the final model is
re-quantized by the recipe's method, GPTQ by default. A step runs the model with (for column
blocks: each block's columns mixed by its own ``p_u``)::

    p_u = softmax(theta_u / tau)              W_u = sum_k p_uk Q_k(W_u)
    L(theta, lam) = cost(model, batch) + lam * (sum_u p_u . B_u / budget - 1)

``hard=True`` uses a straight-through Gumbel-softmax sample instead (forward: one candidate per
unit, ``one_hot(argmax(theta/tau + g))``; backward: the soft probabilities' gradient).

**Budget by a Lagrange multiplier** (dual ascent, not a hand-tuned penalty): ``theta`` takes an
Adam step on ``L``, then ``lam <- max(0, lam + dual_lr * (E[bytes] / budget - 1))``: the
multiplier grows while the expected size is over the budget and decays back to 0 when it is under.
The temperature anneals geometrically from ``tau_start`` to ``tau_end``.

**Discretisation that meets the budget** (:func:`discretize`): a multiple-choice knapsack over
the units with the learned preferences ``-log softmax(theta_u / tau_end)`` as costs (the argmax
where it fits). The bytes that leaves unused (the learned logits prefer the argmax, so the
knapsack's own fill stops early) are then spent on the upgrades the cost's gradient at the discrete
allocation ranks best per byte (:func:`fill_by_gradient`). The result never exceeds the budget. (Column blocks: a block's
bytes are its codes, scales and zeros; the recipe's exact bytes also round each width's packed zeros
to whole words, so while the exact total is over the budget the discretisation is rerun with the
budget lowered by the excess.)

**Cost functions** are user-supplied and jittable: ``cost_fn(params, batch) -> scalar``.
:func:`kl_cost` (KL from the float model's next-token distribution, the default objective) and
:func:`ce_cost` (cross-entropy on a task corpus) are provided. A cost that returns a non-scalar, or
NaN / inf, is an error naming it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowbit.core.checks import is_int, is_real
from lowbit.alloc.problem import (as_batch, candidate_tables, check_candidates, greedy_upgrades, knapsack, linear_units,
                                   resolve_budget)
from lowbit.alloc.recipe import Recipe
from lowbit.core.sizes import MixedSpec, spec_bytes
from lowbit.core.qtensor import QuantSpec
from lowbit.core.transforms import flatten, unflatten
from lowbit.progress import Bar

__all__ = ["AllocCfg", "AllocResult", "allocate", "discretize", "kl_cost", "kl_cost_cached", "teacher_batches",
           "batches_digest", "ce_cost", "fill_by_gradient"]


@dataclasses.dataclass(frozen=True)
class AllocCfg:
    """Optimiser settings. ``steps`` Adam steps of size ``lr`` on the logits; temperature from
    ``tau_start`` to ``tau_end`` (geometric); ``dual_lr``: the multiplier's ascent step per unit of
    relative budget violation; ``hard``: straight-through Gumbel samples instead of the soft mix;
    ``fill_batches``: batches whose cost gradient ranks the upgrades that fill the bytes the
    discretization left unused (:func:`fill_by_gradient`; 0: leave them unused)."""
    steps: int = 100
    lr: float = 0.1
    tau_start: float = 1.0
    tau_end: float = 0.1
    dual_lr: float = 1.0
    hard: bool = False
    seed: int = 0
    fill_batches: int = 4

    def __post_init__(self):
        if not is_int(self.steps) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r}: expected a positive int")
        for k in ("lr", "tau_start", "tau_end", "dual_lr"):
            v = getattr(self, k)
            if not is_real(v) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{k}={v!r}: expected a finite number > 0")
        if not is_int(self.fill_batches) or self.fill_batches < 0:
            raise ValueError(f"fill_batches={self.fill_batches!r}: expected an int >= 0")

    def tau(self, step: int) -> float:
        frac = step / max(self.steps - 1, 1)
        return float(self.tau_start * (self.tau_end / self.tau_start) ** frac)


class AllocResult(NamedTuple):
    recipe: Recipe                 # the discrete allocation (never over the budget)
    choice: dict                   # linear path -> candidate index (column blocks: a list, one per block)
    probs: dict                    # linear path -> final softmax(theta / tau_end) as numpy ((blocks, K) for blocks)
    theta: dict                    # linear path -> final logits
    nbytes: int                    # exact bytes of the recipe's linears
    budget: int                    # the budget in bytes
    bytes_table: np.ndarray        # (units, candidates) bytes (units: linears, or their column blocks)
    history: list                  # per step: step, cost, rel_bytes (E[bytes] / budget), lam, tau, seconds
    filled: int = 0                # units upgraded into the bytes the discretization left (fill_by_gradient)


def _check_block(block, cands) -> int | None:
    """``block`` (columns per unit) checked against the candidates: group-wise int specs of one
    group size that divides it, no 16-bit candidate."""
    if block is None:
        return None
    if not is_int(block) or block <= 0:
        raise ValueError(f"block={block!r}: expected a positive int (input columns per unit) or None (whole matrices)")
    bad = [c for c in cands if c is None or c.format != "int" or c.group_size is None or c.per_tensor
           or c.double_quant]
    sizes = {c.group_size for c in cands if c is not None}
    if bad or len(sizes) != 1 or block % next(iter(sizes)):
        raise ValueError(f"block={block}: column-block units need group-wise int candidates (no 16-bit one, no "
                         f"double quantization) of one group size dividing the block; got {cands}")
    return int(block)


def block_table(shape: tuple[int, int], candidates: Sequence[QuantSpec], block: int) -> np.ndarray:
    """``(blocks, K)`` bytes of each ``block``-column block of a ``shape`` matrix at each candidate:
    its codes, scales and zeros (the exact bytes of a matrix mixing widths also round each width's
    packed codes and zeros to whole 32-bit words: see :func:`allocate`)."""
    rows, cols = shape
    out = []
    for c0 in range(0, cols, block):
        n = min(block, cols - c0)
        row = []
        for s in candidates:
            ng = -(-n // s.group_size)
            bits = n * s.bits + ng * 8 * np.dtype(s.scale_dtype).itemsize + (0 if s.symmetric else ng * s.bits)
            row.append(-(-rows * bits // 8))
        out.append(row)
    return np.asarray(out, np.int64)


def discretize(theta: np.ndarray, table: np.ndarray, budget: int, tau: float = 1.0) -> np.ndarray:
    """One candidate per unit (``(U,)`` indices) whose total bytes never exceed ``budget``: the
    multiple-choice knapsack (:func:`lowbit.alloc.problem.knapsack`) over the learned
    preferences, each candidate costing ``-log softmax(theta / tau)``. Where the argmax of every
    unit fits, that is the argmax.

    (Tried before: greedy repair of the argmax by the least logit drop per byte, which can halve one
    unit's width where giving up a little elsewhere keeps it; and a first-order ``d cost / d p``
    estimate at the argmax point, near which the cost's gradient is ~0, so every downgrade looked
    free.)"""
    theta, table = np.asarray(theta, np.float64), np.asarray(table, np.int64)
    z = theta / float(tau)
    logp = z - z.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
    if int(table.min(axis=1).sum()) > budget:
        raise ValueError(f"budget={budget} bytes: below the smallest allocation ({int(table.min(axis=1).sum())})")
    return knapsack(-logp, table, budget)


def fill_room(choice: np.ndarray, table: np.ndarray, budget: int) -> bool:
    """Whether some unit's upgrade to a larger candidate fits in the bytes ``choice`` leaves unused."""
    rows = np.arange(len(table))
    extra = table - table[rows, choice][:, None]
    return bool(((extra > 0) & (extra <= int(budget) - int(table[rows, choice].sum()))).any())


def fill_by_gradient(choice: np.ndarray, table: np.ndarray, budget: int, grad: np.ndarray) -> tuple[np.ndarray, int]:
    """Spend the bytes a discrete allocation leaves under ``budget`` by the cost's own estimate:
    with ``grad = d cost / d p`` at the one-hot allocation (``(U, K)``; the model's unit ``u`` is
    ``sum_k p[u, k] Q_k(W_u)``), switching unit ``u`` from ``k`` to ``k'`` changes the cost by
    ``grad[u, k'] - grad[u, k]`` to first order. Greedily take the upgrade (more bytes) with the
    largest estimated decrease per extra byte while one fits. Returns the new choice and the number of
    upgrades.

    Why only upgrades, and why not the learned logits: the logits were trained to the argmax, so
    once ``tau`` is small every other candidate looks worse than it and the knapsack's own fill stops
    (``-log p`` gains <= 0) with up to ~5% of the budget unused (w2g64 and w4g128 runs). For a
    cost about quadratic in the weight error ``e`` (KL from the float model: ``~ e^T H e / 2``), an
    upgrade from ``e`` to a much smaller error has a first-order decrease of ``~ e^T H e`` against
    the exact ``e^T H e / 2``: a factor shared by every upgrade, so the ranking holds. A downgrade to
    a larger error ``f`` misses ``f^T H f / 2`` to first order and looks free, hence no downgrades
    here (the repair under the budget is the knapsack's)."""
    table, grad = np.asarray(table, np.int64), np.asarray(grad, np.float64)
    if grad.shape != table.shape:
        raise ValueError(f"grad {grad.shape}: expected the table's (units, candidates) shape {table.shape}")
    return greedy_upgrades(choice, grad, table, budget)   # the knapsack's fill, with the gradient as the costs


def kl_cost(model_cfg, teacher_params, *, remat: bool = True) -> Callable:
    """``cost(params, tokens)``: mean per-token KL(teacher || model) of the next-token distributions
    (temperature 1), the teacher (usually the float model) run without gradient."""
    from lowbit.train.losses import forward_train, kd_kl

    def cost(params, tokens):
        s = forward_train(params, tokens, model_cfg, remat=remat)
        t = jax.lax.stop_gradient(forward_train(teacher_params, tokens, model_cfg, remat=False))
        return kd_kl(s[:, :-1], t[:, :-1], 1.0)

    return cost


def kl_cost_cached(model_cfg, *, remat: bool = True) -> Callable:
    """:func:`kl_cost` on batches ``(tokens, teacher_logits)`` from :func:`teacher_batches`: the
    teacher's logits computed once per batch instead of on every call (the baselines' sensitivity
    passes evaluate the cost hundreds of times on the same few batches)."""
    from lowbit.train.losses import forward_train, kd_kl

    def cost(params, batch):
        tokens, t = batch
        s = forward_train(params, tokens, model_cfg, remat=remat)
        return kd_kl(s[:, :-1], t[:, :-1], 1.0)

    return cost


def teacher_batches(model_cfg, teacher_params, batches) -> list:
    """``[(tokens, teacher_logits)]`` for :func:`kl_cost_cached` (float32 logits: ``B x T x vocab``
    x 4 bytes per batch)."""
    from lowbit.train.losses import forward_train

    fwd = jax.jit(lambda p, t: forward_train(p, t, model_cfg, remat=False))
    return [(jnp.asarray(b), fwd(teacher_params, jnp.asarray(b))) for b in batches]


def batches_digest(batches, extra=None) -> str:
    """sha256 of the arrays of every item of ``batches`` (token batches, ``(tokens, logits)`` pairs,
    or candidate weight stacks; ``repr(extra)`` first, when given): what a checkpoint or a cached
    measurement on them is keyed by."""
    import hashlib

    h = hashlib.sha256() if extra is None else hashlib.sha256(repr(extra).encode())
    for b in batches:
        for leaf in jax.tree.leaves(b):   # a batch: token ids, or (token ids, teacher logits)
            h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def ce_cost(model_cfg, *, remat: bool = True) -> Callable:
    """``cost(params, tokens)``: the model's mean next-token cross-entropy on a task corpus."""
    from lowbit.train.losses import cross_entropy, forward_train

    def cost(params, tokens):
        logits = forward_train(params, tokens, model_cfg, remat=remat)
        return cross_entropy(logits[:, :-1], tokens[:, 1:])

    return cost


def _probs(theta, tau, key, hard: bool):
    soft = jax.nn.softmax(theta / tau, axis=-1)
    if not hard:
        return soft
    g = jax.random.gumbel(key, theta.shape)
    one = jax.nn.one_hot(jnp.argmax(theta / tau + g, axis=-1), theta.shape[-1], dtype=soft.dtype)
    return one + soft - jax.lax.stop_gradient(soft)   # straight-through


def allocate(params, cost_fn: Callable, candidates: Sequence[QuantSpec | None], batches, *,
             budget_bits: float | None = None, budget_bytes: int | None = None, units: Sequence[str] | None = None,
             block: int | None = None, candidate_weights: dict | None = None, cfg: AllocCfg = AllocCfg(),
             method: str = "gptq", progress: bool = True, run_dir: str | None = None, save_every: int = 25,
             stop_after: int | None = None) -> AllocResult:
    """Learn an allocation of ``candidates`` over ``units`` for ``cost_fn`` under the budget (see the
    module docstring). ``batches``: a sequence of batches (e.g. ``(B, T)`` token arrays) cycled over
    the steps. Returns an :class:`AllocResult` whose ``recipe`` (for ``method``) meets the budget.
    ``block``: units are blocks of that many input columns of each linear (module docstring).
    ``candidate_weights``: ``{unit: (K, out, in)}`` candidate weights instead of round to nearest
    (e.g. GPTQ at each width: :func:`lowbit.alloc.plan.calibrated_candidates`).

    ``run_dir``: checkpoints (logits, Adam state, multiplier; every ``save_every`` steps and at the
    end, :class:`lowbit.train.ckpt.TrainCheckpoints`) and ``history.json``; calling again with the
    same arguments resumes from the newest checkpoint, bit for bit (the step's randomness is
    ``fold_in(seed, step)``); other arguments are refused naming the fields. ``stop_after`` (tests):
    raise ``KeyboardInterrupt`` after that step has been saved."""
    cands = check_candidates(candidates)
    units = list(linear_units(params) if units is None else units)
    if not units:
        raise ValueError("units: no weight matrices to allocate (none matches)")
    batches = list(batches)
    if not batches:
        raise ValueError("batches: empty; expected at least one batch for the cost function")
    flat = flatten(params)
    missing = [u for u in units if u not in flat]
    if missing:
        raise ValueError(f"units: {missing[:5]} are not paths of params")
    block = _check_block(block, cands)
    qw, table = candidate_tables(params, units, cands, candidate_weights)
    # rows of theta: one per linear, or one per column block of each linear
    shapes = {u: tuple(int(d) for d in flat[u].shape) for u in units}
    n_rows = {u: 1 if block is None else -(-shapes[u][1] // block) for u in units}
    offs = dict(zip(units, np.cumsum([0] + [n_rows[u] for u in units])[:-1].tolist()))
    if block is not None:
        table = np.concatenate([block_table(shapes[u], cands, block) for u in units])
    n_params = sum(int(np.prod(flat[u].shape)) for u in units)
    budget = resolve_budget(table, n_params, budget_bits, budget_bytes)
    rel = jnp.asarray(table / budget, jnp.float32)

    base = {p: v for p, v in flat.items() if p not in qw}   # the weights that are not allocated

    def cost_of(p, batch, q, base):
        """The cost of the model whose unit ``u`` is ``sum_k p[u, k] Q_k(W_u)``. ``q`` (the stacked
        candidate weights) and ``base`` are arguments, not closures, so that jit does not embed the
        model in the program as constants."""
        mixed = dict(base)
        for u in units:
            if block is None:
                mixed[u] = jnp.einsum("k,koi->oi", p[offs[u]], q[u]).astype(flat[u].dtype)
            else:   # each column block mixed by its own probabilities
                pc = jnp.repeat(p[offs[u]:offs[u] + n_rows[u]], block, axis=0)[:shapes[u][1]]
                mixed[u] = jnp.einsum("ik,koi->oi", pc, q[u]).astype(flat[u].dtype)
        return cost_fn(unflatten(params, mixed), batch)

    def lagrangian(theta, lam, tau, batch, key, q, base, scale):
        p = _probs(theta, tau, key, cfg.hard)
        cost = cost_of(p, batch, q, base)
        e_rel = jnp.sum(p * rel)
        return cost / scale + lam * (e_rel - 1.0), (cost, e_rel)

    # the cost must be a scalar: checked on shapes before anything runs
    theta0 = jnp.zeros((len(table), len(cands)), jnp.float32)
    out = jax.eval_shape(lambda t, b: lagrangian(t, 0.0, 1.0, b, jax.random.key(0), qw, base, 1.0)[1][0], theta0,
                         as_batch(batches[0]))
    if out.shape != ():
        raise ValueError(f"cost_fn: returned shape {out.shape}; expected a scalar (one number per batch)")
    # the cost is measured in units of its value at the start (the uniform mix), so that the
    # multiplier's scale (cost per budget fraction) does not depend on the cost's units
    p0 = jax.nn.softmax(theta0, axis=-1)
    cost_jit = jax.jit(cost_of)
    scale = float(np.mean([float(cost_jit(p0, as_batch(b), qw, base)) for b in batches[:4]]))
    if not math.isfinite(scale):
        raise FloatingPointError(f"cost_fn: returned {scale} for the uniform candidate mix; the cost must be finite")
    scale = max(abs(scale), 1e-12)

    opt = optax.adam(cfg.lr)

    @jax.jit
    def step(theta, opt_state, lam, tau, batch, key, q, base):
        (_, (cost, e_rel)), g = jax.value_and_grad(lagrangian, has_aux=True)(theta, lam, tau, batch, key, q, base,
                                                                            scale)
        upd, opt_state = opt.update(g, opt_state, theta)
        theta = optax.apply_updates(theta, upd)
        lam = jnp.maximum(0.0, lam + cfg.dual_lr * (e_rel - 1.0))   # dual ascent on the budget constraint
        return theta, opt_state, lam, cost, e_rel

    theta, opt_state, lam = theta0, opt.init(theta0), jnp.float32(0.0)
    key = jax.random.key(cfg.seed)
    history, start, ckpts = [], 0, None
    if run_dir is not None:
        import json
        import os

        from lowbit.train.ckpt import TrainCheckpoints
        from lowbit.train.step import TrainState

        cand_digest = None if candidate_weights is None else batches_digest([qw[u] for u in units])
        trained = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "fill_batches"}   # (not training)
        config = {"units": units, "block": block, "candidates": [repr(c) for c in cands], "budget": budget,
                  "cfg": trained, "method": method, "batches": batches_digest(batches),
                  "cost": getattr(cost_fn, "__qualname__", repr(cost_fn)), "cost_scale": scale}
        if cand_digest is not None:   # (absent for round-to-nearest candidates, as before they existed)
            config["candidate_weights"] = cand_digest
        ckpts = TrainCheckpoints(os.path.join(run_dir, "checkpoints"))
        hist_path = os.path.join(run_dir, "history.json")
        restored = ckpts.restore(TrainState({"theta": theta, "lam": lam}, opt_state, key), config=config)
        if restored is not None:
            start = restored.step
            theta, lam, opt_state = restored.state.params["theta"], restored.state.params["lam"], restored.state.opt_state
            with open(hist_path) as f:
                history = [h for h in json.load(f) if h["step"] < start]

        def save(s_done: int) -> None:
            from lowbit.io.records import write_json

            ckpts.save(s_done, TrainState({"theta": theta, "lam": lam}, opt_state, key), {"config": config})
            write_json(hist_path, history)
    t0 = time.perf_counter()
    with Bar(cfg.steps, "bit allocation", enabled=progress, unit="steps") as bar:
        bar.advance(start)
        for s in range(start, cfg.steps):
            tau = cfg.tau(s)
            lam_before = float(lam)
            theta, opt_state, lam, cost, e_rel = step(theta, opt_state, lam, jnp.float32(tau),
                                                      as_batch(batches[s % len(batches)]),
                                                      jax.random.fold_in(key, s), qw, base)
            cost = float(cost)
            if not math.isfinite(cost):
                raise FloatingPointError(f"cost_fn: returned {cost} at step {s} (tau {tau:.3g}, lambda "
                                         f"{lam_before:.3g}); the cost must be finite for every candidate mix")
            history.append({"step": s, "cost": cost, "rel_bytes": float(e_rel), "lam": lam_before, "tau": tau,
                            "seconds": time.perf_counter() - t0})
            bar.advance(info=f"cost {cost:.4f}  size {float(e_rel):.3f} x budget  lambda {lam_before:.3g}")
            if ckpts is not None and (s + 1 == cfg.steps or (s + 1) % save_every == 0):
                save(s + 1)
                if stop_after is not None and s + 1 >= stop_after:
                    raise KeyboardInterrupt(f"stopped after step {s + 1} (stop_after)")
    theta_np = np.asarray(theta)

    def recipe_of(choice) -> Recipe:
        weights = {}
        for u in units:
            ks = [int(k) for k in choice[offs[u]:offs[u] + n_rows[u]]]
            if len(set(ks)) == 1:
                weights[u] = cands[ks[0]]
            else:   # a width per column group: the block's candidate for each of its groups
                g = cands[0].group_size
                widths = tuple(cands[ks[(gi * g) // block]].bits for gi in range(-(-shapes[u][1] // g)))
                weights[u] = MixedSpec(dataclasses.replace(cands[0], bits=max(widths)), widths)
        return Recipe(weights, method=method)

    grad_p = jax.jit(jax.grad(cost_of))
    gradients = {}

    def cost_gradient(choice) -> np.ndarray:
        """``d cost / d p`` at the discrete allocation (one-hot ``p``), averaged over the batches."""
        key_ = tuple(int(c) for c in choice)
        if key_ not in gradients:
            p1 = jax.nn.one_hot(jnp.asarray(choice), len(cands), dtype=jnp.float32)
            gradients[key_] = np.mean([np.asarray(grad_p(p1, as_batch(b), qw, base), np.float64)
                                       for b in batches[:cfg.fill_batches]], axis=0)
        return gradients[key_]

    # the recipe's exact bytes can exceed the table's sum (column blocks: packed words per width);
    # then discretize again under a budget lowered by the excess
    target, filled = budget, 0
    for _ in range(32):
        choice = discretize(theta_np, table, target, cfg.tau_end)
        if cfg.fill_batches and fill_room(choice, table, target):
            choice, filled = fill_by_gradient(choice, table, target, cost_gradient(choice))
        recipe = recipe_of(choice)
        nbytes = sum(spec_bytes(recipe.weights[u], shapes[u]) for u in units)
        if nbytes <= budget:
            break
        target -= nbytes - budget
    else:  # pragma: no cover - the excess is a few words per matrix
        raise RuntimeError(f"allocate: could not meet the budget of {budget} bytes exactly")
    probs = np.asarray(jax.nn.softmax(theta / cfg.tau_end, axis=-1))

    def per_linear(a):
        return {u: (a[offs[u]] if block is None else a[offs[u]:offs[u] + n_rows[u]]) for u in units}

    choice_d = {u: (int(v) if block is None else [int(x) for x in v]) for u, v in per_linear(choice).items()}
    return AllocResult(recipe, choice_d, per_linear(probs), per_linear(theta_np), int(nbytes), budget, table, history,
                       filled)
