"""lowbit.train.lora: LoRA adapters over dense and quantized bases, their training through
lowbit.train, the merge into dequantized float weights (and why not into the 4-bit base), dropout,
checkpoints and ``lowbit merge`` (issue 13, QLoRA). Tiny Llama models (hidden 64, 2 layers).

Runtime: about a minute on two busy CPU cores, most of it compiling the train step and the
forward passes of the few parameter structures involved.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit import ops
from lowbit.core.pack import unpack
from lowbit.core.qtensor import QuantizedTensor, QuantSpec
from lowbit.core.quantizers import dequantize, quantize
from lowbit.core.transforms import flatten, unflatten
from lowbit.eval.likelihood import perplexity
from lowbit.io import checkpoint
from lowbit.models import llama
from lowbit.ops import kernel_format
from lowbit.train import (LoraWeight, TrainCfg, add_lora, causal_lm_loss, count_trainable, load_lora_model, lora_loss,
                          lora_paths, merge_lora, partition_params, qlora_dropout, qlora_optim, save_lora_model,
                          strip_lora, train, trainable_regex, with_dropout)
from lowbit.train.lora import DEFAULT_TARGETS, _flat, _map_nodes, linear_paths
from lowbit.train.step import flat_paths

CFG = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=64)
NF4 = QuantSpec(format="nf4", bits=4, group_size=64, symmetric=True)
INT4 = QuantSpec(bits=4, group_size=32)
LINEARS = [f"layers/{i}/{p}" for i in range(2) for p in ("mlp/down_proj", "mlp/gate_proj", "mlp/up_proj",
                                                          "self_attn/k_proj", "self_attn/o_proj", "self_attn/q_proj",
                                                          "self_attn/v_proj")]


@functools.lru_cache(maxsize=1)
def _dense():
    return llama.init_params(jax.random.key(0), CFG)


@functools.lru_cache(maxsize=4)
def _quantized(spec: QuantSpec = NF4):
    p = _dense()
    return unflatten(p, {k: quantize(v, spec) if k.endswith("_proj") else v for k, v in flatten(p).items()})


def _base(kind: str):
    return {"dense": _dense, "nf4": lambda: _quantized(NF4), "int4": lambda: _quantized(INT4)}[kind]()


def _tokens():
    """A repeated 97-token pattern (easy to learn) and 8 windows of it for deterministic losses."""
    stream = np.tile(np.random.default_rng(0).integers(0, CFG.vocab_size, size=97), 12).astype(np.int32)
    return stream, jnp.asarray(stream[:128].reshape(8, 16))


def _nodes(params) -> dict:
    """``{path: LoraWeight}`` of the adapted linears."""
    return {p: v for p, v in _flat(params).items() if isinstance(v, LoraWeight)}


def _with_random_b(params, std: float = 0.05):
    """Every adapter's B drawn at random (a non-trivial adapter without training)."""
    def fill(path, v):
        if not isinstance(v, LoraWeight):
            return v
        return dataclasses.replace(v, b=std * jax.random.normal(jax.random.key(len(path) * 7 + v.b.shape[0]),
                                                                 v.b.shape))

    return _map_nodes(params, fill)


def _arrays_equal(x, y) -> bool:
    lx, ly = jax.tree.leaves(x), jax.tree.leaves(y)
    return (jax.tree.structure(x) == jax.tree.structure(y) and len(lx) == len(ly)
            and all(a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(lx, ly)))


def _ce(params, windows) -> float:
    return float(causal_lm_loss(CFG)(params, windows)[0])


# ----------------------------------------------------------------------------- the node and add_lora

