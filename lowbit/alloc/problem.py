"""The bit-allocation problem that the learned allocation (:mod:`.learned`) and the proxy baselines
(:mod:`.baselines`) share: the units (linears), the candidates and their exact bytes, the budget,
and the exact multiple-choice knapsack over a per-unit cost table."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.core.checks import is_int, is_real
from lowbit.core.qtensor import QuantSpec
from lowbit.core.sizes import spec_bytes
from lowbit.core.transforms import flatten

__all__ = ["int_candidates", "linear_units", "candidate_tables", "budget_range", "check_candidates", "resolve_budget",
           "as_batch", "knapsack", "greedy_upgrades"]


def int_candidates(bits: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8), group_size: int | None = 128,
                   symmetric: bool = False) -> list:
    """Group-wise int candidates (asymmetric zero-point by default, partial last groups allowed)."""
    return [QuantSpec(bits=b, group_size=group_size, symmetric=symmetric and b >= 2, partial_groups=True)
            for b in bits]


def linear_units(params, pattern: str = r"_proj$") -> list[str]:
    """The paths of the 2-D weights whose path matches ``pattern`` (default: every block linear)."""
    import re

    rx = re.compile(pattern)
    return [p for p, v in flatten(params).items() if rx.search(p) and getattr(v, "ndim", 0) == 2]


def candidate_tables(params, units: Sequence[str], candidates: Sequence[QuantSpec | None],
                     weights: dict | None = None):
    """``(qweights, bytes)``: per unit the stacked dequantized candidates ``(K, out, in)`` float32
    and the exact bytes table ``(U, K)``. The candidates are round to nearest (``None`` keeps the
    weight) unless ``weights`` gives them: ``{unit: (K, out, in)}`` (e.g. :func:`lowbit.alloc.plan.calibrated_candidates`)."""
    from lowbit.core.quantizers import dequantize, quantize

    flat = flatten(params)
    q, table = {}, np.zeros((len(units), len(candidates)), np.int64)
    for i, u in enumerate(units):
        w = jnp.asarray(flat[u], jnp.float32)
        if weights is None:
            q[u] = jnp.stack([w if s is None else dequantize(quantize(w, s)) for s in candidates])
        else:
            if u not in weights or tuple(weights[u].shape) != (len(candidates), *w.shape):
                raise ValueError(f"candidate weights[{u!r}]: expected a ({len(candidates)}, {w.shape[0]}, "
                                 f"{w.shape[1]}) stack (one per candidate), got "
                                 f"{None if u not in weights else tuple(weights[u].shape)}")
            q[u] = jnp.asarray(weights[u], jnp.float32)
        table[i] = [spec_bytes(s, w.shape) for s in candidates]
    return q, table


def budget_range(bytes_table: np.ndarray) -> tuple[int, int]:
    """The smallest and largest total bytes any allocation over these candidates can have."""
    return int(bytes_table.min(axis=1).sum()), int(bytes_table.max(axis=1).sum())


def check_candidates(candidates) -> list:
    cands = list(candidates)
    if not cands:
        raise ValueError("candidates: empty; expected at least one QuantSpec (or None for 16 bit)")
    bad = [c for c in cands if c is not None and not isinstance(c, QuantSpec)]
    if bad:
        raise ValueError(f"candidates: {bad[:3]} are not QuantSpecs (or None for 16 bit)")
    if len(set(cands)) != len(cands):
        raise ValueError("candidates: contains duplicates")
    return cands


def resolve_budget(table: np.ndarray, n_params: int, budget_bits, budget_bytes) -> int:
    if (budget_bits is None) == (budget_bytes is None):
        raise ValueError("budget: give exactly one of budget_bits (mean bits per parameter) or budget_bytes")
    lo, hi = budget_range(table)
    if budget_bits is not None:
        if not is_real(budget_bits) or not math.isfinite(budget_bits):
            raise ValueError(f"budget_bits={budget_bits!r}: expected a finite number")
        budget = int(math.floor(budget_bits * n_params / 8))
        what = f"budget_bits={budget_bits}"
    else:
        if not is_int(budget_bytes):
            raise ValueError(f"budget_bytes={budget_bytes!r}: expected an int")
        budget, what = int(budget_bytes), f"budget_bytes={budget_bytes}"
    if not lo <= budget <= hi:
        raise ValueError(f"{what}: outside the feasible range of these candidates: {lo}..{hi} bytes "
                         f"({8 * lo / n_params:.4f}..{8 * hi / n_params:.4f} bits per parameter)")
    srt = np.sort(table, axis=1)
    if table.shape[1] < 2 or budget < lo + int((srt[:, 1] - srt[:, 0]).min()):   # not one upgrade fits
        import warnings

        warnings.warn(f"{what}: no unit can afford more than its cheapest candidate ({lo} bytes for all), so the "
                      "allocation is forced; offer a cheaper candidate (e.g. fewer bits) to leave room to choose",
                      stacklevel=3)
    return budget


def as_batch(b):
    return jax.tree.map(jnp.asarray, b)


def knapsack(costs: np.ndarray, table: np.ndarray, budget: int, resolution: int = 16384) -> np.ndarray:
    """Multiple-choice knapsack: one candidate per unit (``(U,)`` indices) minimising
    ``sum_u costs[u, k_u]`` subject to ``sum_u table[u, k_u] <= budget``, by dynamic programming
    over the budget in ``resolution`` steps (each item's bytes rounded *up* to a step, so the
    result never exceeds the budget; exact when the bytes are multiples of the step). When the
    rounding leaves no feasible allocation (a budget within a few steps of the smallest one), the
    resolution is refined (x4) until one fits. The bytes the rounding left unused are then filled
    greedily with exact bytes: the upgrade with the largest cost decrease per extra byte, while one
    fits (with 210 units the rounding alone left ~2% of a 42 MB budget unused at 4096 steps)."""
    costs, table = np.asarray(costs, np.float64), np.asarray(table, np.int64)
    if costs.shape != table.shape:
        raise ValueError(f"costs {costs.shape} and table {table.shape}: expected the same (units, candidates) shape")
    if not np.all(np.isfinite(costs)):
        raise ValueError("costs: contain NaN or inf")
    if int(table.min(axis=1).sum()) > int(budget):
        raise ValueError(f"budget={budget} bytes: below the smallest allocation ({int(table.min(axis=1).sum())})")
    u_n, _ = table.shape
    while True:
        step = max(1, -(-int(budget) // int(resolution)))
        w = -(-table // step)                       # bytes in steps, rounded up
        cap = int(budget) // step
        if int(w.min(axis=1).sum()) <= cap:
            break
        if cap > 1 << 24:
            raise ValueError(f"budget={budget} bytes: too close to the smallest allocation for the DP's resolution")
        resolution *= 4
    inf = np.inf
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    back = np.zeros((u_n, cap + 1), np.int64)
    for u in range(u_n):
        new = np.full(cap + 1, inf)
        arg = np.zeros(cap + 1, np.int64)
        for k in range(table.shape[1]):
            wk = int(w[u, k])
            if wk > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[wk:] = best[: cap + 1 - wk] + costs[u, k]
            better = cand < new
            new[better], arg[better] = cand[better], k
        best, back[u] = new, arg
    c = int(np.argmin(best))
    choice = np.zeros(u_n, np.int64)
    for u in range(u_n - 1, -1, -1):
        k = int(back[u, c])
        choice[u] = k
        c -= int(w[u, k])
    return greedy_upgrades(choice, costs, table, budget)[0]


def greedy_upgrades(choice: np.ndarray, costs: np.ndarray, table: np.ndarray, budget: int) -> tuple[np.ndarray, int]:
    """Spend the bytes ``choice`` leaves under ``budget``: while an upgrade (more bytes) that lowers
    ``sum_u costs[u, k_u]`` fits, take the one with the largest cost decrease per extra byte.
    Returns the new choice and the number of upgrades taken."""
    choice = np.asarray(choice, np.int64).copy()
    rows = np.arange(len(table))
    left = int(budget) - int(table[rows, choice].sum())
    n = 0
    while True:
        extra = table - table[rows, choice][:, None]
        gain = costs[rows, choice][:, None] - costs            # > 0: the upgrade lowers the cost
        ok = (extra > 0) & (extra <= left) & (gain > 0)
        if not ok.any():
            return choice, n
        u, k = np.unravel_index(np.argmax(np.where(ok, gain / np.maximum(extra, 1), -np.inf)), ok.shape)
        left -= int(extra[u, k])
        choice[u] = k
        n += 1
