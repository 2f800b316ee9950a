"""lowbit.train: the jitted step over a trainable subset, optimizer chain, losses, data order and
checkpoint/resume (issue 13, the library part). Tiny models (hidden 32, 2 layers), a few steps each.

The kill-and-resume test runs the killed half in a subprocess with
``LOWBIT_CRASH_AT=train.step-done:5`` (:mod:`lowbit.faults`) and resumes in-process (warm jit cache).
Runtime: about a minute on two busy CPU cores, most of it compiling the handful of train steps.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.core.qtensor import QuantizedTensor, QuantSpec
from lowbit.core.quantizers import quantize
from lowbit.models import llama
from lowbit.models.protocol import forward_layerwise
from lowbit.train import (ConfigMismatchError, NonFiniteLossError, OptimCfg, TokenWindows, TrainCfg,
                          build_optimizer, causal_lm_loss, corpus_tokens, distill_loss, forward_train, hidden_mse,
                          init_state, kd_kl, loss_and_grads, make_train_step, partition_params, read_metrics, train,
                          train_eval_tokens)
from lowbit.train.step import flat_paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=64)
#: the run shared by the loss / resume / corrupt / mismatch tests (one compiled step): 8 optimizer
#: steps of 2 micro-batches, checkpoints at 2, 4, 6, 8 (the newest 3 kept)
RUN_CFG = TrainCfg(steps=8, batch_size=2, seqlen=16, accum=2, optim=OptimCfg(lr=3e-2, warmup_steps=1),
                   save_every=2, keep=3, log_every=1)


@functools.lru_cache(maxsize=1)
def _model():
    return llama.init_params(jax.random.key(0), CFG)


def _setup():
    """(params, tokens): the tiny model (fresh containers, shared arrays) and a repeated 97-token
    pattern (easy to learn)."""
    base = np.random.default_rng(0).integers(0, CFG.vocab_size, size=97)
    return jax.tree.map(lambda x: x, _model()), np.tile(base, 12).astype(np.int32)


def _run(run_dir, eval_tokens=None):
    params, tokens = _setup()
    return train(params, CFG, RUN_CFG, run_dir, train_tokens=tokens, eval_tokens=eval_tokens, progress=False)


def _leaves_equal(a, b) -> bool:
    fa, fb = flat_paths(a), flat_paths(b)
    if fa.keys() != fb.keys():
        return False

    def raw(x):
        return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x

    la, lb = ([raw(x) for x in jax.tree.leaves(list(f.values()))] for f in (fa, fb))
    return len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
                                      for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The undisturbed run every resume test compares with (evaluated on other tokens)."""
    run_dir = tmp_path_factory.mktemp("train") / "straight"
    _, tokens = _setup()
    return run_dir, _run(str(run_dir), eval_tokens=tokens[::-1].copy())


# ----------------------------------------------------------------------------- training works

def test_loss_decreases_and_run_files(straight):
    run_dir, res = straight
    losses = [r["loss"] for r in res.history]
    assert len(losses) == 8 and np.mean(losses[-3:]) < losses[0] - 1.5, losses
    rows = read_metrics(str(run_dir / "metrics.csv"))
    assert [r["loss"] for r in rows] == losses                         # repr floats: exact round trip
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(3e-2)   # warmup, then cosine
    assert rows[-1]["lr"] < rows[1]["lr"] / 10
    assert rows[-1]["eval_loss"] is not None and rows[0]["eval_loss"] is None
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert (run_dir / "loss.png").stat().st_size > 1000 and (run_dir / "config.json").exists()
    assert sorted(os.listdir(run_dir / "checkpoints"), key=int) == ["4", "6", "8"]   # keep=3