@pytest.mark.parametrize("kind", ["dense", "nf4", "int4"])
def test_at_init_the_adapted_model_is_the_base(kind):
    base = _base(kind)
    lp = add_lora(base, rank=8, alpha=16.0, key=jax.random.key(1))
    assert lora_paths(lp) == LINEARS and linear_paths(base) == [*LINEARS, "lm_head"]
    _, windows = _tokens()
    np.testing.assert_array_equal(llama.forward_jit(lp, windows, CFG), llama.forward_jit(base, windows, CFG))
    for path, v in _nodes(lp).items():
        out, inp = v.shape
        assert v.a.shape == (8, inp) and v.b.shape == (out, 8) and v.scale == 2.0 and v.rank == 8
        assert v.a.dtype == v.b.dtype == jnp.float32 and not np.any(np.asarray(v.b))
        # PEFT's default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
        bound = 1 / np.sqrt(inp)
        a = np.asarray(v.a)
        assert np.abs(a).max() <= bound and abs(a.std() - bound / np.sqrt(3)) < 0.15 * bound / np.sqrt(3)
        assert (v.base is flatten(base)[path]) and v.dropout_key is None
        if kind != "dense":
            assert isinstance(v.base, QuantizedTensor)
        with pytest.raises(TypeError, match="transpose"):
            _ = v.T
    assert count_trainable(lp) == sum(8 * (v.shape[0] + v.shape[1]) for v in _nodes(lp).values())
    assert strip_lora(lp)["layers"][0]["mlp"]["up_proj"] is base["layers"][0]["mlp"]["up_proj"]


def test_targets_by_module_names_and_bad_input():
    base = _quantized(NF4)
    key = jax.random.key(0)
    lp = add_lora(base, rank=4, targets=["q_proj", "v_proj"], key=key)
    assert lora_paths(lp) == [p for p in LINEARS if p.endswith(("q_proj", "v_proj"))]
    assert lora_paths(add_lora(base, rank=4, targets=r"mlp/", key=key)) == [p for p in LINEARS if "/mlp/" in p]
    # an unknown module name: the error lists the linear paths
    with pytest.raises(ValueError, match=r"unknown target modules \['qkv_proj'\].*"
                                         r"layers/<i>/self_attn/q_proj \(i = 0\.\.1\)"):
        add_lora(base, targets=["q_proj", "qkv_proj"], key=key)
    with pytest.raises(ValueError, match=r"matches no linear.*layers/<i>/mlp/down_proj \(i = 0\.\.1\).*lm_head"):
        add_lora(base, targets=r"attention\.wq", key=key)
    with pytest.raises(ValueError, match="matches no linear"):
        add_lora(base, targets=r"embed_tokens", key=key)      # an embedding is not a linear
    # rank larger than a layer's min(in, out): the error names the layer
    with pytest.raises(ValueError, match=r"rank=65 exceeds min\(out, in\) = 64 of layer 'layers/0/mlp/down_proj'"):
        add_lora(base, rank=65, key=key)
    with pytest.raises(ValueError, match=r"rank=40 exceeds min\(out, in\) = 32 of layer 'layers/0/self_attn/k_proj'"):
        add_lora(base, rank=40, key=key)
    for kw, msg in [({"rank": 0}, "rank=0"), ({"rank": True}, "rank=True"), ({"alpha": 0.0}, "alpha=0.0"),
                    ({"alpha": float("nan")}, "alpha=nan"), ({"dropout": 1.0}, "dropout=1.0"),
                    ({"targets": "("}, "not a valid regular expression"), ({"key": None}, "key")]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            add_lora(base, **{"rank": 4, "key": key, **kw})
    with pytest.raises(ValueError, match="already have a LoRA adapter"):
        add_lora(lp, rank=4, targets=["q_proj"], key=key)
    with pytest.raises(ValueError, match="do not match rank"):
        LoraWeight(jnp.zeros((8, 4)), jnp.zeros((2, 4)), jnp.zeros((8, 3)), rank=2)


