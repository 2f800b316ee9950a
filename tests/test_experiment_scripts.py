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
