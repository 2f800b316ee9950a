"""Learned bit allocation (lowbit.alloc.learned): the optimiser gives a sensitive layer more bits,
the discrete allocation never exceeds the budget, the Lagrange multiplier rises while the budget is
violated, bad inputs are named; the result is a recipe for the model."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.alloc import learned, problem
from lowbit.core.qtensor import QuantSpec

CANDS = problem.int_candidates(bits=(2, 3, 4, 8), group_size=None)


def _toy(seed=0):
    """Two linears; the cost weighs the first one's output error 100x: it is the sensitive one."""
    rng = np.random.default_rng(seed)
    w = {"layers": [{"a_proj": jnp.asarray(rng.standard_normal((16, 64)), jnp.float32),
                     "b_proj": jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)}]}
    ref = jax.tree.map(lambda x: x, w)

    def cost(params, x):
        la, lb = params["layers"][0], ref["layers"][0]
        ea = jnp.mean((x @ la["a_proj"].T - x @ lb["a_proj"].T) ** 2)
        eb = jnp.mean((x @ la["b_proj"].T - x @ lb["b_proj"].T) ** 2)
        return 100.0 * ea + eb

    xs = [jnp.asarray(rng.standard_normal((32, 64)), jnp.float32) for _ in range(4)]
    return w, cost, xs


def test_the_sensitive_layer_gets_more_bits_and_the_budget_holds():
    params, cost, xs = _toy()
    # (fill_batches=0: the trained preferences alone; here they leave 384 bytes that the fill, below,
    # spends on b's 3 -> 4 bit upgrade, the only one that fits: then both are at 4 bits)
    res = learned.allocate(params, cost, CANDS, xs, budget_bits=5.75,
                           cfg=learned.AllocCfg(steps=60, lr=0.2, fill_batches=0), progress=False)
    bits = {u: CANDS[k].bits for u, k in res.choice.items()}
    assert bits["layers/0/a_proj"] > bits["layers/0/b_proj"], bits
    assert res.nbytes <= res.budget
    assert res.recipe.nbytes(params) == res.nbytes            # the recipe's exact bytes are the allocation's
    assert set(res.recipe.weights) == {"layers/0/a_proj", "layers/0/b_proj"}


def test_discretize_never_exceeds_the_budget():
    import itertools

    rng = np.random.default_rng(1)
    for _ in range(100):
        u, k = rng.integers(1, 5), rng.integers(1, 4)
        table = np.sort(rng.integers(10, 1000, (u, k)), axis=1)
        lo, hi = problem.budget_range(table)
        budget = int(rng.integers(lo, hi + 1))
        theta = rng.standard_normal((u, k))
        choice = learned.discretize(theta, table, budget)
        assert table[np.arange(u), choice].sum() <= budget
        # the most preferred feasible allocation (sum of log-probabilities), up to the DP's rounding
        logp = theta - np.log(np.exp(theta).sum(axis=1, keepdims=True))
        best = max(sum(logp[i, c[i]] for i in range(u)) for c in itertools.product(range(k), repeat=u)
                   if sum(table[i, c[i]] for i in range(u)) <= budget)
        assert logp[np.arange(u), choice].sum() >= best - 1e-9   # exact: the bytes are below the DP resolution
    theta = np.array([[0.0, 5.0], [5.0, 0.0]])
    assert list(learned.discretize(theta, np.array([[1, 2], [1, 2]]), 4)) == [1, 0]   # the argmax fits


def test_the_multiplier_rises_while_the_budget_is_violated():
    params, cost, xs = _toy()
    lo, hi = problem.budget_range(problem.candidate_tables(params, problem.linear_units(params), CANDS)[1])
    res = learned.allocate(params, cost, CANDS, xs, budget_bytes=lo + (hi - lo) // 10,
                           cfg=learned.AllocCfg(steps=12, lr=0.05), progress=False)
    h = res.history
    over = [r for r in h if r["rel_bytes"] > 1.0]
    assert len(over) >= 3
    lams = [r["lam"] for r in h]
    # lambda after a violated step is larger than before it
    assert all(lams[i + 1] > lams[i] for i in range(len(h) - 1) if h[i]["rel_bytes"] > 1.0)
    assert res.nbytes <= res.budget


