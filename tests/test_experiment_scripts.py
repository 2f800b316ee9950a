"""The measurement scripts under experiments/ on a tiny model (their full runs write results/)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_dist_scale_estimate_behaves_like_the_system_it_models(tmp_path, monkeypatch):
    ds = _script("dist_scale")
    m = ds.MODELS["llama-3-8b"]
    # Llama-3-8B's block (facts of the architecture, not of the script): four distinct linear inputs --
    # q/k/v read the 4096-wide normed input, o the 32 x 128 attention output, gate/up 4096, down 14336
    assert ds.hessian_inputs(m) == [4096, 4096, 4096, 14336]
    assert ds.linears(m) == {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096),
                             "o_proj": (4096, 4096), "gate_proj": (14336, 4096), "up_proj": (14336, 4096),
                             "down_proj": (4096, 14336)}
    kw = dict(passes=3.0, mfu=0.4, solve_eff=0.5)

    def est(system="8xh100-sxm", tokens=128 * 2048, **over):
        return ds.estimate("llama-3-8b", system, tokens=tokens, **{**kw, **over})

    base = est()
    # compute on the tokens scales with the tokens; the Hessians' all-reduce and the solves do not
    twice = est(tokens=2 * 128 * 2048)
    assert twice["forward_ms"] == pytest.approx(2 * base["forward_ms"]) and twice["xtx_ms"] == pytest.approx(
        2 * base["xtx_ms"])
    assert twice["allreduce_ms"] == base["allreduce_ms"] and twice["gptq_solves_ms"] == base["gptq_solves_ms"]
    assert est(solve_eff=0.25)["gptq_solves_ms"] == pytest.approx(2 * base["gptq_solves_ms"])
    # the solves are dealt over the devices: one device does all seven, eight devices the slowest one alone
    monkeypatch.setitem(ds.SYSTEMS, "1xh100", dict(ds.SYSTEMS["8xh100-sxm"], p=1))
    monkeypatch.setitem(ds.SYSTEMS, "4xh100", dict(ds.SYSTEMS["8xh100-sxm"], p=4))
    one, four = est("1xh100"), est("4xh100")
    assert one["allreduce_ms"] == 0.0   # nothing to reduce on one device
    assert one["gptq_solves_ms"] > four["gptq_solves_ms"] > base["gptq_solves_ms"]
    assert base["gptq_solves_ms"] == pytest.approx(1e3 * ds.solve_flops(4096, 14336) / (67e12 * 0.5))
    # the Hessians (float32) are what the all-reduce moves
    assert base["hessian_allreduce_mb"] == pytest.approx(4 * (3 * 4096**2 + 14336**2) / 2**20)
    assert base["layer_s"] * 1e3 == pytest.approx(base["forward_ms"] + base["xtx_ms"] + base["allreduce_ms"]
                                                  + base["gptq_solves_ms"])
    assert ds.main(["--solve-efficiency", "0.3", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.json").is_file() and (tmp_path / "time.png").is_file()
