import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit import QuantizedTensor, QuantSpec, dequantize
from lowbit.core.transforms import Transform, calibrate, chain, flatten, identity, partition, quantize_params, rtn, unflatten


def _params():
    k = jax.random.split(jax.random.key(0), 4)
    return {
        "embed_tokens": jax.random.normal(k[0], (50, 64)),
        "layers": [{"input_layernorm": jnp.ones(64),
                    "self_attn": {"q_proj": jax.random.normal(k[1], (64, 64))},
                    "mlp": {"up_proj": jax.random.normal(k[2], (128, 64))}}],
        "lm_head": jax.random.normal(k[3], (50, 64)),
    }


def test_flatten_paths_and_round_trip():
    p = _params()
    flat = flatten(p)
    assert set(flat) == {"embed_tokens", "layers/0/input_layernorm", "layers/0/self_attn/q_proj",
                         "layers/0/mlp/up_proj", "lm_head"}
    back = unflatten(p, flat)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(p)
    with pytest.raises(ValueError, match="missing paths"):
        unflatten(p, {})


def test_partition_first_match_wins_and_unmatched_pass_through():
    recipe = partition([
        (r"embed|lm_head", identity()),
        (r"self_attn", rtn(QuantSpec(bits=4, group_size=32))),
        (r"proj", rtn(QuantSpec(bits=8, group_size=None))),
    ])
    q = quantize_params(_params(), recipe)
    assert q["layers"][0]["self_attn"]["q_proj"].bits == 4
    assert q["layers"][0]["mlp"]["up_proj"].bits == 8
    assert isinstance(q["embed_tokens"], jax.Array) and isinstance(q["layers"][0]["input_layernorm"], jax.Array)
    q2 = jax.tree_util.tree_map(lambda x: x, q, is_leaf=lambda x: isinstance(x, QuantizedTensor))
    assert isinstance(q2["lm_head"], jax.Array)


def test_rtn_rejects_vectors_with_the_path():
    with pytest.raises(ValueError, match="input_layernorm"):
        quantize_params(_params(), partition([(r"layers", rtn(QuantSpec(bits=4, group_size=32)))]))
    with pytest.raises(ValueError, match=r"params\['embed_tokens'\].*group_size=128 must divide"):
        quantize_params({"embed_tokens": jnp.ones((4, 64))}, rtn(QuantSpec(bits=4, group_size=128)))


def test_partition_rule_errors():
    with pytest.raises(ValueError, match="rules\\[0\\]"):
        partition([("(", identity())])
    with pytest.raises(ValueError, match="rules\\[1\\]"):
        partition([("a", identity()), ("b", "not a transform")])


def _counting() -> Transform:
    """A statistics transform: counts activation rows per path and scales the weight by it."""
    def init(params):
        return {p: jnp.zeros(()) for p in params}

    def update(stats, acts):
        return {p: s + (acts[p].reshape(-1, acts[p].shape[-1]).shape[0] if p in acts else 0) for p, s in stats.items()}

    def apply(params, stats):
        return {p: params[p] * 0 + stats[p] for p in params}

    return Transform(init, update, apply)


def test_calibration_statistics_flow_through_partition_and_chain():
    p = flatten(_params())
    acts = [{"layers/0/self_attn/q_proj": jnp.ones((2, 3, 64)), "layers/0/mlp/up_proj": jnp.ones((5, 64))}] * 2
    t = chain(partition([(r"self_attn", _counting())]), partition([(r"mlp", _counting())]))
    stats = calibrate(t, p, acts)
    out = t.apply(p, stats)
    assert float(out["layers/0/self_attn/q_proj"][0, 0]) == 12.0
    assert float(out["layers/0/mlp/up_proj"][0, 0]) == 10.0
    np.testing.assert_array_equal(np.asarray(out["lm_head"]), np.asarray(p["lm_head"]))


def test_chain_applies_in_order():
    t = chain(partition([(r"q_proj", rtn(QuantSpec(bits=4, group_size=32)))]), identity())
    out = quantize_params(_params(), t)
    w = _params()["layers"][0]["self_attn"]["q_proj"]
    assert float(jnp.max(jnp.abs(dequantize(out["layers"][0]["self_attn"]["q_proj"]) - w))) < 1.0
