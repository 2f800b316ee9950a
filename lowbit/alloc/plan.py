"""Allocate a loaded model end to end (``lowbit allocate``): calibration windows -> a task cost ->
the learned allocation or a baseline -> a recipe file, its per-layer bits heatmap and a record.

::

    recipe, info = allocate_model(params, cfg, windows, kind="learned", candidates=int_candidates((2, 3, 4, 8)),
                                  budget_bytes=uniform_bytes(params, QuantSpec(bits=3, group_size=128, ...)))
"""

from __future__ import annotations

import re
import time
from typing import Sequence

import numpy as np

from lowbit import methods
from lowbit.alloc import baselines, learned, problem
from lowbit.alloc.recipe import Recipe, code_bits, spec_bytes
from lowbit.core.qtensor import QuantSpec
from lowbit.core.transforms import flatten
from lowbit.plots import figure

__all__ = ["KINDS", "ROUND_TO_NEAREST", "allocate_model", "candidate_methods", "calibrated_candidates", "uniform_bytes",
           "plot_bits", "plot_history"]

KINDS = ("learned", "hawq", "higgs")


def uniform_bytes(params, spec: QuantSpec, units: Sequence[str] | None = None) -> int:
    """Exact bytes of every unit at ``spec`` (the size of the uniform model, as a budget)."""
    flat = flatten(params)
    units = problem.linear_units(params) if units is None else units
    return sum(spec_bytes(spec, tuple(flat[u].shape)) for u in units)


#: candidate weights rounded to nearest inside the relaxation (no calibration pass): ``--candidates rtn``
ROUND_TO_NEAREST = "rtn"


def candidate_methods() -> list[str]:
    """What ``candidate_weights`` may name: :data:`ROUND_TO_NEAREST`, or a registered method that
    calibrates (collects statistics) and takes a width per column group (its candidates at each
    width, :func:`calibrated_candidates`)."""
    return [ROUND_TO_NEAREST] + methods.with_names(lambda m: m.quantizes and not m.data_free and m.mixed is not None)


def calibrated_candidates(params, model_cfg, windows, candidates: Sequence[QuantSpec | None], units: Sequence[str], *,
                          method: str = "gptq", batch_size: int = 4, progress: bool = True) -> dict:
    """``{unit: (K, out, in)}`` float32: every unit quantized by ``method`` (GPTQ by default) at each
    candidate (the whole model at one candidate per pass of the layer-sequential driver, all linears of
    a block from one capture, on the same calibration ``windows``), dequantized; ``None`` (16 bit)
    keeps the weight. For a column-block allocation these are uniform-width weights: the final GPTQ
    at mixed widths feeds each block's error on to blocks of other widths."""
    import jax.numpy as jnp

    from lowbit.calib.driver import quantize_model
    from lowbit.core.quantizers import dequantize

    flat = flatten(params)
    stacks = {u: [] for u in units}
    for s in candidates:
        if s is None:
            q = flat
        else:
            t = baselines.uniform_recipe(params, s, units, method=method).transform()
            qp, _ = quantize_model(params, model_cfg, t, windows, batch_size=batch_size, true_sequential=False,
                                   progress=progress)
            q = flatten(qp)
        for u in units:
            w = q[u]
            stacks[u].append(np.asarray(dequantize(w) if s is not None else jnp.asarray(w, jnp.float32), np.float32))
    return {u: np.stack(v) for u, v in stacks.items()}


class _SensitivityCache:
    """A baseline's per-unit sensitivities (HAWQ traces, HIGGS alphas: independent of the budget) in
    ``run_dir/sensitivity-<kind>.json``, keyed by everything they depend on."""

    def __init__(self, path: str, key: str):
        self.path, self.key = path, key

    def load(self):
        import json
        import os

        if not os.path.isfile(self.path):
            return None
        with open(self.path) as f:
            d = json.load(f)
        return np.asarray(d["values"], np.float64) if d.get("key") == self.key else None

    def save(self, values) -> None:
        from lowbit.io.records import write_json

        write_json(self.path, {"key": self.key, "values": [float(v) for v in values]})


