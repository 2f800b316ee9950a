"""Bit-allocation baselines on the same candidates, bytes and budget as :mod:`lowbit.alloc.learned`.

Both score every (unit, candidate) pair with a sensitivity proxy and pick one candidate per unit
by an exact multiple-choice knapsack (:func:`knapsack`) under the byte budget:

* **HAWQ-style** (Dong et al., HAWQ-V2 / Yao et al., HAWQ-V3): the second-order estimate of the
  loss increase ``Omega_uk = Tr(H_u) / n_u * ||Q_k(W_u) - W_u||^2``, ``H_u`` the Hessian of the task
  cost with respect to unit ``u``'s weights, its trace by Hutchinson's estimator
  (:func:`hutchinson_traces`: ``E[v^T H v]`` over Rademacher ``v``; one Hessian-vector product per
  sample gives every unit's trace at once, from the unit's block of ``v``). HAWQ-V3 solves an ILP;
  the knapsack DP below is the same optimisation, exact up to the byte resolution.
* **HIGGS-style** (Malinovskii et al., "Pushing the limits of LLM quantization via the linearity
  theorem"): the cost increase is linear in each layer's relative quantization error
  ``t_uk = ||Q_k(W_u) - W_u||^2 / ||W_u||^2`` with a per-layer coefficient ``alpha_u``
  (:func:`noise_sensitivities`: the cost increase when Gaussian noise of relative power ``t`` is
  added to that layer alone, divided by ``t``, averaged over draws), then dynamic programming over
  the budget: ``min sum_u alpha_u t_uk``.

Deviation (both): the candidate weights are round-to-nearest, as in :mod:`lowbit.alloc.learned`;
the final model is re-quantized by the recipe's method (GPTQ by default) at the chosen widths.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.alloc.problem import as_batch, candidate_tables, check_candidates, knapsack, linear_units, resolve_budget
from lowbit.alloc.recipe import Recipe
from lowbit.core.qtensor import QuantSpec
from lowbit.core.transforms import flatten, unflatten
from lowbit.progress import Bar

__all__ = ["hutchinson_traces", "noise_sensitivities", "hawq_allocate", "higgs_allocate",
           "uniform_recipe"]


def hutchinson_traces(params, cost_fn: Callable, units: Sequence[str], batches, *, samples: int = 8,
                      seed: int = 0, progress: bool = False) -> np.ndarray:
    """``Tr(H_u)`` of the cost's Hessian with respect to each unit's weights (Hutchinson: the mean of
    ``v_u^T (H v)_u`` over Rademacher vectors ``v`` on all units at once; ``samples`` per batch,
    batches cycled)."""
    flat = flatten(params)
    ws = {u: jnp.asarray(flat[u], jnp.float32) for u in units}
    base = {p: v for p, v in flat.items() if p not in ws}

    def cost_w(w, batch, base):
        return cost_fn(unflatten(params, {**base, **w}), batch)

    @jax.jit
    def hvp_quad(w, v, batch, base):
        g = lambda x: jax.grad(cost_w)(x, batch, base)
        _, hv = jax.jvp(g, (w,), (v,))
        return jnp.stack([jnp.sum(v[u] * hv[u]) for u in units])

    key = jax.random.key(seed)
    est = []
    batches = list(batches)
    with Bar(samples, "Hutchinson traces", enabled=progress, unit="probes") as bar:
        for s in range(samples):
            ks = jax.random.split(jax.random.fold_in(key, s), len(units))
            v = {u: jax.random.rademacher(k, ws[u].shape, jnp.float32) for u, k in zip(units, ks)}
            est.append(np.asarray(hvp_quad(ws, v, as_batch(batches[s % len(batches)]), base)))
            bar.advance()
    return np.mean(est, axis=0)


def noise_sensitivities(params, cost_fn: Callable, units: Sequence[str], batches, *, rel_noise: float = 0.01,
                        draws: int = 2, seed: int = 0, progress: bool = False) -> np.ndarray:
    """HIGGS' per-layer linear coefficients ``alpha_u``: the increase of the mean cost when unit
    ``u`` alone gets Gaussian noise of relative power ``rel_noise`` (``||N||^2 = rel_noise *
    ||W||^2``), divided by ``rel_noise``, averaged over ``draws`` noise draws."""
    flat = flatten(params)
    batches = [as_batch(b) for b in batches]
    cost_j = jax.jit(lambda p, b: cost_fn(p, b))
    clean = float(np.mean([float(cost_j(params, b)) for b in batches]))
    key = jax.random.key(seed)
    alphas = []
    with Bar(len(units), "noise sensitivities", enabled=progress, unit="linears") as bar:
        for i, u in enumerate(units):
            w = jnp.asarray(flat[u], jnp.float32)
            scale = jnp.sqrt(rel_noise * jnp.sum(w * w) / w.size)
            incs = []
            for d in range(draws):
                n = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), d), w.shape) * scale
                noisy = unflatten(params, {**flat, u: (w + n).astype(flat[u].dtype)})
                incs.append(np.mean([float(cost_j(noisy, b)) for b in batches]) - clean)
            alphas.append(max(float(np.mean(incs)), 0.0) / rel_noise)
            bar.advance()
    return np.asarray(alphas)


def _rel_errors(params, units, qw) -> tuple[np.ndarray, np.ndarray]:
    """``(||Q_k(W_u) - W_u||^2, ||W_u||^2)`` per unit and candidate."""
    flat = flatten(params)
    err = np.stack([np.asarray(jnp.sum((qw[u] - jnp.asarray(flat[u], jnp.float32)[None]) ** 2, axis=(1, 2)))
                    for u in units])
    norm = np.asarray([float(jnp.sum(jnp.asarray(flat[u], jnp.float32) ** 2)) for u in units])
    return err, norm


def _check_sensitivities(v, units, name: str) -> np.ndarray:
    v = np.asarray(v, np.float64)
    if v.shape != (len(units),) or not np.isfinite(v).all():
        raise ValueError(f"{name}: expected {len(units)} finite values (one per unit), got shape {v.shape}")
    return v


def _setup(params, candidates, units, budget_bits, budget_bytes):
    cands = check_candidates(candidates)
    units = list(linear_units(params) if units is None else units)
    qw, table = candidate_tables(params, units, cands)
    n_params = sum(int(np.prod(qw[u].shape[1:])) for u in units)
    return cands, units, qw, table, resolve_budget(table, n_params, budget_bits, budget_bytes)


def hawq_allocate(params, cost_fn: Callable, candidates: Sequence[QuantSpec | None], batches, *,
                  budget_bits: float | None = None, budget_bytes: int | None = None, units=None,
                  samples: int = 8, method: str = "gptq", seed: int = 0,
                  traces: np.ndarray | None = None, progress: bool = False) -> tuple[Recipe, dict]:
    """HAWQ-style allocation (module docstring): Hutchinson traces x quantization error, knapsack.
    ``traces``: the units' traces measured before (they do not depend on the budget).
    Returns the recipe and ``{"traces", "costs", "choice", "nbytes", "budget"}``."""
    cands, units, qw, table, budget = _setup(params, candidates, units, budget_bits, budget_bytes)
    if traces is None:
        traces = hutchinson_traces(params, cost_fn, units, batches, samples=samples, seed=seed, progress=progress)
    traces = _check_sensitivities(traces, units, "traces")
    err, _ = _rel_errors(params, units, qw)
    sizes = np.asarray([qw[u].shape[1] * qw[u].shape[2] for u in units], np.float64)
    costs = np.maximum(traces, 0.0)[:, None] / sizes[:, None] * err
    choice = knapsack(costs, table, budget)
    rec = Recipe({u: cands[int(k)] for u, k in zip(units, choice)}, method=method)
    return rec, {"traces": traces, "costs": costs, "choice": choice,
                 "nbytes": int(table[np.arange(len(units)), choice].sum()), "budget": budget}


def higgs_allocate(params, cost_fn: Callable, candidates: Sequence[QuantSpec | None], batches, *,
                   budget_bits: float | None = None, budget_bytes: int | None = None, units=None,
                   rel_noise: float = 0.01, draws: int = 2, method: str = "gptq",
                   seed: int = 0, alphas: np.ndarray | None = None, progress: bool = False) -> tuple[Recipe, dict]:
    """HIGGS-style allocation (module docstring): noise sensitivities x relative error, DP.
    ``alphas``: the units' coefficients measured before (they do not depend on the budget).
    Returns the recipe and ``{"alphas", "costs", "choice", "nbytes", "budget"}``."""
    cands, units, qw, table, budget = _setup(params, candidates, units, budget_bits, budget_bytes)
    if alphas is None:
        alphas = noise_sensitivities(params, cost_fn, units, batches, rel_noise=rel_noise, draws=draws, seed=seed,
                                     progress=progress)
    alphas = _check_sensitivities(alphas, units, "alphas")
    err, norm = _rel_errors(params, units, qw)
    costs = alphas[:, None] * err / np.maximum(norm, 1e-30)[:, None]
    choice = knapsack(costs, table, budget)
    rec = Recipe({u: cands[int(k)] for u, k in zip(units, choice)}, method=method)
    return rec, {"alphas": alphas, "costs": costs, "choice": choice,
                 "nbytes": int(table[np.arange(len(units)), choice].sum()), "budget": budget}


def uniform_recipe(params, spec: QuantSpec, units=None, method: str = "gptq") -> Recipe:
    """Every unit at one spec (the uniform baseline, as a recipe)."""
    units = list(linear_units(params) if units is None else units)
    return Recipe({u: spec for u in units}, method=method)

