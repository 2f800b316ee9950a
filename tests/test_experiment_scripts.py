"""The measurement scripts under experiments/ on a tiny model (their full runs write results/)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.models import llama

CFG = llama.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=64)


def _script(name):
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_activation_outliers_measures_the_position0_share():
    outliers = _script("activation_outliers")
    params = llama.init_params(jax.random.key(0), CFG)
    windows = np.asarray(jax.random.randint(jax.random.key(1), (3, 16), 0, CFG.vocab_size))
    rows = outliers.measure(params, CFG, windows)
    assert [r["layer"] for r in rows] == [0, 1]
    # layer 0's q_proj input is RMSNorm(embedding): recompute the statistics directly
    h = llama.rms_norm(llama.embed(params, jnp.asarray(windows), CFG), params["layers"][0]["input_layernorm"],
                       CFG.rms_norm_eps)
    sq = np.asarray(jnp.sum(jnp.square(h), -1))
    np.testing.assert_allclose(rows[0]["q pos0 share"], sq[:, 0].sum() / sq.sum(), rtol=1e-5)
    norms = np.sqrt(sq).reshape(-1)
    np.testing.assert_allclose(rows[0]["q max/median"], norms.max() / np.median(norms), rtol=1e-5)
    for r in rows:
        assert 0 < r["down pos0 share"] < 1 and r["down max/median"] >= 1 and 0 <= r["down argmax pos"] < 16


def test_dist_scale_estimate_arithmetic(tmp_path):
    ds = _script("dist_scale")
    m = ds.MODELS["llama-3-8b"]
    # four distinct linear inputs per block: q/k/v (4096), o (32 x 128), gate/up (4096), down (14336)
    assert ds.hessian_inputs(m) == [4096, 4096, 4096, 14336]
    r = ds.estimate("llama-3-8b", "8xh100-sxm", tokens=128 * 2048, passes=3.0, mfu=0.4, solve_eff=0.5)
    h_bytes = 4 * (3 * 4096**2 + 14336**2)
    assert abs(r["hessian_allreduce_mb"] - h_bytes / 2**20) < 1e-6
    assert abs(r["allreduce_ms"] - 1e3 * 2 * 7 / 8 * h_bytes / 450e9) < 1e-9
    # 7 solves over 8 devices: the slowest one, down_proj (4096 x 14336)
    assert abs(r["gptq_solves_ms"] - 1e3 * ds.solve_flops(4096, 14336) / (67e12 * 0.5)) < 1e-6
    assert abs(r["layer_s"] * 1e3 - (r["forward_ms"] + r["xtx_ms"] + r["allreduce_ms"] + r["gptq_solves_ms"])) < 1e-9
    assert ds.main(["--solve-efficiency", "0.3", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.json").is_file() and (tmp_path / "time.png").is_file()