def _sensitivity_cache(run_dir, kind, cost, seed, batches, units, samples):
    if run_dir is None:
        return None
    import os

    key = learned.batches_digest(batches, (kind, cost, seed, list(units)) + ((samples,) if samples else ()))
    return _SensitivityCache(os.path.join(run_dir, f"sensitivity-{kind}.json"), key)


TEACHER_CACHE_BYTES = 4 << 30   # the KL cost keeps the float model's logits when they fit in this


def _cached_teacher(cost: str, cost_fn, batches, params, model_cfg, windows):
    """``(cost_fn, batches)`` for a run that evaluates the cost many times on the same batches: with
    the KL cost, the float model's logits computed once per batch (:func:`learned.kl_cost_cached`)
    when every window's float32 logits (``N x T x vocab x 4`` bytes) fit in
    :data:`TEACHER_CACHE_BYTES`; otherwise the cost as it is."""
    n, t = np.shape(windows)
    if cost != "kl" or int(n) * int(t) * int(model_cfg.vocab_size) * 4 > TEACHER_CACHE_BYTES:
        return cost_fn, batches
    return learned.kl_cost_cached(model_cfg), learned.teacher_batches(model_cfg, params, batches)


def allocate_model(params, model_cfg, windows, *, kind: str = "learned", candidates: Sequence[QuantSpec | None],
                   budget_bits: float | None = None, budget_bytes: int | None = None, cost: str = "kl",
                   batch_size: int = 4, cfg: learned.AllocCfg = learned.AllocCfg(), method: str = "gptq",
                   progress: bool = True, run_dir: str | None = None, block: int | None = None,
                   candidate_weights: str = "rtn", samples: int | None = None) -> tuple[Recipe, dict]:
    """The allocation of ``kind`` (:data:`KINDS`) for the model on calibration ``windows`` (``(N, T)``
    token ids, cut into batches of ``batch_size``), with the cost ``kl`` (KL from the float model)
    or ``ce`` (next-token cross-entropy on the windows). Returns the recipe and a JSON-able record.
    ``run_dir``: learned: checkpoints to resume an interrupted run from; hawq / higgs: the measured
    sensitivities, reused by a later call with another budget on the same windows; ``block`` (learned): units
    of that many input columns instead of whole linears; ``candidate_weights`` (learned): ``rtn``
    (round to nearest) or a calibrating method, e.g. ``gptq`` (:func:`calibrated_candidates` on the same
    windows; :func:`candidate_methods`); ``samples``: hawq:
    Hutchinson probes (default 8), higgs: noise draws per unit (default 2)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    if block is not None and kind != "learned":
        raise ValueError(f"block={block}: column-block units are for kind='learned' (the baselines score whole linears)")
    if cost not in ("kl", "ce"):
        raise ValueError(f"cost={cost!r}: expected 'kl' (KL from the float model) or 'ce' (cross-entropy)")
    windows = np.asarray(windows, np.int32)
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    cost_fn = learned.kl_cost(model_cfg, params) if cost == "kl" else learned.ce_cost(model_cfg)
    t0 = time.perf_counter()
    budget = dict(budget_bits=budget_bits, budget_bytes=budget_bytes)
    if candidate_weights not in candidate_methods():
        raise ValueError(f"candidate_weights={candidate_weights!r}: expected one of {candidate_methods()}")
    if samples is not None and (kind == "learned" or not isinstance(samples, int) or samples < 1):
        raise ValueError(f"samples={samples!r}: expected a positive int, for kind='hawq' (Hutchinson probes) "
                         "or 'higgs' (noise draws per unit)")
    if candidate_weights != ROUND_TO_NEAREST and kind != "learned":
        raise ValueError(f"candidate_weights={candidate_weights!r}: for kind='learned' (the baselines score "
                         "round-to-nearest errors)")
    if kind == "learned":
        cw = None
        if candidate_weights != ROUND_TO_NEAREST:
            cw = calibrated_candidates(params, model_cfg, windows, candidates, problem.linear_units(params),
                                       method=candidate_weights, batch_size=batch_size, progress=progress)
        l_cost, l_batches = _cached_teacher(cost, cost_fn, batches, params, model_cfg, windows)
        res = learned.allocate(params, l_cost, candidates, l_batches, cfg=cfg, method=method, progress=progress,
                               run_dir=run_dir, block=block, candidate_weights=cw, **budget)
        recipe, info = res.recipe, {"nbytes": res.nbytes, "budget": res.budget, "history": res.history,
                                    "choice": res.choice, "filled": res.filled}
    else:
        fn = baselines.hawq_allocate if kind == "hawq" else baselines.higgs_allocate
        name = "traces" if kind == "hawq" else "alphas"
        cache = _sensitivity_cache(run_dir, kind, cost, cfg.seed, batches, problem.linear_units(params), samples)
        known = cache.load() if cache else None
        fn_cost, fn_batches = (cost_fn, batches) if known is not None else \
            _cached_teacher(cost, cost_fn, batches, params, model_cfg, windows)
        n = {} if samples is None else {("samples" if kind == "hawq" else "draws"): samples}
        recipe, extra = fn(params, fn_cost, candidates, fn_batches, method=method, seed=cfg.seed, progress=progress,
                           **budget, **n,
                           **({name: known} if known is not None else {}))
        if cache and known is None:
            cache.save(extra[name])
        info = {"nbytes": extra["nbytes"], "budget": extra["budget"],
                "choice": dict(zip(recipe.weights, (int(k) for k in extra["choice"])))}
        info["sensitivity"] = dict(zip(recipe.weights, (float(v) for v in extra.get("traces", extra.get("alphas")))))
    flat = flatten(params)
    n = sum(int(np.prod(flat[u].shape)) for u in recipe.weights)
    info.update(kind=kind, cost=cost, seconds=time.perf_counter() - t0, bits_per_param=8.0 * info["nbytes"] / n,
                budget_bits_per_param=8.0 * info["budget"] / n)
    return recipe, info


def plot_bits(recipe: Recipe, path: str, title: str = "") -> None:
    """Heatmap of the bits per weight of each linear (rows: linear kind; columns: block index; 16 =
    dense; a width per column group: the mean width)."""
    cells: dict[tuple[str, int], float] = {}
    for p, s in recipe.weights.items():
        m = re.match(r"^(?:.*/)?(\d+)/(.+)$", p)
        layer, kind = (int(m.group(1)), m.group(2)) if m else (0, p)
        cells[(kind, layer)] = code_bits(s)
    kinds = sorted({k for k, _ in cells})
    layers = sorted({i for _, i in cells})
    grid = np.full((len(kinds), len(layers)), np.nan)
    for (k, i), b in cells.items():
        grid[kinds.index(k), layers.index(i)] = b
    with figure(path, figsize=(max(6, 0.3 * len(layers) + 2), 0.45 * len(kinds) + 1.5)) as (fig, ax):
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
        ax.set_xticks(range(len(layers)), layers, fontsize=6)
        ax.set_xlabel("block")
        fig.colorbar(im, ax=ax, label="bits per weight (16 = dense)")
        ax.set_title(title or "bits per linear", fontsize=9)


def plot_history(history: list[dict], path: str, title: str = "") -> None:
    """The learned allocation's run: cost, expected size / budget and the multiplier per step."""
    steps = [h["step"] for h in history]
    with figure(path, figsize=(12, 3.2), ncols=3, dpi=110) as (fig, axes):
        for ax, key, label in zip(axes, ("cost", "rel_bytes", "lam"),
                                  ("task cost", "expected size / budget", "Lagrange multiplier")):
            ax.plot(steps, [h[key] for h in history])
            if key == "rel_bytes":
                ax.axhline(1.0, ls="--", color="k", lw=0.8)
            ax.set_xlabel("step")
            ax.set_title(label, fontsize=9)
        fig.suptitle(title, fontsize=9)