def test_hard_straight_through_variant_runs_and_meets_the_budget():
    params, cost, xs = _toy()
    res = learned.allocate(params, cost, CANDS, xs, budget_bits=4.0,
                           cfg=learned.AllocCfg(steps=10, hard=True), progress=False)
    assert res.nbytes <= res.budget and np.isfinite([r["cost"] for r in res.history]).all()


def test_bad_inputs_are_named():
    params, cost, xs = _toy()
    with pytest.raises(ValueError, match="candidates: empty"):
        learned.allocate(params, cost, [], xs, budget_bits=4.0, progress=False)
    with pytest.raises(ValueError, match=r"outside the feasible range.*bits per parameter"):
        learned.allocate(params, cost, CANDS, xs, budget_bits=1.0, progress=False)
    with pytest.raises(ValueError, match="outside the feasible range"):
        learned.allocate(params, cost, CANDS, xs, budget_bits=9.0, progress=False)
    with pytest.raises(ValueError, match="exactly one of"):
        learned.allocate(params, cost, CANDS, xs, progress=False)
    with pytest.raises(ValueError, match="cost_fn: returned shape"):
        learned.allocate(params, lambda p, x: jnp.ones(3), CANDS, xs, budget_bits=4.0, progress=False)
    with pytest.raises(FloatingPointError, match="cost_fn: returned nan"):
        learned.allocate(params, lambda p, x: jnp.float32(jnp.nan), CANDS, xs, budget_bits=4.0, progress=False)
    with pytest.raises(ValueError, match="not paths of params"):
        learned.allocate(params, cost, CANDS, xs, budget_bits=4.0, units=["layers/0/c_proj"], progress=False)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="fill_batches"):
            learned.AllocCfg(fill_batches=bad)


def test_allocates_a_tiny_llama_with_the_kl_cost_and_16_bit_candidate():
    from lowbit.models import llama

    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, max_position_embeddings=32)
    params = llama.init_params(jax.random.key(0), cfg)
    toks = [np.random.default_rng(i).integers(0, 64, (2, 16)).astype(np.int32) for i in range(2)]
    cands = problem.int_candidates(bits=(2, 4), group_size=16) + [None]
    res = learned.allocate(params, learned.kl_cost(cfg, params, remat=False), cands, toks, budget_bits=4.5,
                           cfg=learned.AllocCfg(steps=4), progress=False)
    res.recipe.check(params)
    assert len(res.choice) == 14 and res.nbytes <= res.budget
    assert res.history[0]["cost"] >= 0
    assert isinstance(QuantSpec, type)


def test_a_budget_with_no_room_to_choose_warns():
    params = {"a_proj": jnp.ones((4, 32)), "b_proj": jnp.ones((4, 32))}
    cands = problem.int_candidates(bits=(2, 4), group_size=16)
    _, table = problem.candidate_tables(params, ["a_proj", "b_proj"], cands)
    lo, _ = problem.budget_range(table)
    with pytest.warns(UserWarning, match="allocation is forced"):
        assert problem.resolve_budget(table, 256, None, lo) == lo
    step = int((table[:, 1] - table[:, 0]).min())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert problem.resolve_budget(table, 256, None, lo + step) == lo + step


