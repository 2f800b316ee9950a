"""OneBit (issue 14): SVID (scikit-learn's NMF as the reference runs it, and the SVD variant), the
layer with its output LayerNorm, the reference's straight-through gradient, packing, checkpoints,
the distillation loss, and ``lowbit run`` rows with ``distill: true`` on the tiny saved model."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from lowbit.core.quantizers import bits_per_param
from lowbit.io import checkpoint
from lowbit.methods import onebit as ob
from lowbit.ops import linear


def _w(shape=(48, 64), seed=0):
    rng = np.random.default_rng(seed)
    # rows of different scales, as real weight matrices have
    return (rng.standard_normal(shape) * np.exp(0.5 * rng.standard_normal((shape[0], 1)))).astype(np.float32)


# ----------------------------------------------------------------------------- SVID


def test_svid_nmf_equals_scikit_learn_nmf_as_the_reference_calls_it():
    sk = pytest.importorskip("sklearn.decomposition")
    w = _w()
    m = sk.NMF(n_components=1, init="random", random_state=0)
    a_ref = m.fit_transform(np.abs(w))[:, 0]
    b_ref = m.components_[0]
    a, b, it = ob.svid_nmf(w)
    assert it == m.n_iter_
    np.testing.assert_allclose(np.asarray(a), a_ref, rtol=1e-4, atol=1e-6 * a_ref.max())
    np.testing.assert_allclose(np.asarray(b), b_ref, rtol=1e-4, atol=1e-6 * b_ref.max())


@pytest.mark.parametrize("method", ["nmf", "svd"])
def test_svid_recovers_an_exactly_rank_one_magnitude(method):
    rng = np.random.default_rng(1)
    a0 = rng.uniform(0.1, 2.0, 40).astype(np.float32)
    b0 = rng.uniform(0.1, 2.0, 24).astype(np.float32)
    signs = np.where(rng.standard_normal((40, 24)) >= 0, 1.0, -1.0).astype(np.float32)
    w = signs * np.outer(a0, b0)
    a, b = ob.svid(w, method)
    np.testing.assert_allclose(np.outer(a, b), np.outer(a0, b0), rtol=1e-4)
    node = ob.init_weight(w, svid_method=method, norm=False)
    np.testing.assert_array_equal(np.sign(np.asarray(node.w)), signs)   # the sign matrix is kept exactly
    x = rng.standard_normal((5, 24)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(linear(jnp.asarray(x), node)), x @ w.T, rtol=1e-4, atol=1e-4)


def test_svid_nmf_and_svd_give_the_same_product_but_split_the_scale_differently():
    w = _w()
    a1, b1 = ob.svid(w, "nmf")
    a2, b2 = ob.svid(w, "svd")
    p1, p2 = np.outer(a1, b1), np.outer(a2, b2)
    assert np.abs(p1 - p2).max() < 1e-4 * p2.max()
    assert not np.allclose(np.asarray(a1), np.asarray(a2), rtol=1e-2)


@pytest.mark.parametrize("method", ["nmf", "svd"])
def test_zero_rows_and_columns_give_zero_vector_entries_not_nan(method):
    w = _w()
    w[3] = 0.0
    w[:, 5] = 0.0
    node = ob.init_weight(w, svid_method=method)
    assert np.all(np.isfinite(node.a)) and np.all(np.isfinite(node.b))
    # exactly 0 by NMF; 0 up to float rounding by the SVD
    assert abs(float(node.a[3])) <= 1e-6 * float(node.a.max()) and abs(float(node.b[5])) <= 1e-6 * float(node.b.max())
    y = linear(jnp.ones((2, 64)), node)
    assert np.all(np.isfinite(np.asarray(y)))
    zero = ob.init_weight(np.zeros((8, 8), np.float32), svid_method=method)
    assert not np.any(np.asarray(zero.a)) and not np.any(np.asarray(zero.b))
    assert np.all(np.isfinite(np.asarray(linear(jnp.ones((2, 8)), zero))))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="w"):
        ob.init_weight(np.ones((2, 3, 4), np.float32))
    bad = _w()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        ob.init_weight(bad)
    with pytest.raises(ValueError, match="svid='pca'"):
        ob.OneBitOptions(svid="pca")
    from lowbit.core.qtensor import QuantSpec
    from lowbit.methods import registry

    with pytest.raises(ValueError, match="format: onebit"):
        registry.build("onebit", QuantSpec(bits=2, group_size=None))
    t = ob.onebit()
    with pytest.raises(ValueError, match="2-D"):
        t.apply({"layers/0/mlp/up_proj": jnp.ones((4,))}, ())
    packed = ob.pack({"q_proj": ob.init_weight(_w())})["q_proj"]
    with pytest.raises(ValueError, match="already quantized"):
        t.apply({"layers/0/mlp/up_proj": packed}, ())


# ----------------------------------------------------------------------------- the layer


def test_layer_is_the_references_forward_with_its_parameter_free_layernorm():
    w = _w()
    node = ob.init_weight(w)
    x = np.random.default_rng(2).standard_normal((3, 7, 64)).astype(np.float32)
    s = np.where(np.asarray(node.w) >= 0, 1.0, -1.0)
    y = ((x * np.asarray(node.b)) @ s.T) * np.asarray(node.a)   # ((x * b) @ sign(W)^T) * a
    mu = y.mean(-1, keepdims=True)
    ln = (y - mu) / np.sqrt(((y - mu) ** 2).mean(-1, keepdims=True) + ob.NORM_EPS)
    np.testing.assert_allclose(np.asarray(linear(jnp.asarray(x), node)), ln, rtol=2e-5, atol=2e-5)
    # latent init: sign(W) * 0.01, as build_start_ckpt.py
    np.testing.assert_array_equal(np.asarray(node.w), np.sign(w) * np.float32(ob.LATENT_INIT))


def test_ste_gradient_is_the_references_formula():
    w = jnp.array([[0.5, -2.0, 0.0, 0.01, -0.3]], jnp.float32)
    g_out = jnp.arange(1.0, 6.0).reshape(1, 5)
    g = jax.grad(lambda v: jnp.sum(ob.sign_ste(v) * g_out))(w)
    want = np.asarray(g_out) * (1.001 - np.tanh(np.asarray(w)) ** 2)
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(ob.sign_ste(w)), [[1, -1, 1, 1, -1]])
    # through the layer: latent weights, a and b all receive gradients
    node = ob.init_weight(_w())
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 64)), jnp.float32)
    grads = jax.grad(lambda n: jnp.sum(linear(x, n) ** 3))(node)
    assert all(float(jnp.abs(getattr(grads, f)).max()) > 0 for f in ("w", "a", "b"))


def test_packed_forward_equals_the_training_forward_and_checkpoints_round_trip(tmp_path):
    node = ob.init_weight(_w())
    node = ob.OneBitWeight(node.w + 0.003 * jnp.asarray(_w(seed=4)), node.a * 1.3, node.b, True)  # "trained"
    params = {"layers": [{"mlp": {"up_proj": node}}]}
    packed = ob.pack(params)
    p = packed["layers"][0]["mlp"]["up_proj"]
    assert p.packed and p.w.format == "onebit" and p.w.scales.dtype == jnp.float16
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 9, 64)), jnp.float32)
    train_fwd = linear(x, ob.round_vectors(params)["layers"][0]["mlp"]["up_proj"])
    np.testing.assert_array_equal(np.asarray(linear(x, p)), np.asarray(train_fwd))
    # bits/param: 1 bit per weight + two float16 vectors (the paper's ~1.0 + overhead)
    assert bits_per_param(p.w) == pytest.approx(1 + 16 * (48 + 64) / (48 * 64))
    assert p.bits_per_param() == node.bits_per_param()
    # the packed checkpoint restores the same forward; the training form round-trips too
    checkpoint.save(str(tmp_path / "packed"), packed)
    back = checkpoint.restore(str(tmp_path / "packed"))["layers"][0]["mlp"]["up_proj"]
    np.testing.assert_array_equal(np.asarray(linear(x, back)), np.asarray(linear(x, p)))
    checkpoint.save(str(tmp_path / "latent"), params)
    back = checkpoint.restore(str(tmp_path / "latent"))["layers"][0]["mlp"]["up_proj"]
    assert not back.packed and back.norm
    np.testing.assert_array_equal(np.asarray(back.w), np.asarray(node.w))


def test_pack_refuses_diverged_vectors():
    node = ob.init_weight(_w())
    bad = ob.OneBitWeight(node.w, node.a.at[0].set(jnp.nan), node.b, True)
    with pytest.raises(ValueError, match="layers/0/q_proj.*not finite"):
        ob.pack({"layers": [{"q_proj": bad}]})
    big = ob.OneBitWeight(node.w, node.a.at[0].set(1e6), node.b, True)
    with pytest.raises(ValueError, match="float16"):
        ob.pack({"q_proj": big})


# ----------------------------------------------------------------------------- distillation


def _tiny_model():
    from lowbit.models import llama

    cfg = llama.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                            num_kv_heads=2, max_position_embeddings=64)
    return llama.init_params(jax.random.key(0), cfg), cfg


def test_kd_loss_weights_are_the_references():
    _, cfg = _tiny_model()
    fn = ob.onebit_kd_loss(cfg, cfg, seqlen=32, n_layers=3)
    assert fn.config["kl_weight"] == pytest.approx(0.01 * 32) and fn.config["temperature"] == 1.0
    assert fn.config["mse_weight"] == 2.0 and fn.config["layers"] == [0, 1] and fn.config["ce_weight"] == 0.0
    o = ob.onebit_optim()
    assert (o.b1, o.b2, o.weight_decay, o.clip_norm, o.schedule) == (0.9, 0.98, 0.01, 1.0, "cosine")


def test_kd_loss_value_is_the_references_formula():
    """0.01 * T * (mean per-token KL(teacher || student) over the T-1 predicted positions) + the sum
    over blocks 0..L-2 of the mean over tokens of ||h_s/|h_s| - h_t/|h_t|||^2, in numpy."""
    from lowbit.train.losses import forward_train

    teacher, cfg = _tiny_model()
    student = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), teacher)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 16)), jnp.int32)
    got = float(ob.onebit_kd_loss(cfg, cfg, 16, 3, remat=False)(student, tokens, None, teacher)[0])
    s_logits, s_h = forward_train(student, tokens, cfg, remat=False, hidden_layers=(0, 1, 2))
    t_logits, t_h = forward_train(teacher, tokens, cfg, remat=False, hidden_layers=(0, 1, 2))

    def logsm(z):
        z = np.asarray(z, np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lt, ls = logsm(t_logits)[:, :-1], logsm(s_logits)[:, :-1]
    kl = (np.exp(lt) * (lt - ls)).sum(-1).mean()

    def unit(h):
        h = np.asarray(h, np.float64)
        return h / np.sqrt((h * h).sum(-1, keepdims=True))

    mse = sum(((unit(s_h[i]) - unit(t_h[i])) ** 2).sum(-1).mean() for i in range(2))   # blocks 0..L-2
    assert got == pytest.approx(0.01 * 16 * kl + mse, rel=1e-4)


def test_distillation_lowers_the_kd_loss_on_a_tiny_model(tmp_path):
    from lowbit.calib.driver import default_recipe, quantize_model
    from lowbit.train import TrainCfg, train

    teacher, cfg = _tiny_model()
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 96, (8, 32)).astype(np.int32)
    student, _ = quantize_model(teacher, cfg, default_recipe(ob.onebit()), windows[:2], progress=False)
    assert sum(isinstance(v, ob.OneBitWeight) for v in jax.tree_util.tree_leaves(
        student, is_leaf=lambda x: isinstance(x, ob.OneBitWeight))) == 3 * 7
    loss_fn = ob.onebit_kd_loss(cfg, cfg, 32, 3, remat=False)
    tc = TrainCfg(steps=16, batch_size=4, seqlen=32, optim=ob.onebit_optim(lr=5e-3, warmup_steps=1),
                  trainable=ob.trainable_regex(), save_every=8, remat=False)
    res = train(student, cfg, tc, str(tmp_path / "run"), train_tokens=windows, loss_fn=loss_fn, consts=teacher,
                progress=False)
    before = float(loss_fn(student, jnp.asarray(windows), None, teacher)[0])
    after = float(loss_fn(res.params, jnp.asarray(windows), None, teacher)[0])
    assert after < 0.8 * before, (before, after, [r["loss"] for r in res.history])
    # only the OneBit leaves trained: norms and embeddings are the teacher's
    np.testing.assert_array_equal(np.asarray(res.params["embed_tokens"]), np.asarray(teacher["embed_tokens"]))
    up = res.params["layers"][0]["mlp"]["up_proj"]
    assert float(jnp.abs(up.a - student["layers"][0]["mlp"]["up_proj"].a).max()) > 0


# ----------------------------------------------------------------------------- lowbit run rows


@pytest.fixture(scope="module")
def onebit_cfg(tiny_experiment, tmp_path_factory):
    root, path = tiny_experiment
    conf = yaml.safe_load(path.read_text())
    conf["experiment"] = "ob"
    conf["eval"]["split"] = "eval"
    conf["distill"] = {"data": "self", "nsamples": 8, "steps": 6, "batch_size": 2, "seqlen": 32, "lr": 2e-3,
                       "warmup_steps": 1, "eval_every": 3, "eval_windows": 2, "save_every": 3, "save_model": True}
    ob1 = {"bits": 1, "format": "onebit", "group_size": None}
    conf["methods"] = [{"name": "fp", "method": "fp"},
                       {"name": "svid-nmf", "method": "onebit", "quant": ob1, "onebit": {"norm": False}},
                       {"name": "onebit-kd", "method": "onebit", "quant": ob1, "distill": True}]
    p = tmp_path_factory.mktemp("ob") / "ob.yaml"
    p.write_text(yaml.safe_dump(conf))
    return p


def test_distill_rows_train_pack_and_record_a_perplexity_curve(onebit_cfg, tmp_path):
    from lowbit.runner.config import load_config
    from lowbit.runner.experiment import experiment_dir, run_experiment

    cfg = load_config(str(onebit_cfg))
    run_experiment(cfg, results_dir=str(tmp_path), progress=False)
    d = experiment_dir(cfg, str(tmp_path))
    m = json.load(open(os.path.join(d, "onebit-kd", "metrics.json")))
    dist = m["distill"]
    assert dist["steps"] == 6 and dist["data"] == "self" and dist["data_record"]["source"] == "self"
    assert [s for s, _ in dist["ppl_curve"]] == [0, 3, 6] and all(math.isfinite(p) for _, p in dist["ppl_curve"])
    assert dist["trainable_params"] > 0 and dist["ppl_curve_teacher"] > 0
    # evaluated packed: 1 bit per weight + two float16 vectors per linear
    assert 1.0 < m["size"]["linear_bits_per_param"] < 1.6 and m["size"]["n_quantized"] == 14
    for f in ("train_loss.png", "train_metrics.csv"):
        assert os.path.isfile(os.path.join(d, "onebit-kd", f))
    assert os.path.isfile(os.path.join(d, "ppl_vs_steps.png"))
    assert "distill" not in json.load(open(os.path.join(d, "svid-nmf", "metrics.json")))
    # the packed distilled model is saved; loaded back it gives the row's perplexity exactly
    from lowbit import data
    from lowbit.eval.likelihood import perplexity
    from lowbit.models.loaders import load_model

    params, mcfg, tok = load_model(os.path.join(d, "onebit-kd", "model"))
    up = params["layers"][0]["mlp"]["up_proj"]
    assert isinstance(up, ob.OneBitWeight) and up.packed
    (ds, ev), = [(k, v) for k, v in m["eval"].items()]
    win = data.eval_windows(tok.encode(data.corpus_text(ds, "eval")), ev["seqlen"], cfg.eval.max_windows)
    assert perplexity(params, mcfg, win, batch_size=cfg.eval.batch_size, progress=False)["ppl"] == pytest.approx(
        ev["ppl"], rel=1e-6)
    assert not [f for f in os.listdir(d) if f.startswith(".train-")]
    # the report's training block lists the distilled row with its trained parameters
    from lowbit.runner import paper

    report = tmp_path / "paper" / "report.md"
    report.parent.mkdir()
    report.write_text("# r\n<!-- lowbit:training ob -->\n<!-- /lowbit -->\n")
    paper.render(str(report), results=str(tmp_path))
    text = report.read_text()
    assert f"| onebit-kd | onebit | {dist['trainable_params']:,} | 6 x 2 x 32 | 384 |" in text, text
    assert "OneBit distillation from the float model" in text and "self-generated" in text


def test_distill_config_errors_are_clear(onebit_cfg):
    from lowbit.runner.config import load_config

    with pytest.raises(ValueError, match="has no training stage of its own"):
        load_config(str(onebit_cfg), overrides=["methods.0.distill=true"])
    with pytest.raises(ValueError, match="distill.steps"):
        load_config(str(onebit_cfg), overrides=["distill.steps=0"])


def test_packed_weight_runs_the_onebit_kernel_in_interpret_mode():
    """``lowbit.ops.linear`` sends a packed OneBitWeight's codes through the OneBit Pallas kernel
    (interpret mode on CPU; Triton on a GPU) and applies the norm: the same outputs as the
    reference path up to bf16 rounding."""
    from lowbit.ops import kernel_mode, select_kernel
    from lowbit.ops.kernel_format import to_kernel_layout

    p = ob.pack({"q": ob.init_weight(_w((64, 512), seed=6))})["q"]
    x = jnp.asarray(np.random.default_rng(7).standard_normal((8, 512)), jnp.bfloat16)
    with kernel_mode("interpret"):
        fn, interpret = select_kernel(x, to_kernel_layout(p.w))
        assert fn is not None and fn.__name__ == "onebit_matmul" and interpret
        y_kernel = np.asarray(linear(x, p), np.float32)
    with kernel_mode("off"):
        y_ref = np.asarray(linear(x, p), np.float32)
    assert np.abs(y_kernel - y_ref).max() < 0.05 * np.abs(y_ref).max()   # unit-variance outputs, bf16


def test_lowbit_quantize_writes_a_packed_onebit_checkpoint_that_evaluates(tiny_experiment, tmp_path, capsys):
    """``lowbit quantize --method onebit``: the SVID start point, packed (1 bit + two float16
    vectors per linear), loadable and evaluable like any checkpoint; a checkpoint of another
    method is refused as OneBit input."""
    from lowbit.cli import main
    from lowbit.eval.likelihood import perplexity
    from lowbit.models.loaders import load_model

    root, _ = tiny_experiment
    ckpt = str(tmp_path / "ob")
    common = ["--calib", str(root / "corpus.txt"), "--nsamples", "2", "--seqlen", "16", "--no-progress"]
    assert main(["quantize", "--model", str(root / "model"), "--method", "onebit", "--bits", "1", "--format",
                 "onebit", "--group-size", "0", "--svid", "svd", "--out", ckpt] + common) == 0
    params, cfg, _ = load_model(ckpt)
    up = params["layers"][0]["mlp"]["up_proj"]
    assert isinstance(up, ob.OneBitWeight) and up.packed and up.norm
    r = perplexity(params, cfg, np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)), progress=False)
    assert math.isfinite(r["ppl"])
    # resuming OneBit from a checkpoint of another method is a clear error
    rtn = str(tmp_path / "rtn")
    assert main(["quantize", "--model", str(root / "model"), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--out", rtn] + common) == 0
    assert main(["quantize", "--model", rtn, "--method", "onebit", "--bits", "1", "--format", "onebit",
                 "--group-size", "0", "--out", str(tmp_path / "ob2")] + common) == 2
    assert "already quantized" in capsys.readouterr().err