def test_qlora_defaults():
    opt = qlora_optim(1875)      # the Guanaco 7B run: 1875 steps, warmup_ratio 0.03 -> ceil(56.25)
    assert (opt.lr, opt.warmup_steps, opt.schedule, opt.clip_norm, opt.b1, opt.b2, opt.weight_decay) == \
        (2e-4, 57, "constant", 0.3, 0.9, 0.999, 0.0)
    sched = opt.schedule_fn(1875)
    assert float(sched(0)) == 0.0
    assert float(sched(57)) == pytest.approx(2e-4) and float(sched(1800)) == pytest.approx(2e-4)
    assert qlora_optim(10).warmup_steps == 1 and qlora_optim(8, lr=1e-4).lr == 1e-4
    assert qlora_dropout(7e9) == 0.1 and qlora_dropout(65e9) == 0.05
    lp = add_lora(_dense(), targets=["up_proj"], key=jax.random.key(0))     # r=64, alpha=16 by default
    v = _nodes(lp)["layers/0/mlp/up_proj"]
    assert v.rank == 64 and v.scale == 0.25 and v.dropout == 0.0
    assert re.fullmatch(DEFAULT_TARGETS, "layers/11/self_attn/o_proj") and not re.search(DEFAULT_TARGETS, "lm_head")