def test_kl_cost_with_cached_teacher_logits_equals_kl_cost():
    from lowbit.models import llama

    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, max_position_embeddings=32)
    teacher = llama.init_params(jax.random.key(0), cfg)
    student = llama.init_params(jax.random.key(1), cfg)
    toks = [np.random.default_rng(i).integers(0, 64, (2, 16)).astype(np.int32) for i in range(2)]
    cached = learned.teacher_batches(cfg, teacher, toks)
    for t, b in zip(toks, cached):
        want = float(learned.kl_cost(cfg, teacher, remat=False)(student, jnp.asarray(t)))
        assert want > 0
        assert float(learned.kl_cost_cached(cfg, remat=False)(student, b)) == pytest.approx(want, rel=1e-5)
        assert float(learned.kl_cost_cached(cfg)(teacher, b)) == pytest.approx(0.0, abs=1e-5)
    # the allocation itself runs on (tokens, teacher logits) batches and learns the same thing
    cands = problem.int_candidates(bits=(2, 4), group_size=16)
    kw = dict(budget_bits=4.5, cfg=learned.AllocCfg(steps=4), progress=False)
    a = learned.allocate(teacher, learned.kl_cost(cfg, teacher, remat=False), cands, toks, **kw)
    b = learned.allocate(teacher, learned.kl_cost_cached(cfg, remat=False), cands, cached, **kw)
    assert a.choice == b.choice
    np.testing.assert_allclose([h["cost"] for h in a.history], [h["cost"] for h in b.history], rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- baselines


def test_knapsack_is_optimal_and_within_budget():
    import itertools


    rng = np.random.default_rng(3)
    for _ in range(40):
        u, k = rng.integers(1, 5), rng.integers(1, 4)
        table = rng.integers(1, 30, (u, k)) * 8
        costs = rng.random((u, k))
        lo, hi = problem.budget_range(table)
        budget = int(rng.integers(lo, hi + 1))
        choice = problem.knapsack(costs, table, budget, resolution=10**6)   # exact at this resolution
        assert table[np.arange(u), choice].sum() <= budget
        best = min(sum(costs[i, c[i]] for i in range(u)) for c in itertools.product(range(k), repeat=u)
                   if sum(table[i, c[i]] for i in range(u)) <= budget)
        assert costs[np.arange(u), choice].sum() == pytest.approx(best)
        coarse = problem.knapsack(costs, table, budget, resolution=7)    # rounding up never overshoots
        left = budget - table[np.arange(u), coarse].sum()
        assert left >= 0
        # ... and what the rounding left unused is filled: no upgrade that lowers the cost still fits
        assert not any(0 < table[i, j] - table[i, coarse[i]] <= left and costs[i, j] < costs[i, coarse[i]]
                       for i in range(u) for j in range(k))


@pytest.mark.parametrize("which", ["hawq", "higgs"])
def test_baselines_give_the_sensitive_layer_more_bits(which):
    from lowbit.alloc import baselines

    params, cost, xs = _toy()
    fn = baselines.hawq_allocate if which == "hawq" else baselines.higgs_allocate
    rec, info = fn(params, cost, CANDS, xs, budget_bits=5.75)
    bits = {u: s.bits for u, s in rec.weights.items()}
    assert bits["layers/0/a_proj"] > bits["layers/0/b_proj"], (bits, info)
    assert info["nbytes"] <= info["budget"] and rec.nbytes(params) == info["nbytes"]


def test_hutchinson_trace_matches_the_exact_trace_of_a_quadratic():
    from lowbit.alloc import baselines

    rng = np.random.default_rng(4)
    a = jnp.asarray(rng.standard_normal((6, 6)), jnp.float32)
    h = a @ a.T   # the cost's Hessian w.r.t. every row of W: tr = rows * tr(h)
    params = {"w_proj": jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)}
    cost = lambda p, x: 0.5 * jnp.sum((p["w_proj"] @ h) * p["w_proj"])
    tr = baselines.hutchinson_traces(params, cost, ["w_proj"], [jnp.zeros(1)], samples=400)
    assert tr[0] == pytest.approx(3 * float(jnp.trace(h)), rel=0.1)


