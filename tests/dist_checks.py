"""Checks that need several JAX devices, run by tests/test_distributed.py in a fresh process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag must be set before jax starts, so
they cannot share the main pytest process). Each check compares the mesh run against the same
computation on one device; a failed assertion exits non-zero with its message.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/dist_checks.py hessian
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from lowbit import dist
from lowbit.models import llama

CFG = llama.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=64)


def _tokens(n, T=32, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, size=(n, T)).astype(np.int32)


def check_hessian():
    # 8 devices, 13 real windows padded to 16: devices hold 2, 2, ..., 2, 1, 0 real windows
    mesh = dist.make_mesh("data=8")
    x = np.random.default_rng(0).standard_normal((13, 24, 40)).astype(np.float32)
    xp, valid = dist.pad_windows(x, 8)
    assert xp.shape[0] == 16 and valid.sum() == 13
    H, n = dist.data_parallel_hessian(xp, valid, mesh)
    flat = x.reshape(-1, 40).astype(np.float64)
    ref = 2.0 * flat.T @ flat / flat.shape[0]
    assert float(n) == 13 * 24, float(n)
    np.testing.assert_allclose(np.asarray(H), ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
    # the driver's path: a batch split over data, the GPTQ statistic folds token rows, XLA all-reduces
    from lowbit.methods.gptq import HessianStat, hessian_update

    stat = HessianStat(jnp.zeros((40, 40)), jnp.float32(0))
    with dist.use_mesh(mesh):
        for b in range(0, 13, 8):   # a full batch of 8 (sharded) and a short one of 5 (replicated)
            stat = hessian_update(stat, dist.place_batch(jnp.asarray(x[b:b + 8])))
    assert float(stat.n) == 13 * 24
    np.testing.assert_allclose(np.asarray(stat.H), ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


def check_hessian_windows():
    # GPTQ's hessian="windows": every window's X^T X alone, summed pairwise in one order: the same bits
    # on one device, data=8 and a (4, 2) mesh (the batched sum differs in its last bits); and through
    # the driver, the tiny model's GPTQ codes and scales on data=8 are one device's, bit for bit
    from lowbit.core.qtensor import QuantizedTensor
    from lowbit.core.transforms import flatten
    from lowbit.methods.gptq_core import gram_windows

    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 128, 96)).astype(np.float32))
    one = np.asarray(gram_windows(x)[0])
    for spec in ("data=8", "data=4,model=2", "data=2,model=4"):
        with dist.use_mesh(dist.make_mesh(spec)):
            got = np.asarray(gram_windows(dist.place_batch(x))[0])
        assert np.array_equal(got, one), (spec, float(np.abs(got - one).max()))
    _, q1, _ = _gptq_model(None, hessian="windows")
    _, q8, _ = _gptq_model(dist.make_mesh("data=8"), hessian="windows")
    for path, a in flatten(q1).items():
        if isinstance(a, QuantizedTensor):
            b = flatten(q8)[path]
            assert np.array_equal(np.asarray(a.data), np.asarray(b.data)), path
            assert np.array_equal(np.asarray(a.scales), np.asarray(b.scales)), path


def _gptq_model(mesh, method="gptq", **kw):
    from lowbit import QuantSpec
    from lowbit.calib.driver import default_recipe, quantize_model
    from lowbit.methods.awq import awq
    from lowbit.methods.gptq import gptq

    params = llama.init_params(jax.random.key(0), CFG)
    recipe = default_recipe((gptq if method == "gptq" else awq)(QuantSpec(bits=3, group_size=32), **kw))
    with dist.use_mesh(mesh):
        p = dist.shard_params(params, mesh) if mesh is not None else params
        q, rows = quantize_model(p, CFG, recipe, _tokens(16), batch_size=8, progress=False)
    return params, q, rows


def check_gptq():
    from lowbit.core.qtensor import QuantizedTensor
    from lowbit.core.transforms import flatten

    _, q1, rows1 = _gptq_model(None)
    _, q8, rows8 = _gptq_model(dist.make_mesh("data=8"))
    f1, f8 = flatten(q1), flatten(q8)
    same = total = 0
    for path, a in f1.items():
        b = f8[path]
        if isinstance(a, QuantizedTensor):
            assert isinstance(b, QuantizedTensor), path
            da, db = np.asarray(a.data), np.asarray(b.data)
            same += int((da == db).sum())
            total += da.size
            np.testing.assert_allclose(np.asarray(b.scales), np.asarray(a.scales), rtol=1e-4, err_msg=path)
            # the solved weights came back replicated on every device of the mesh
            assert len(b.data.sharding.device_set) == 8, (path, b.data.sharding)
    assert total and same / total > 0.999, (same, total)
    e1 = np.array([r["rel_out_err"] for r in rows1])
    e8 = np.array([r["rel_out_err"] for r in rows8])
    np.testing.assert_allclose(e8, e1, rtol=1e-3)
    print(f"packed words identical: {same}/{total}")


def check_awq():
    # AWQ's scale and clip searches over a block's inputs split over data=8 (XLA reduces the losses
    # across devices): the same model as one device, to the float rounding of those sums
    from lowbit.eval.likelihood import perplexity

    _, q1, _ = _gptq_model(None, "awq")
    _, q8, _ = _gptq_model(dist.make_mesh("data=8"), "awq")
    windows = _tokens(8, seed=5)
    p1 = perplexity(q1, CFG, windows, seqlen=32, batch_size=8, progress=False)["ppl"]
    p8 = perplexity(jax.tree.map(np.asarray, q8), CFG, windows, seqlen=32, batch_size=8, progress=False)["ppl"]
    assert abs(p8 / p1 - 1) < 1e-3, (p1, p8)
    print(f"awq perplexity: one device {p1:.4f}, data=8 {p8:.4f}")


def check_perplexity():
    from lowbit.eval.likelihood import perplexity

    params = llama.init_params(jax.random.key(1), CFG)
    windows = _tokens(20, seed=2)   # 20 windows, batches of 8: the last one (4) replicated
    one = perplexity(params, CFG, windows, seqlen=32, batch_size=8, progress=False)
    mesh = dist.make_mesh("data=8")
    with dist.use_mesh(mesh):
        eight = perplexity(dist.shard_params(params, mesh), CFG, windows, seqlen=32, batch_size=8, progress=False)
    assert abs(eight["ppl"] / one["ppl"] - 1) < 1e-6, (one["ppl"], eight["ppl"])
    assert eight["n_tokens"] == one["n_tokens"] and eight["top1_acc"] == one["top1_acc"]


def check_train_step():
    from lowbit.train.losses import causal_lm_loss
    from lowbit.train.optim import OptimCfg, build_optimizer
    from lowbit.train.step import init_state, make_train_step, partition_params

    params = llama.init_params(jax.random.key(2), CFG)
    part = partition_params(params, r"norm|o_proj")
    opt = build_optimizer(OptimCfg(lr=1e-2), steps=4)
    step = make_train_step(causal_lm_loss(CFG), opt, part)
    batch = _tokens(16, seed=3)

    def run(mesh):
        state = init_state(part, params, opt, jax.random.key(0))
        frozen = part.split(params)[1]
        b = jnp.asarray(batch)
        if mesh is not None:
            state, frozen, b = dist.replicate(state, mesh), dist.replicate(frozen, mesh), dist.shard_windows(b, mesh)
        with dist.use_mesh(mesh):
            state, m = step(state, frozen, b)
            state, m2 = step(state, frozen, b)
        return state, m, m2

    s1, m1, n1 = run(None)
    s8, m8, n8 = run(dist.make_mesh("data=8"))
    assert abs(float(m8["loss"]) / float(m1["loss"]) - 1) < 1e-5, (m1["loss"], m8["loss"])
    assert abs(float(n8["loss"]) / float(n1["loss"]) - 1) < 1e-5, (n1["loss"], n8["loss"])
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def check_model_axis():
    # a Llama-shaped model with its linears split by output rows over 4 devices of a (2, 4) mesh:
    # each device holds a quarter of every linear, dense or quantized, and the logits match
    from lowbit import QuantSpec, quantize
    from lowbit.core.qtensor import QuantizedTensor
    from lowbit.core.transforms import flatten, unflatten
    from lowbit.eval.likelihood import perplexity

    cfg = llama.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=8,
                            num_kv_heads=4, max_position_embeddings=64)
    params = llama.init_params(jax.random.key(3), cfg)
    windows = np.random.default_rng(4).integers(0, 128, size=(8, 32)).astype(np.int32)
    mesh = dist.make_mesh("data=2,model=4")
    flat = flatten(params)
    spec = QuantSpec(bits=4, group_size=32)
    qparams = unflatten(params, {k: quantize(v, spec) if k.endswith("_proj") else v for k, v in flat.items()})
    for p in (params, qparams):
        one = perplexity(p, cfg, windows, seqlen=32, batch_size=4, progress=False)
        with dist.use_mesh(mesh):
            sp = dist.shard_params(p, mesh)
            for path, leaf in flatten(sp).items():
                if path.endswith("_proj"):
                    arr = leaf.data if isinstance(leaf, QuantizedTensor) else leaf
                    shard = arr.addressable_shards[0].data
                    assert shard.shape[0] * 4 == arr.shape[0], (path, shard.shape, arr.shape)
            sharded = perplexity(sp, cfg, windows, seqlen=32, batch_size=4, progress=False)
        assert abs(sharded["ppl"] / one["ppl"] - 1) < 1e-5, (one["ppl"], sharded["ppl"])


def check_mesh_errors():
    for spec, needle in (("data=16", "needs 16 devices, but 8 are available"), ("data=4,pipe=2", "unknown axes"),
                         ("data=0", "expected a positive int"), ("data:8", "expected AXIS=SIZE")):
        try:
            dist.make_mesh(spec)
        except ValueError as e:
            assert needle in str(e), (spec, str(e))
        else:
            raise AssertionError(f"mesh {spec!r} was accepted")
    mesh = dist.make_mesh("data=8")
    try:
        dist.shard_windows(np.zeros((12, 4)), mesh, "calibration windows")
    except ValueError as e:
        assert "12 windows do not split over mesh.data=8" in str(e), str(e)
    else:
        raise AssertionError("12 windows split over 8 devices")
    assert dist.make_mesh().shape == {"data": 8, "model": 1}


if __name__ == "__main__":
    names = sys.argv[1:] or [k[6:] for k in dict(globals()) if k.startswith("check_")]
    assert len(jax.devices()) == 8, f"expected 8 devices (XLA_FLAGS), got {jax.devices()}"
    for name in names:
        globals()[f"check_{name}"]()
        print(f"ok {name}")