def test_frozen_quantized_leaf_and_gradient_structure(tmp_path):
    params, tokens = _setup()
    params["layers"][0]["mlp"]["up_proj"] = quantize(params["layers"][0]["mlp"]["up_proj"],
                                                     QuantSpec(bits=4, group_size=32))
    part = partition_params(params, r"norm|lm_head")
    assert "layers/0/mlp/up_proj" in part.frozen and "lm_head" in part.trainable
    trainable, frozen = part.split(params)
    (loss, _), grads = jax.eval_shape(loss_and_grads(causal_lm_loss(CFG), part), trainable, frozen,
                                      jnp.asarray(tokens[:32].reshape(2, 16)), jax.random.key(0), None)
    assert set(flat_paths(grads)) == set(part.trainable) and loss.shape == ()
    with pytest.raises(ValueError, match="not float arrays"):
        partition_params(params, ["layers/0/mlp/up_proj"])

    cfg = TrainCfg(steps=3, batch_size=2, seqlen=16, trainable=r"norm|lm_head", optim=OptimCfg(lr=1e-2),
                   save_every=1)
    res = train(params, CFG, cfg, str(tmp_path / "run"), train_tokens=tokens, progress=False)
    before, after = flat_paths(params), flat_paths(res.params)
    for p in part.frozen:
        assert _leaves_equal(before[p], after[p]), p                    # bit-identical, QuantizedTensor too
    assert isinstance(after["layers/0/mlp/up_proj"], QuantizedTensor)
    assert all(not np.array_equal(before[p], after[p]) for p in part.trainable)
    assert {x.dtype.name for x in jax.tree.leaves(res.state)[:-1]} <= {"float32", "int32"}    # last leaf: rng
    params["layers"][0]["mlp"]["up_proj"] = quantize(_setup()[0]["layers"][0]["mlp"]["up_proj"],
                                                     QuantSpec(bits=3, group_size=32))
    with pytest.raises(ConfigMismatchError, match=r"frozen params layers/0/mlp/up_proj"):   # another base model
        train(params, CFG, cfg, str(tmp_path / "run"), train_tokens=tokens, progress=False)