@pytest.mark.parametrize("kind", ["learned", "hawq", "higgs", "learned-block", "learned-gptq"])
def test_lowbit_allocate_writes_a_recipe_that_quantize_accepts(tiny_experiment, tmp_path, kind):
    import json

    from lowbit.alloc import load_recipe
    from lowbit.alloc.plan import uniform_bytes
    from lowbit.cli import main
    from lowbit.models.loaders import load_model

    root, _ = tiny_experiment
    out = str(tmp_path / f"{kind}.yaml")
    common = ["--calib", str(root / "corpus.txt"), "--nsamples", "4", "--seqlen", "32", "--batch-size", "2",
              "--no-progress"]
    block = {"learned-block": ["--block", "32"], "learned-gptq": ["--candidates", "gptq"]}.get(kind, [])
    kind = kind.split("-")[0]
    assert main(["allocate", "--model", str(root / "model"), "--kind", kind, "--bits", "2,4,8", "--group-size", "32",
                 "--budget-like", "4", "--steps", "3", "--out", out] + block + common) == 0
    recipe = load_recipe(out)
    params, _, _ = load_model(str(root / "model"))
    info = json.load(open(out[:-5] + ".json"))
    want = uniform_bytes(params, QuantSpec(bits=4, group_size=32, partial_groups=True))
    assert info["budget"] == want and recipe.nbytes(params) == info["nbytes"] <= want
    assert os.path.isfile(out[:-5] + ".png")
    assert os.path.isfile(out[:-5] + "-history.png") == (kind == "learned")
    assert main(["quantize", "--model", str(root / "model"), "--recipe", out, "--out", str(tmp_path / "q")]
                + common) == 0


def test_an_interrupted_allocation_resumes_bit_for_bit(tmp_path):
    params, cost, xs = _toy()
    cfg = learned.AllocCfg(steps=8, lr=0.1)
    whole = learned.allocate(params, cost, CANDS, xs, budget_bits=5.75, cfg=cfg, progress=False,
                             run_dir=str(tmp_path / "a"), save_every=2)
    with pytest.raises(KeyboardInterrupt):
        learned.allocate(params, cost, CANDS, xs, budget_bits=5.75, cfg=cfg, progress=False,
                         run_dir=str(tmp_path / "b"), save_every=2, stop_after=4)
    resumed = learned.allocate(params, cost, CANDS, xs, budget_bits=5.75, cfg=cfg, progress=False,
                               run_dir=str(tmp_path / "b"), save_every=2)
    for u in whole.theta:
        np.testing.assert_array_equal(whole.theta[u], resumed.theta[u])
    assert [h["cost"] for h in whole.history] == [h["cost"] for h in resumed.history]
    assert whole.choice == resumed.choice
    from lowbit.train.ckpt import ConfigMismatchError

    with pytest.raises(ConfigMismatchError, match="budget"):
        learned.allocate(params, cost, CANDS, xs, budget_bits=5.0, cfg=cfg, progress=False,
                         run_dir=str(tmp_path / "b"), save_every=2)


def test_column_blocks_give_the_sensitive_columns_more_bits_and_quantize_mixed():
    """Units = blocks of 128 input columns. The inputs of the first block are 10x larger: its
    columns carry the output error, so that block gets more bits than the second one; the recipe
    gives each linear a width per column group (GPTQ at those widths) and meets the budget exactly."""
    from lowbit.alloc.recipe import MixedSpec
    from lowbit.core.mixed import MixedWidthWeight
    from lowbit.core.transforms import flatten

    rng = np.random.default_rng(3)
    params = {"layers": [{k: jnp.asarray(rng.standard_normal((32, 256)), jnp.float32) for k in ("a_proj", "b_proj")}]}
    scale = jnp.concatenate([jnp.full((128,), 10.0), jnp.ones((128,))])
    xs = [jnp.asarray(rng.standard_normal((64, 256)), jnp.float32) * scale for _ in range(4)]
    ref = params["layers"][0]

    def cost(p, x):
        return sum(jnp.mean((x @ p["layers"][0][k].T - x @ ref[k].T) ** 2) for k in ("a_proj", "b_proj"))

    cands = problem.int_candidates(bits=(2, 3, 4, 8), group_size=32)
    res = learned.allocate(params, cost, cands, xs, budget_bits=4.0, block=128,
                           cfg=learned.AllocCfg(steps=60, lr=0.2), progress=False)
    for path in ("layers/0/a_proj", "layers/0/b_proj"):
        first, second = (cands[k].bits for k in res.choice[path])
        assert first > second, (path, res.choice)
        spec = res.recipe.weights[path]
        assert isinstance(spec, MixedSpec) and spec.widths == (first,) * 4 + (second,) * 4
    assert res.nbytes <= res.budget and res.recipe.nbytes(params) == res.nbytes
    q = res.recipe.transform()      # GPTQ at the recipe's widths
    flat = flatten(params)
    stats, _ = q.update(q.init(flat), {p: xs[0] for p in flat})
    out, _ = q.apply(flat, stats)
    assert all(isinstance(v, MixedWidthWeight) for v in out.values())
    assert sum(round(v.bits_per_param() * v.size / 8) for v in out.values()) == res.nbytes


