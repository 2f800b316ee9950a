"""LLM.int8() (lowbit.methods.llm_int8): the decomposition against a float64 NumPy reference of the
same algorithm (bitsandbytes' MatMul8bitLt), the weight type through ops.linear inside a jitted
model, checkpoints, bad input, and a `lowbit run` row end to end."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from lowbit import QuantSpec, ops
from lowbit.core.transforms import quantize_params
from lowbit.io import checkpoint
from lowbit.methods import build, llm_int8 as L
from lowbit.methods.llm_int8 import Int8Weight, LLMInt8Options, int8_matmul, quantize_rows, quantize_weight


# ----------------------------------------------------------------------------- float64 NumPy reference


def _ref_weight(W):
    """Row-wise absmax int8 (bitsandbytes int8_vectorwise_quant on the weight), in float64."""
    W = np.asarray(W, np.float64)
    absmax = np.abs(W).max(axis=1)
    codes = np.clip(np.round(W * (127.0 / absmax)[:, None]), -127, 127).astype(np.int64)
    return codes, absmax


def _ref_quant_rows(A, thr):
    """bitsandbytes int8_vectorwise_quant(A, thr) in float64: (codes, row absmax, outlier column indices)."""
    A = np.asarray(A, np.float64)
    big = np.abs(A) >= thr if thr > 0 else np.zeros(A.shape, bool)
    cols = np.flatnonzero(big.any(axis=0))
    kept = np.where(big, 0.0, A)
    sx = np.abs(kept).max(axis=1)
    codes = np.round(kept * (127.0 / sx)[:, None]).astype(np.int64)
    codes[:, cols] = 0
    return codes, sx, cols


def _ref_matmul(x, codes_w, absmax_w, thr):
    """int8_mixed_scaled_mm: int64 product of the codes, rescaled, plus the gathered outlier columns
    times the dequantized weight columns, all float64."""
    x = np.asarray(x, np.float64)
    A = x.reshape(-1, x.shape[-1])
    ca, sx, cols = _ref_quant_rows(A, thr)
    y = (ca @ np.asarray(codes_w, np.int64).T) * np.outer(sx, absmax_w) / 127.0**2
    if len(cols):
        wdq = np.asarray(codes_w, np.float64) * np.asarray(absmax_w, np.float64)[:, None] / 127.0
        y = y + A[:, cols] @ wdq[:, cols].T
    return y.reshape(*x.shape[:-1], -1)


def _inputs(seed=1, shape=(3, 7, 64)):
    """Activations ~ N(0, 1) with planted outliers: columns 5 (one token), 17 (two tokens, both signs)
    and 40 (exactly at the threshold 6.0)."""
    x = np.array(jax.random.normal(jax.random.key(seed), shape), np.float32)
    x[0, 2, 5] = 11.0
    x[1, 0, 17], x[2, 6, 17] = -8.5, 6.5
    x[2, 3, 40] = 6.0
    x[1, 4, 41] = np.nextafter(np.float32(6.0), np.float32(0))  # just below: not an outlier
    return jnp.asarray(x)


@pytest.fixture(scope="module")
def weight():
    W = jax.random.normal(jax.random.key(0), (48, 64)) * jnp.linspace(0.2, 3.0, 48)[:, None]
    return W, quantize_weight(W, 6.0)


# ----------------------------------------------------------------------------- the algorithm


def test_weight_is_rowwise_absmax_int8(weight):
    W, w = weight
    codes, absmax = _ref_weight(W)
    assert w.codes.dtype == jnp.int8 and w.absmax.dtype == jnp.float32 and w.shape == (48, 64)
    np.testing.assert_array_equal(np.asarray(w.codes, np.int64), codes)
    np.testing.assert_allclose(np.asarray(w.absmax), absmax, rtol=0)
    assert int(jnp.max(jnp.abs(w.codes.astype(jnp.int32)))) == 127
    err = np.abs(np.asarray(w.dequantize()) - np.asarray(W))
    assert np.all(err <= absmax[:, None] / 254 * (1 + 1e-5))  # half a step (absmax / 127) per row


def test_decomposition_matches_numpy_reference(weight):
    _, w = weight
    x = _inputs()
    y = int8_matmul(x, w)
    assert y.shape == (3, 7, 48) and y.dtype == x.dtype
    # the activation codes and statistics agree exactly (no rounding tie lands differently here)
    ca, sx, outlier = quantize_rows(x.reshape(-1, 64), 6.0)
    rca, rsx, rcols = _ref_quant_rows(x.reshape(-1, 64), 6.0)
    np.testing.assert_array_equal(np.asarray(ca, np.int64), rca)
    np.testing.assert_allclose(np.asarray(sx), rsx, rtol=0)
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(outlier)), rcols)
    ref = _ref_matmul(x, w.codes, w.absmax, 6.0)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # the decomposition is what makes it accurate: on the tokens holding an outlier, far closer to the
    # float product than all-int8 (whose per-token scale the outlier inflates)
    yf = np.asarray(x, np.float64) @ np.asarray(w.dequantize(), np.float64).T
    y0 = np.asarray(int8_matmul(x, L.with_threshold(w, 0.0)))
    tok = (np.abs(np.asarray(x)) >= 6.0).any(axis=-1)
    assert tok.sum() == 4
    assert np.linalg.norm((np.asarray(y) - yf)[tok]) < 0.25 * np.linalg.norm((y0 - yf)[tok])


def test_outlier_columns_are_those_with_any_entry_at_or_above_threshold():
    x = _inputs()
    for thr, want in ((6.0, [5, 17, 40]), (7.0, [5, 17]), (10.0, [5]), (12.0, [])):
        np.testing.assert_array_equal(np.flatnonzero(np.asarray(L.outlier_columns(x, thr))), want)
        np.testing.assert_array_equal(np.flatnonzero(np.asarray(quantize_rows(x.reshape(-1, 64), thr)[2])), want)
    assert not np.asarray(L.outlier_columns(x, 0.0)).any()
    # bitsandbytes: only the outlier *entries* leave a token's absmax; the rest of an outlier column counts
    a = np.zeros((2, 8), np.float32)
    a[0, 1], a[1, 1], a[1, 3] = 9.0, 2.0, 1.0     # column 1 is an outlier column via token 0 only
    codes, sx, outlier = quantize_rows(jnp.asarray(a), 6.0)
    np.testing.assert_array_equal(np.asarray(sx), [0.0, 2.0])
    np.testing.assert_array_equal(np.asarray(outlier), [False, True] + [False] * 6)
    np.testing.assert_array_equal(np.asarray(codes)[1], [0, 0, 0, 64, 0, 0, 0, 0])  # col 1 zeroed, 1 * 127/2 -> 64


def test_threshold_zero_is_the_pure_int8_path(weight):
    _, w = weight
    x = _inputs()
    w0 = L.with_threshold(w, 0.0)
    assert w0.threshold == 0.0 and w0.codes is w.codes
    y0 = int8_matmul(x, w0)
    a = x.reshape(-1, 64)
    ca, sx, outlier = quantize_rows(a, 0.0)
    assert not np.asarray(outlier).any() and float(sx.max()) == 11.0  # outliers stay in the absmax
    acc = np.asarray(ca, np.int64) @ np.asarray(w.codes, np.int64).T
    manual = acc * np.outer(np.asarray(sx, np.float64), np.asarray(w.absmax, np.float64)) / 127.0**2
    np.testing.assert_allclose(np.asarray(y0).reshape(-1, 48), manual, rtol=1e-5, atol=1e-6 * np.abs(manual).max())
    np.testing.assert_allclose(np.asarray(y0), _ref_matmul(x, w.codes, w.absmax, 0.0), rtol=1e-5,
                               atol=1e-5 * np.abs(manual).max())


def test_huge_threshold_has_no_outliers(weight):
    _, w = weight
    x = _inputs()
    assert not np.asarray(L.outlier_columns(x, 1e6)).any()
    np.testing.assert_array_equal(np.asarray(int8_matmul(x, L.with_threshold(w, 1e6))),
                                  np.asarray(int8_matmul(x, L.with_threshold(w, 0.0))))


def test_linear_dispatch_jit_and_int8_dot(weight):
    _, w = weight
    x = _inputs()
    bias = jnp.arange(48, dtype=jnp.float32)
    f = jax.jit(ops.linear)
    np.testing.assert_allclose(np.asarray(f(x, w, bias)), np.asarray(int8_matmul(x, w) + bias), rtol=1e-6, atol=1e-5)
    hlo = f.lower(x, w).as_text()
    assert any("xi8>" in ln and "-> tensor<21x48xi32>" in ln for ln in hlo.splitlines() if "dot_general" in ln), \
        "expected an int8 x int8 -> int32 dot_general"
    # bfloat16 activations: the result comes back in bfloat16
    yb = ops.linear(x.astype(jnp.bfloat16), w)
    assert yb.dtype == jnp.bfloat16
    # the threshold is static (aux data): another threshold is another compilation, not a stale one
    np.testing.assert_array_equal(np.asarray(f(x, L.with_threshold(w, 0.0))),
                                  np.asarray(int8_matmul(x, L.with_threshold(w, 0.0))))


# ----------------------------------------------------------------------------- in a model


@pytest.fixture(scope="module")
def tiny():
    from lowbit.calib.driver import default_recipe
    from lowbit.models import llama

    cfg = llama.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=2, max_position_embeddings=64)
    params = llama.init_params(jax.random.key(0), cfg)
    qparams, metrics = quantize_params(params, default_recipe(L.llm_int8(6.0)), return_metrics=True)
    return cfg, params, qparams, metrics


def test_jitted_llama_forward(tiny):
    from lowbit.models import llama

    cfg, params, qparams, metrics = tiny
    assert isinstance(qparams["layers"][1]["mlp"]["down_proj"], Int8Weight)
    assert not isinstance(qparams["lm_head"], Int8Weight)   # the default recipe leaves embed / lm_head dense
    assert np.isnan(metrics["layers/0/self_attn/q_proj"]["outlier_frac"])  # no calibration data: no report
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    ref = llama.forward_jit(params, tokens, cfg)
    out = llama.forward_jit(qparams, tokens, cfg)
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < 0.02, rel
    # a low threshold sends many features through the float path (same codes, another compilation): closer to fp
    out2 = llama.forward_jit(L.with_threshold(qparams, 2.0), tokens, cfg)
    assert float(jnp.linalg.norm(out2 - ref) / jnp.linalg.norm(ref)) < rel
    assert llama.param_count(qparams) == llama.param_count(params)


def test_checkpoint_round_trip(tiny, tmp_path):
    from lowbit.models.loaders import load_checkpoint, save_model

    cfg, _, qparams, _ = tiny
    tree = {"a": qparams["layers"][0]["self_attn"]["q_proj"], "nested": [{"b": L.with_threshold(
        qparams["layers"][1]["mlp"]["up_proj"], 0.0)}], "dense": jnp.ones(3)}
    back = checkpoint.restore(checkpoint.save(str(tmp_path / "ck"), tree))
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for b, t in ((back["a"], tree["a"]), (back["nested"][0]["b"], tree["nested"][0]["b"])):
        assert isinstance(b, Int8Weight) and b.threshold == t.threshold and b.codes.dtype == jnp.int8
        np.testing.assert_array_equal(np.asarray(b.codes), np.asarray(t.codes))
        np.testing.assert_array_equal(np.asarray(b.absmax), np.asarray(t.absmax))
    # a whole quantized model through save_model / load_checkpoint (the shape check sees Int8Weights as
    # matrices; a dtype cast leaves them as stored)
    save_model(str(tmp_path / "model"), qparams, cfg, None)
    params2, cfg2, _ = load_checkpoint(str(tmp_path / "model"), dtype="bfloat16")
    w2 = params2["layers"][0]["mlp"]["gate_proj"]
    assert isinstance(w2, Int8Weight) and w2.codes.dtype == jnp.int8 and w2.absmax.dtype == jnp.float32
    assert params2["layers"][0]["input_layernorm"].dtype == jnp.bfloat16


def test_transform_reports_outlier_fractions():
    t = L.llm_int8(6.0)
    params = {"a/q_proj": jnp.ones((4, 8)), "a/k_proj": 2 * jnp.ones((4, 8)), "b/down_proj": jnp.ones((3, 16))}
    state = t.init(params)
    x = np.zeros((2, 3, 8), np.float32)
    x[0, 0, 1], x[1, 2, 6] = 7.0, -6.0          # batch 1: columns 1 and 6 of 8
    x2 = np.zeros((2, 3, 8), np.float32)
    x2[1, 1, 1], x2[0, 0, 3] = 9.5, 5.9        # batch 2: column 1 only (5.9 < 6)
    for xb in (x, x2):
        xb = jnp.asarray(xb)
        state, handed = t.update(state, {"a/q_proj": xb, "a/k_proj": xb})   # q/k share their input
        assert handed["a/q_proj"] is xb
    new, metrics = t.apply(params, state)
    assert all(isinstance(v, Int8Weight) and v.threshold == 6.0 for v in new.values())
    m = metrics["a/k_proj"]
    assert float(m["outlier_frac"]) == 2 / 8 and float(m["outlier_frac_batch"]) == (2 / 8 + 1 / 8) / 2
    assert float(m["act_absmax"]) == 9.5
    assert np.isnan(float(metrics["b/down_proj"]["outlier_frac"]))   # never saw data
    # threshold 0: no decomposition, no outlier column
    t0 = L.llm_int8(0.0)
    s0, _ = t0.update(t0.init(params), {"a/q_proj": jnp.asarray(x)})
    assert float(t0.apply(params, s0)[1]["a/q_proj"]["outlier_frac"]) == 0.0


def test_bad_input():
    W = jnp.ones((4, 8))
    with pytest.raises(ValueError, match=r"threshold=-1\.0: expected a finite outlier threshold >= 0"):
        LLMInt8Options(threshold=-1.0)
    for bad in (-0.5, float("nan"), float("inf"), True, "6"):
        with pytest.raises(ValueError, match="threshold"):
            L.llm_int8(bad)
    with pytest.raises(ValueError, match="threshold"):
        quantize_weight(W, -1.0)
    with pytest.raises(ValueError, match=r"W: expected a 2-D \(out_features, in_features\) matrix, got shape \(2, 4, 8\)"):
        quantize_weight(jnp.ones((2, 4, 8)))
    t = L.llm_int8()
    with pytest.raises(ValueError, match=r"params\['layers/0/mlp/up_proj'\]: llm_int8 quantizes float 2-D"):
        t.init({"layers/0/mlp/up_proj": jnp.ones((2, 4, 8))})
    with pytest.raises(ValueError, match=r"params\['w'\]: W: expected a floating dtype"):
        t.apply({"w": jnp.ones((4, 8), jnp.int32)}, t.init({"w": jnp.ones((4, 8), jnp.int32)}))
    with pytest.raises(ValueError, match="expected bits: 8 and format: int, got bits: 4"):
        build("llm_int8", QuantSpec(bits=4), LLMInt8Options())
    with pytest.raises(ValueError, match="double_quant"):
        build("llm_int8", QuantSpec(bits=8, double_quant=True, group_size=None), LLMInt8Options())
    build("llm_int8", QuantSpec(bits=8), LLMInt8Options(0.0))   # group_size / symmetric: ignored (documented)
    w = quantize_weight(W)
    with pytest.raises(ValueError, match="x: last axis 5 does not match in_features 8"):
        ops.linear(jnp.ones((2, 5)), w)
    with pytest.raises(ValueError, match="codes must be a 2-D"):
        Int8Weight(w.codes.astype(jnp.float32), w.absmax)
    with pytest.raises(TypeError, match="no transpose"):
        w.T


# ----------------------------------------------------------------------------- `lowbit run`


def test_runner_row_end_to_end(tiny_experiment, tmp_path):
    from lowbit.runner.config import load_config
    from lowbit.pipeline import build_recipe
    from lowbit.runner.experiment import experiment_dir, run_experiment

    root, path = tiny_experiment
    conf = yaml.safe_load(path.read_text())
    # threshold 3 rather than 6: the tiny random model's activations are ~N(0, 1), so some columns of
    # its 256 calibration tokens reach 3 and the report has something to count
    conf["methods"] = [{"name": "fp", "method": "fp"},
                       {"name": "int8-t3", "method": "llm_int8", "quant": {"bits": 8}, "llm_int8": {"threshold": 3.0}}]
    bad = dict(conf, methods=[{"name": "x", "method": "llm_int8", "quant": {"bits": 8}, "llm_int8": {"threshold": -2}}])
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="threshold=-2"):
        load_config(str(tmp_path / "bad.yaml"))
    # the row, as written in a config (group_size etc. keep QuantCfg's defaults and are ignored)
    t6 = dict(conf, methods=[{"name": "int8-t6", "method": "llm_int8", "quant": {"bits": 8},
                              "llm_int8": {"threshold": 6.0}}])
    (tmp_path / "t6.yaml").write_text(yaml.safe_dump(t6))
    row = load_config(str(tmp_path / "t6.yaml")).methods[0]
    assert row.options == LLMInt8Options(6.0) and build_recipe(row) is not None
    p = tmp_path / "int8.yaml"
    p.write_text(yaml.safe_dump(conf))
    cfg = load_config(str(p))
    summary = run_experiment(cfg, results_dir=str(tmp_path / "res"), progress=False)
    d = experiment_dir(cfg, str(tmp_path / "res"))
    assert [r["name"] for r in summary["runs"]] == ["fp", "int8-t3"]
    ds = str(root / "corpus.txt")
    m = {n: json.load(open(os.path.join(d, n, "metrics.json"))) for n in ("fp", "int8-t3")}
    fp_ppl, ppl = m["fp"]["eval"][ds]["ppl"], m["int8-t3"]["eval"][ds]["ppl"]
    assert abs(ppl / fp_ppl - 1) < 0.01, (ppl, fp_ppl)
    size = m["int8-t3"]["size"]
    assert size["n_quantized"] == 14
    # 8 bits + one float32 absmax per row: 8 + 32/in (in = 64 or 128 here)
    assert 8 + 32 / 128 <= size["linear_bits_per_param"] <= 8 + 32 / 64
    rows = list(csv.DictReader(open(os.path.join(d, "int8-t3", "layers.csv"))))
    assert len(rows) == 14
    for r in rows:
        assert r["format"] == "llm_int8" and r["method"] == "llm_int8" and float(r["threshold"]) == 3.0
        in_features = json.loads(r["shape"])[1]
        assert float(r["bits_per_param"]) == pytest.approx(8 + 32 / in_features)
        assert 0.0 <= float(r["outlier_frac_batch"]) <= float(r["outlier_frac"]) <= 1.0
        assert 0 < float(r["rel_out_err"]) < 0.05
    frac = [float(r["outlier_frac"]) for r in rows]
    assert 0 < max(frac) < 1, frac