# ----------------------------------------------------------------------------- training (QLoRA)

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An NF4 base with rank-8 adapters (dropout 0.1) on every block linear, trained 8 steps by
    lowbit.train (bf16 compute, the QLoRA optimizer at lr 1e-3 so that 8 steps move the loss)."""
    start = add_lora(_quantized(NF4), rank=8, alpha=16.0, dropout=0.1, key=jax.random.key(1))
    stream, _ = _tokens()
    tc = TrainCfg(steps=8, batch_size=4, seqlen=16, optim=qlora_optim(8, lr=1e-3), trainable=trainable_regex(),
                  compute_dtype="bfloat16", save_every=0, log_every=1)
    loss = lora_loss(causal_lm_loss(CFG.replace(dtype="bfloat16")))
    res = train(start, CFG, tc, str(tmp_path_factory.mktemp("lora") / "run"), train_tokens=stream, loss_fn=loss,
                progress=False)
    return start, res


def test_training_moves_only_the_adapters(trained):
    start, res = trained
    _, windows = _tokens()
    before, after = _ce(start, windows), _ce(res.params, windows)
    assert after < before - 0.05, (before, after)
    assert all(np.isfinite(r["loss"]) for r in res.history) and len(res.history) == 8
    # only a / b are trainable; the packed base, embeddings, norms and lm_head are bit-identical
    part = partition_params(start, trainable_regex())
    assert set(part.trainable) == {f"{p}/{c}" for p in LINEARS for c in "ab"}
    assert _arrays_equal(strip_lora(res.params), strip_lora(start))
    assert all(isinstance(v.base, QuantizedTensor) for v in _nodes(res.params).values())
    moved = [p for p, v in _nodes(res.params).items() if not np.array_equal(v.b, _nodes(start)[p].b)]
    assert moved == LINEARS
    # gradients, masters and Adam moments exist for a / b only (nothing is ever computed for the base)
    import optax

    adam = [s for s in jax.tree.leaves(res.state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1 and sorted(flat_paths(adam[0].mu)) == sorted(part.trainable)
    assert sorted(flat_paths(res.state.params)) == sorted(part.trainable)
    assert res.state.params.keys() == {"layers"} and json_config(res)["loss"]["name"] == "lora"


def json_config(res) -> dict:
    import json

    with open(os.path.join(res.run_dir, "config.json")) as f:
        return json.load(f)["config"]


# ----------------------------------------------------------------------------- merge

@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_merged_float_model_equals_the_adapted_model(kind, trained):
    adapted = trained[1].params if kind == "nf4" else _with_random_b(add_lora(_dense(), rank=8, key=jax.random.key(2)))
    merged = merge_lora(adapted)
    assert lora_paths(merged) == []
    for p in LINEARS:
        w = flatten(merged)[p]
        assert isinstance(w, jax.Array) and w.dtype == jnp.float32 and w.shape == _nodes(adapted)[p].shape
    _, windows = _tokens()
    la, lm = llama.forward_jit(adapted, windows, CFG), llama.forward_jit(merged, windows, CFG)
    lb = llama.forward_jit(strip_lora(adapted), windows, CFG)
    assert float(jnp.abs(la - lb).max()) > 0.05                      # the adapter does something
    np.testing.assert_allclose(np.asarray(lm), np.asarray(la), rtol=1e-4, atol=1e-4)
    pa = perplexity(adapted, CFG, windows, batch_size=4, progress=False)["ppl"]
    pm = perplexity(merged, CFG, windows, batch_size=4, progress=False)["ppl"]
    assert abs(pm - pa) / pa < 1e-4, (pa, pm)
    # by hand: dequantized base + (alpha / r) * B @ A
    v = _nodes(adapted)["layers/1/mlp/down_proj"]
    base = v.base if kind == "dense" else dequantize(v.base)
    np.testing.assert_allclose(flatten(merged)["layers/1/mlp/down_proj"], base + v.scale * v.b @ v.a, rtol=1e-6,
                               atol=1e-6)


def test_merging_into_the_4bit_base_loses_the_finetune(trained):
    """The trap ``lowbit merge --help`` explains: re-quantizing the merged weights with the base's
    spec rounds (almost) every weight back onto the code it had; the fine-tune is gone."""
    adapted = trained[1].params
    merged = merge_lora(adapted)
    nodes = _nodes(adapted)
    requant = unflatten(merged, {p: quantize(w, NF4) if p in nodes else w for p, w in flatten(merged).items()})
    same = np.mean([np.mean(np.asarray(unpack(flatten(requant)[p].data, 4, v.shape[1])
                                       == unpack(v.base.data, 4, v.shape[1]))) for p, v in nodes.items()])
    delta = {p: flatten(merged)[p] - dequantize(v.base) for p, v in nodes.items()}
    kept = {p: dequantize(flatten(requant)[p]) - dequantize(v.base) for p, v in nodes.items()}
    share = np.mean([float(jnp.vdot(kept[p], delta[p]) / jnp.vdot(delta[p], delta[p])) for p in nodes])
    _, windows = _tokens()
    l_base, l_adapted = _ce(strip_lora(adapted), windows), _ce(adapted, windows)
    l_merged, l_requant = _ce(merged, windows), _ce(requant, windows)
    gain_kept = (l_base - l_requant) / (l_base - l_adapted)
    assert same > 0.95, same                  # the codes come back unchanged
    assert share < 0.2, share                 # the weight update is (mostly) erased
    assert abs(l_merged - l_adapted) < 1e-4   # the float merge keeps the fine-tune ...
    assert gain_kept < 0.25, (l_base, l_adapted, l_requant)   # ... the 4-bit "merge" does not


def test_merge_refuses_kernel_layout_bases():
    lp = kernel_format.prepare(add_lora(_quantized(INT4), rank=4, targets=["up_proj"], key=jax.random.key(0)))
    with pytest.raises(ValueError, match="layers/0/mlp/up_proj: cannot merge into a base of type KernelWeight"):
        merge_lora(lp)


# ----------------------------------------------------------------------------- dropout and dispatch

def test_dropout_in_training_only():
    w = jax.random.normal(jax.random.key(0), (24, 32)) / 6
    a = jax.random.normal(jax.random.key(1), (4, 32)) / 6
    b = jax.random.normal(jax.random.key(2), (24, 4))
    lw = LoraWeight(w, a, b, None, scale=0.5, rank=4, dropout=0.25)
    x = jax.random.normal(jax.random.key(3), (5, 32))
    exact = x @ w.T + 0.5 * (x @ a.T) @ b.T
    # no key (evaluation): deterministic, no dropout, also under jit
    np.testing.assert_allclose(ops.linear(x, lw), exact, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(jax.jit(ops.linear)(x, lw), jax.jit(ops.linear)(x, lw))
    # with a key: inverted dropout on the adapter's input only
    key = jax.random.key(7)
    y = jax.jit(ops.linear)(x, dataclasses.replace(lw, dropout_key=key))
    mask = jax.random.bernoulli(key, 0.75, x.shape)
    want = x @ w.T + 0.5 * ((jnp.where(mask, x / 0.75, 0.0)) @ a.T) @ b.T
    assert not np.allclose(y, exact, atol=1e-3)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    # unbiased: the mean over many keys is the deterministic output
    keys = jax.random.split(jax.random.key(9), 4000)
    mean = jax.vmap(lambda k: ops.linear(x, dataclasses.replace(lw, dropout_key=k)))(keys).mean(0)
    assert float(jnp.abs(mean - exact).max()) < 0.05 * float(jnp.abs(exact).max())
    # with_dropout: a key per node with rate > 0 (distinct), none for rate 0; None removes them
    tree = {"p": lw, "q": dataclasses.replace(lw, dropout=0.0), "r": lw, "n": jnp.ones(3)}
    keyed = with_dropout(tree, jax.random.key(5))
    assert keyed["q"].dropout_key is None and keyed["p"].dropout_key is not None
    assert not np.array_equal(jax.random.key_data(keyed["p"].dropout_key), jax.random.key_data(keyed["r"].dropout_key))
    assert all(v.dropout_key is None for k, v in with_dropout(keyed, None).items() if k != "n")


def test_lora_loss_applies_dropout_with_a_key():
    lp = _with_random_b(add_lora(_dense(), rank=4, dropout=0.5, key=jax.random.key(1)))
    _, windows = _tokens()
    inner = causal_lm_loss(CFG, False)
    loss = lora_loss(inner)
    assert loss is lora_loss(inner) and loss.config == {"name": "lora", "loss": inner.config}
    plain = float(inner(lp, windows)[0])
    assert float(loss(lp, windows, None)[0]) == plain                  # no key: no dropout
    k1, k2 = (float(loss(lp, windows, jax.random.key(i))[0]) for i in (1, 2))
    assert k1 != plain and k2 != k1 and float(loss(lp, windows, jax.random.key(1))[0]) == k1


def test_linear_kernel_mode_runs_the_base_kernel_plus_the_adapter():
    q = quantize(jax.random.normal(jax.random.key(0), (64, 128)) / 11, INT4)
    lw = _with_random_b({"w": add_lora({"w": q}, rank=4, targets=r"^w$", key=jax.random.key(1))["w"]})["w"]
    x = jax.random.normal(jax.random.key(2), (2, 3, 128)).astype(jnp.bfloat16)
    term = 4.0 * jnp.einsum("...r,or->...o", jnp.einsum("...i,ri->...r", x, lw.a.astype(x.dtype)),
                            lw.b.astype(x.dtype))
    bias = jnp.linspace(-1, 1, 64)
    with ops.kernel_mode("interpret"):
        fn, interpret = ops.select_kernel(x, kernel_format.to_kernel_layout(q))
        assert fn is not None and interpret
        y = jax.jit(ops.linear)(x, lw, bias)
        y_base = jax.jit(ops.linear)(x, q)
        y_kw = jax.jit(ops.linear)(x, kernel_format.prepare(lw))      # base converted once: KernelWeight
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 3, 64)
    want = np.asarray(y_base + term + bias.astype(jnp.bfloat16), np.float32)
    assert np.abs(np.asarray(y, np.float32) - want).max() < 0.02 * np.abs(want).max()
    assert isinstance(kernel_format.prepare(lw).base, kernel_format.KernelWeight)
    ref = np.asarray(x, np.float32) @ np.asarray(dequantize(q)).T + np.asarray(term, np.float32)
    assert np.abs(np.asarray(y_kw, np.float32) - ref).max() < 0.05 * np.abs(ref).max()
    with pytest.raises(ValueError, match="does not match in_features 128"):
        ops.linear(jnp.ones((2, 100)), lw)


# ----------------------------------------------------------------------------- checkpoints and CLI

@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_checkpoint_round_trip(kind, trained, tmp_path):
    lp = trained[1].params if kind == "nf4" else _with_random_b(add_lora(_dense(), rank=4, dropout=0.1,
                                                                          key=jax.random.key(4)))
    keyed = with_dropout(lp, jax.random.key(0))          # the per-step keys are not saved
    checkpoint.save(str(tmp_path / "raw"), keyed)
    back = checkpoint.restore(str(tmp_path / "raw"))
    assert _arrays_equal(back, lp) and jax.tree.structure(back) == jax.tree.structure(lp)
    assert all(dataclasses.replace(v, base=None, a=None, b=None) == dataclasses.replace(
        _nodes(lp)[p], base=None, a=None, b=None) for p, v in _nodes(back).items())
    save_lora_model(str(tmp_path / "model"), keyed, CFG, None, extra={"note": 1})
    params, cfg, tok = load_lora_model(str(tmp_path / "model"))
    assert cfg == CFG and tok is None and _arrays_equal(params, lp)
    assert checkpoint.read_extra(str(tmp_path / "model"))["note"] == 1
    half, _, _ = load_lora_model(str(tmp_path / "model"), dtype="bfloat16")
    v = _nodes(half)["layers/0/mlp/up_proj"]
    assert v.a.dtype == jnp.bfloat16 and (isinstance(v.base, QuantizedTensor) or v.base.dtype == jnp.bfloat16)
    with pytest.raises(ValueError, match="params do not match"):
        save_lora_model(str(tmp_path / "bad"), {"layers": []}, CFG, None)


@pytest.fixture(scope="module")
def lora_checkpoint(tiny_experiment, tmp_path_factory):
    """The tiny saved model with an NF4 base and random rank-4 adapters, saved: (root, path, params, cfg)."""
    from lowbit.models.loaders import load_checkpoint

    root, _ = tiny_experiment
    params, cfg, tok = load_checkpoint(str(root / "model"))
    q = unflatten(params, {k: quantize(v, NF4) if k.endswith("_proj") else v for k, v in flatten(params).items()})
    adapted = _with_random_b(add_lora(q, rank=4, key=jax.random.key(0)), std=0.2)
    src = str(tmp_path_factory.mktemp("lora_ckpt") / "lora")
    save_lora_model(src, adapted, cfg, tok)
    return root, src, adapted, cfg


def test_cli_merge(lora_checkpoint, tmp_path, capsys):
    from lowbit.cli import main
    from lowbit.models.loaders import load_checkpoint

    root, src, adapted, cfg = lora_checkpoint
    windows = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 32)))
    want = llama.forward_jit(adapted, windows, cfg)

    out = str(tmp_path / "merged")
    assert main(["merge", src, "--out", out]) == 0
    merged, mcfg, mtok = load_checkpoint(out)                          # a plain float checkpoint
    assert mcfg == cfg and mtok is not None
    assert not any(isinstance(v, QuantizedTensor) for v in flatten(merged).values())
    np.testing.assert_allclose(np.asarray(llama.forward_jit(merged, windows, cfg)), np.asarray(want),
                               rtol=1e-4, atol=1e-4)
    extra = checkpoint.read_extra(out)["merge"]
    assert extra["merged_paths"] == lora_paths(adapted) and extra["adapter_params"] == count_trainable(adapted)

    rq = str(tmp_path / "requant")
    assert main(["merge", src, "--out", rq, "--requantize", "rtn", "--bits", "4", "--group-size", "32"]) == 0
    rparams, _, _ = load_checkpoint(rq)
    assert all(isinstance(flatten(rparams)[p], QuantizedTensor) for p in lora_paths(adapted))
    assert not isinstance(rparams["lm_head"], QuantizedTensor)
    assert "merged 14 LoRA adapters" in capsys.readouterr().out

    # a method that collects statistics needs calibration data
    assert main(["merge", src, "--out", str(tmp_path / "g"), "--requantize", "gptq"]) == 2
    assert "--calib" in capsys.readouterr().err
    assert main(["merge", src, "--out", str(tmp_path / "b"), "--requantize", "rtn", "--bits", "9"]) == 2
    assert "bits=9" in capsys.readouterr().err and not os.path.exists(tmp_path / "b")
    assert main(["merge", str(root / "model"), "--out", str(tmp_path / "none")]) == 2
    assert "no LoRA adapters" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Why not merge into the 4-bit base" in text and "dequantized" in text and "erased" in text


@pytest.mark.slow
def test_cli_merge_requantize_with_calibration(lora_checkpoint, tmp_path):
    from lowbit.cli import main
    from lowbit.models.loaders import load_checkpoint

    root, src, _, _ = lora_checkpoint
    out = str(tmp_path / "gptq")
    assert main(["merge", src, "--out", out, "--requantize", "gptq", "--bits", "4", "--group-size", "32",
                 "--calib", str(root / "corpus.txt"), "--nsamples", "4", "--seqlen", "32", "--no-progress"]) == 0
    params, _, _ = load_checkpoint(out)
    assert isinstance(flatten(params)["layers/1/mlp/down_proj"], QuantizedTensor)
    assert os.path.isfile(os.path.join(out, "layers.csv"))
    assert checkpoint.read_extra(out)["merge"]["calib"]["nsamples"] == 4


def test_step_memory_holds_the_packed_base(trained, tmp_path):
    """The compiled train step's memory accounting (TrainResult.step_memory): the frozen NF4 base
    enters the step packed, so the step's inputs are smaller than over the float base by exactly
    the bytes the quantization saves (trainable masters, Adam moments and batch are the same)."""
    _, res = trained
    m = res.step_memory
    assert m["total"] == m["argument"] + m["output"] + m["temp"] - m["alias"] > 0 and m["temp"] > 0
    tc = TrainCfg(steps=1, batch_size=4, seqlen=16, optim=qlora_optim(1), trainable=trainable_regex(),
                  compute_dtype="bfloat16", save_every=0)
    dense = train(add_lora(_dense(), rank=8, alpha=16.0, dropout=0.1, key=jax.random.key(1)), CFG, tc,
                  str(tmp_path / "dense"), train_tokens=_tokens()[0],
                  loss_fn=lora_loss(causal_lm_loss(CFG.replace(dtype="bfloat16"))), progress=False)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    saved = sum(nbytes(_flat(_dense())[p]) - nbytes(_flat(_quantized(NF4))[p]) for p in LINEARS)
    assert saved > 0 and dense.step_memory["argument"] - m["argument"] == saved


def test_cli_eval_reads_adapter_checkpoints(lora_checkpoint, tmp_path):
    """``lowbit eval --model ADAPTER_CKPT`` evaluates the packed base plus adapters; its perplexity
    equals the merged float model's (``lowbit merge``) and differs from the bare base's."""
    import json

    from lowbit.cli import main

    root, src, adapted, cfg = lora_checkpoint
    merged = str(tmp_path / "merged")
    assert main(["merge", src, "--out", merged]) == 0
    ppl = {}
    for name, model in (("adapter", src), ("merged", merged)):
        out = tmp_path / f"{name}.json"
        assert main(["eval", "--model", model, "--data", str(root / "corpus.txt"), "--split", "all",
                     "--seqlen", "32", "--max-windows", "3", "--out", str(out), "--no-progress"]) == 0
        ppl[name] = json.loads(out.read_text())["ppl"]
    np.testing.assert_allclose(ppl["adapter"], ppl["merged"], rtol=1e-4)
    from lowbit.data.corpora import corpus_text  # the bare base differs: the adapters were used
    from lowbit.eval.likelihood import perplexity
    from lowbit.models.loaders import load_checkpoint

    _, _, tok = load_checkpoint(src)
    tokens = np.asarray(tok.encode(corpus_text(str(root / "corpus.txt"), "all")))
    bare = perplexity(strip_lora(adapted), cfg, tokens, seqlen=32, max_windows=3, progress=False)["ppl"]
    assert abs(bare - ppl["adapter"]) / bare > 1e-3, (bare, ppl)