def test_bf16_compute_keeps_float32_masters():
    params, tokens = _setup()
    part = partition_params(params, r"layers/1/mlp|lm_head")
    opt = build_optimizer(OptimCfg(lr=1e-3), 4, 1)
    batch = jnp.asarray(tokens[:32].reshape(2, 16))
    step = make_train_step(causal_lm_loss(CFG.replace(dtype="bfloat16"), remat=False), opt, part, "bfloat16")
    state, m = step(init_state(part, params, opt, jax.random.key(0)), part.split(params)[1], batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    floats = [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    f32 = float(causal_lm_loss(CFG, remat=False)(params, batch)[0])  # eager, float32 throughout
    assert float(m["loss"]) != f32 and float(m["loss"]) == pytest.approx(f32, abs=0.05)


def test_multisteps_accumulation_equals_big_batch():
    """k micro-batches accumulated == one step on the k-times batch. The big batch runs with remat
    and the micro-batches without, so this also checks that remat leaves the gradient unchanged."""
    params, tokens = _setup()
    part = partition_params(params, r"layers/1/mlp|norm|lm_head")
    k, batch = 3, jnp.asarray(tokens[:3 * 2 * 16].reshape(6, 16))
    # eps=1: the first Adam step is ~ lr * g / (|g| + 1), smooth in g, so float-level gradient
    # differences stay float-level in the parameters (with eps=1e-8 it would be ~ lr * sign(g))
    optim = OptimCfg(lr=0.1, eps=1.0, schedule="constant", clip_norm=0.5)
    frozen = part.split(params)[1]

    opt1 = build_optimizer(optim, 2, 1)
    big, m_big = make_train_step(causal_lm_loss(CFG, remat=True), opt1, part)(
        init_state(part, params, opt1, jax.random.key(0)), frozen, batch)
    optk = build_optimizer(optim, 2, k)
    step = make_train_step(causal_lm_loss(CFG, remat=False), optk, part)
    state = init_state(part, params, optk, jax.random.key(0))
    start = state.params
    for i in range(k):
        state, m = step(state, frozen, batch[2 * i:2 * i + 2])
        if i < k - 1:
            assert _leaves_equal(state.params, start)                   # nothing moves mid-accumulation
    assert float(m["grad_norm"]) == pytest.approx(float(m_big["grad_norm"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(big.params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- losses and forward

def test_kd_losses_values_and_gradient():
    key = jax.random.split(jax.random.key(1), 3)
    s = jax.random.normal(key[0], (2, 5, 11))
    t = jax.random.normal(key[1], (2, 5, 11)) * 2.0
    mask = jnp.array([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], jnp.float32)
    assert float(kd_kl(s, s, 2.0)) == 0.0 and float(kd_kl(s, t, 2.0, mask)) > 0
    T, n = 2.0, float(mask.sum())
    g = jax.grad(lambda z: kd_kl(z, t, T, mask))(s)
    want = T * (jax.nn.softmax(s / T) - jax.nn.softmax(t / T)) * mask[..., None] / n   # Hinton: T^2 * (1/T) * ...
    np.testing.assert_allclose(g, want, atol=1e-6)
    h = jax.random.normal(key[2], (2, 5, 8))
    assert float(hidden_mse(h, 3.0 * h)) == pytest.approx(0.0, abs=1e-6)     # scale-free
    assert float(hidden_mse(h, -h)) == pytest.approx(4.0)

    params, tokens = _setup()
    loss_fn = jax.jit(distill_loss(CFG, CFG, temperature=2.0, ce_weight=0.5, mse_weight=1.0, layers=(0, 1),
                                   remat=False))
    other = llama.init_params(jax.random.key(7), CFG)
    batch = jnp.asarray(tokens[:32].reshape(2, 16))
    same, aux = loss_fn(params, batch, None, params)                    # student == teacher
    assert float(aux["kl"]) == 0.0 and float(aux["mse"]) == pytest.approx(0.0, abs=1e-6)
    assert float(same) == pytest.approx(0.5 * float(aux["ce"]), abs=1e-6)
    loss, aux = loss_fn(other, batch, None, params)
    assert float(aux["kl"]) > 0.01 and float(aux["mse"]) > 0.01
    assert float(loss) == pytest.approx(float(aux["kl"] + 0.5 * aux["ce"] + aux["mse"]), rel=1e-6)


def test_remat_forward_equals_model_forward():
    """(The remat gradient is checked against the plain one in the MultiSteps test.)"""
    params, tokens = _setup()
    x = jnp.asarray(tokens[:32].reshape(2, 16))
    logits, hidden = jax.jit(forward_train, static_argnames=("cfg", "remat", "hidden_layers"))(
        params, x, cfg=CFG, remat=True, hidden_layers=(1,))
    jaxpr = str(jax.make_jaxpr(lambda p: forward_train(p, x, CFG, remat=True))(params))
    assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= CFG.num_layers
    np.testing.assert_allclose(logits, forward_layerwise(params, x, CFG), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, llama.forward(params, x, CFG), rtol=1e-5, atol=1e-5)
    from lowbit.models.protocol import hidden_layerwise
    np.testing.assert_allclose(hidden[0], hidden_layerwise(params, x, CFG), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- data

def test_data_order_deterministic_and_splits_disjoint(tmp_path, tiny_tokenizer):
    toks = np.arange(10 * 8, dtype=np.int32)                            # 10 windows of 8
    a, b, c = TokenWindows(toks, 8, 3, seed=1), TokenWindows(toks, 8, 3, seed=1), TokenWindows(toks, 8, 3, seed=2)
    assert all(np.array_equal(a.batch(s), b.batch(s)) for s in range(7))
    assert any(not np.array_equal(a.batch(s), c.batch(s)) for s in range(3))
    seen = np.concatenate([a.indices(s) for s in range(10)])            # 30 positions = 3 epochs
    for e in range(3):                                                  # each epoch: every window once
        assert sorted(seen[10 * e:10 * e + 10]) == list(range(10))
        assert list(seen[10 * e:10 * e + 10]) == list(np.random.default_rng(1 + e).permutation(10))

    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    lines = []
    for i in range(200):
        lines.append(" ".join(rng.choice(words, size=8)) + f" {i}.")
        if i % 5 == 4:
            lines.append("")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines))
    tr, ev = train_eval_tokens(str(corpus), tiny_tokenizer)
    assert np.array_equal(tr, corpus_tokens(str(corpus), "calib", tiny_tokenizer))
    trw, evw = TokenWindows(tr, 16, 2), TokenWindows(ev, 16, 2)
    assert trw.n_windows > 5 * evw.n_windows > 0
    assert not {w.tobytes() for w in trw.windows} & {w.tobytes() for w in evw.windows}
    with pytest.raises(ValueError, match="never 'all'"):
        train_eval_tokens(str(corpus), tiny_tokenizer, "all", "eval")
    params, _ = _setup()
    with pytest.raises(ValueError, match="1 of the 4 evaluation windows are also training windows"):
        train(params, CFG, TrainCfg(steps=1, batch_size=1, seqlen=16), str(tmp_path / "r"), train_tokens=np.arange(64),
              eval_tokens=np.concatenate([63 - np.arange(48), np.arange(16, 32)]), progress=False)  # one leaked


def test_train_cfg_validation_names_the_field():
    with pytest.raises(ValueError, match=r"lr=-0.1"):
        OptimCfg(lr=-0.1)
    with pytest.raises(ValueError, match=r"lr=nan"):
        TrainCfg(optim={"lr": float("nan")})
    with pytest.raises(ValueError, match=r"steps=0.*accum=0"):
        TrainCfg(steps=0, accum=0)
    with pytest.raises(ValueError, match=r"batch_size=0"):
        TrainCfg(batch_size=0)
    with pytest.raises(ValueError, match=r"warmup_steps=5 exceeds steps=3"):
        TrainCfg(steps=3, optim=OptimCfg(warmup_steps=5))
    with pytest.raises(ValueError, match=r"schedule='step'"):
        OptimCfg(schedule="step")


# ----------------------------------------------------------------------------- checkpoints and resume

_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_train import _run
_run({run_dir!r})
"""


def test_resume_after_kill_is_bit_identical(straight, tmp_path):
    ref_dir, ref = straight
    run_dir = str(tmp_path / "killed")
    env = {**os.environ, "JAX_PLATFORMS": jax.default_backend(), "LOWBIT_CRASH_AT": "train.step-done:5"}
    r = subprocess.run([sys.executable, "-c", _CHILD.format(tests=os.path.join(REPO, "tests"), run_dir=run_dir)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 137, r.stderr[-3000:]
    assert "killed at train.step-done" in r.stderr
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["2", "4"]   # step 5 ran, not saved
    assert [x["step"] for x in read_metrics(os.path.join(run_dir, "metrics.csv"))] == [1, 2, 3, 4, 5]

    res = _run(run_dir, eval_tokens=_setup()[1][::-1].copy())
    assert res.resumed_from == 4 and res.step == 8
    assert _leaves_equal(res.params, ref.params) and _leaves_equal(res.state, ref.state)
    for key in ("loss", "lr", "grad_norm", "eval_loss"):
        assert [x[key] for x in res.history] == [x[key] for x in ref.history], key
    assert [x["loss"] for x in read_metrics(os.path.join(run_dir, "metrics.csv"))] == [x["loss"] for x in ref.history]


def test_corrupt_latest_checkpoint_falls_back(straight, tmp_path):
    ref_dir, ref = straight
    run_dir = tmp_path / "corrupt"
    shutil.copytree(ref_dir, run_dir)
    assert sorted(os.listdir(run_dir / "checkpoints"), key=int) == ["4", "6", "8"]
    for root, _, files in os.walk(run_dir / "checkpoints" / "8" / "state"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"\x00garbage")
    with pytest.warns(RuntimeWarning,
                      match=r"(?s)step 8 .* corrupt.*falling back to the previous checkpoint \(step 6\)"):
        res = _run(str(run_dir))
    assert res.resumed_from == 6 and _leaves_equal(res.params, ref.params)
    assert os.listdir(run_dir / "checkpoints-corrupt") == ["step-8"]
    assert sorted(os.listdir(run_dir / "checkpoints"), key=int)[-1] == "8"


def test_mismatching_config_on_resume_names_fields(straight, tmp_path):
    ref_dir, _ = straight
    run_dir = tmp_path / "other"
    shutil.copytree(ref_dir, run_dir)
    params, tokens = _setup()
    other = RUN_CFG.replace(optim=OptimCfg(lr=2e-2, warmup_steps=1), trainable="norm", save_every=3)
    with pytest.raises(ConfigMismatchError, match=r"train\.optim\.lr: checkpoint 0\.03, now 0\.02.*train\.trainable"):
        train(params, CFG, other, str(run_dir), train_tokens=tokens, progress=False)
    params["layers"][0]["mlp"]["up_proj"] = quantize(params["layers"][0]["mlp"]["up_proj"],
                                                     QuantSpec(bits=4, group_size=32))
    with pytest.raises(ConfigMismatchError, match="trainable.layers/0/mlp/up_proj"):
        train(params, CFG, RUN_CFG, str(run_dir), train_tokens=tokens, progress=False)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    params, tokens = _setup()
    # one trainable leaf (a cheap compile); the loss turns NaN as soon as the final norm has moved
    # away from its initial value (consts), i.e. at step 2, deterministically
    base = causal_lm_loss(CFG)

    def nan_after_first_update(p, batch, rng=None, consts=None):
        loss, aux = base(p, batch, rng, None)
        return jnp.where(jnp.any(p["norm"] != consts), jnp.nan, loss), aux

    nan_after_first_update.config = {"name": "nan_after_first_update"}
    cfg = TrainCfg(steps=4, batch_size=2, seqlen=16, optim=OptimCfg(lr=1e-2, schedule="constant"), save_every=1,
                   trainable=r"^norm$")
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step 2 .*last good checkpoint is step 1 in"):
        train(params, CFG, cfg, str(tmp_path / "nan"), train_tokens=tokens, loss_fn=nan_after_first_update,
              consts=params["norm"], progress=False)
    assert os.listdir(tmp_path / "nan" / "checkpoints") == ["1"]
    assert [r["step"] for r in read_metrics(str(tmp_path / "nan" / "metrics.csv"))] == [1]


def test_checkpoint_checksums_catch_silently_wrong_arrays(tmp_path):
    """Arrays that read back fine but differ from what was saved (checksums in the metadata) count
    as corrupt too; with nothing older left the error says so."""
    import json

    from lowbit.train import TrainCheckpoints, TrainState

    state = TrainState({"w": jnp.arange(6.0).reshape(2, 3)}, (jnp.zeros(3), jnp.int32(4)), jax.random.key(3))
    with TrainCheckpoints(str(tmp_path / "ck"), keep=2) as ck:
        for step in (1, 2):
            ck.save(step, state, {"config": {"a": 1}})
        meta_path = tmp_path / "ck" / "2" / "meta" / "metadata"
        meta = json.loads(meta_path.read_text())
        meta["state_checksums"]["params/w"] = "float32[2, 3]:0badc0de"
        meta_path.write_text(json.dumps(meta))
        with pytest.warns(RuntimeWarning, match=r"(?s)step 2 .*checksums.*falling back .*step 1"):
            got = ck.restore(state, config={"a": 1})
        assert got.step == 1 and _leaves_equal(got.state, state)
        with pytest.raises(ConfigMismatchError, match=r"a: checkpoint 1, now 2"):
            ck.restore(state, config={"a": 2})
        shutil.rmtree(tmp_path / "ck" / "1" / "state")
        with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="no readable checkpoint left"):
            TrainCheckpoints(str(tmp_path / "ck")).restore(state, config={"a": 1})