def test_column_blocks_need_int_candidates_of_one_group_size():
    params, cost, xs = _toy()
    for cands, block in ((problem.int_candidates((2, 4), 16) + [None], 32), (problem.int_candidates((2, 4), 16), 24),
                         (problem.int_candidates((2,), 16) + problem.int_candidates((4,), 32), 32)):
        with pytest.raises(ValueError, match="column-block units need"):
            learned.allocate(params, cost, cands, xs, budget_bits=3.0, block=block, progress=False)
    with pytest.raises(ValueError, match="block=0"):
        learned.allocate(params, cost, CANDS, xs, budget_bits=3.0, block=0, progress=False)


def test_gptq_candidates_are_the_gptq_models_weights(tiny_experiment):
    """Candidate k of every unit is that unit of the model GPTQ-quantized at candidate k (16 bit:
    the weight itself); given to allocate they replace the round-to-nearest stacks."""
    from lowbit.alloc import Recipe
    from lowbit.alloc.plan import calibrated_candidates
    from lowbit.calib.driver import quantize_model
    from lowbit.core.quantizers import dequantize
    from lowbit.core.transforms import flatten
    from lowbit.models.loaders import load_model

    root, _ = tiny_experiment
    params, cfg, _ = load_model(str(root / "model"))
    units = problem.linear_units(params)
    rng = np.random.default_rng(0)
    windows = rng.integers(0, cfg.vocab_size, (4, 16)).astype(np.int32)
    cands = problem.int_candidates((2, 4), 32) + [None]
    cw = calibrated_candidates(params, cfg, windows, cands, units, progress=False)
    q4, _ = quantize_model(params, cfg, Recipe({u: cands[1] for u in units}).transform(), windows,
                           true_sequential=False, progress=False)
    u = units[3]
    np.testing.assert_array_equal(cw[u][1], np.asarray(dequantize(flatten(q4)[u])))
    np.testing.assert_array_equal(cw[u][2], np.asarray(flatten(params)[u], np.float32))
    qw, _ = problem.candidate_tables(params, units, cands, cw)
    np.testing.assert_array_equal(np.asarray(qw[u]), cw[u])
    with pytest.raises(ValueError, match=r"candidate weights\[.*expected a \(3, "):
        problem.candidate_tables(params, units, cands, {v: w[:2] for v, w in cw.items()})


def test_baseline_sensitivities_are_measured_once_per_run_dir(tiny_experiment, tmp_path, monkeypatch):
    """HAWQ traces / HIGGS alphas do not depend on the budget: with a run_dir a second allocation at
    another budget on the same windows reuses them (and gives the allocation it would have given)."""
    from lowbit.alloc import baselines
    from lowbit.alloc.plan import allocate_model
    from lowbit.models.loaders import load_model

    root, _ = tiny_experiment
    params, cfg, _ = load_model(str(root / "model"))
    windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 16)).astype(np.int32)
    cands = problem.int_candidates((2, 4, 8), 32)
    kw = dict(kind="higgs", candidates=cands, batch_size=2, progress=False, run_dir=str(tmp_path))
    r_a, _ = allocate_model(params, cfg, windows, budget_bits=4.5, **kw)
    fresh, _ = allocate_model(params, cfg, windows, budget_bits=6.0, **{**kw, "run_dir": None})
    calls = []
    monkeypatch.setattr(baselines, "noise_sensitivities", lambda *a, **k: calls.append(1) or np.ones(14))
    r_b, _ = allocate_model(params, cfg, windows, budget_bits=6.0, **kw)
    assert not calls and r_b == fresh and r_a != r_b
    allocate_model(params, cfg, windows[:2], budget_bits=6.0, **kw)   # other windows: measured again
    assert calls == [1]
    allocate_model(params, cfg, windows, budget_bits=6.0, samples=1, **kw)   # other draws: measured again
    assert calls == [1, 1]
    for bad in (dict(kind="learned", samples=2), dict(kind="higgs", samples=0)):
        with pytest.raises(ValueError, match="samples"):
            allocate_model(params, cfg, windows, budget_bits=6.0, **{**kw, **bad})


def test_fill_by_gradient_spends_unused_bytes_on_the_best_upgrades_per_byte():
    table = np.array([[10, 20, 40], [10, 20, 40], [10, 20, 40]])
    # d cost / d p: unit 0 gains 5 from its 20-byte upgrade, unit 1 gains 1, unit 2 gains 9 from 40 bytes
    grad = np.array([[0.0, -5.0, -6.0], [0.0, -1.0, -1.5], [0.0, -0.5, -9.0]])
    choice, n = learned.fill_by_gradient(np.zeros(3, np.int64), table, 30 + 10 + 30, grad)
    # 40 bytes free: unit 0's 10-byte upgrade (0.5 / byte) first, then unit 2's 30-byte one (0.3 / byte)
    assert list(choice) == [1, 0, 2] and n == 2
    assert table[np.arange(3), choice].sum() <= 70
    # no upgrade that would raise the cost, and none that does not fit
    choice, n = learned.fill_by_gradient(np.zeros(3, np.int64), table, 35, -grad)
    assert list(choice) == [0, 0, 0] and n == 0
    with pytest.raises(ValueError, match="grad"):
        learned.fill_by_gradient(np.zeros(3, np.int64), table, 35, grad[:2])


def test_the_unused_bytes_are_filled_and_lower_the_cost():
    """A budget the trained preferences leave partly unused: the fill upgrades units into it, the
    budget still holds and the filled allocation's true cost is lower than the unfilled one's."""
    params, cost, xs = _toy()
    units = problem.linear_units(params)
    lo, hi = problem.budget_range(problem.candidate_tables(params, units, CANDS)[1])
    kw = dict(budget_bytes=lo + (hi - lo) // 2, progress=False)
    plain = learned.allocate(params, cost, CANDS, xs, cfg=learned.AllocCfg(steps=30, lr=0.2, fill_batches=0), **kw)
    full = learned.allocate(params, cost, CANDS, xs, cfg=learned.AllocCfg(steps=30, lr=0.2), **kw)
    assert plain.filled == 0 and full.nbytes <= full.budget
    # the setup: the trained preferences alone leave room for an upgrade (a: 4 bits, b: 3 bits here)
    assert learned.fill_room(np.array([plain.choice[u] for u in units]), plain.bytes_table, plain.budget)
    assert full.filled >= 1 and full.nbytes > plain.nbytes

    def true_cost(res):
        from lowbit.core.quantizers import dequantize, quantize
        from lowbit.core.transforms import flatten, unflatten

        flat = flatten(params)
        q = {u: dequantize(quantize(flat[u], CANDS[res.choice[u]])) for u in units}
        return float(np.mean([float(cost(unflatten(params, {**flat, **q}), x)) for x in xs]))

    assert true_cost(full) < true_cost(plain)
