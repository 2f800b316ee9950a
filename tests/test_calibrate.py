import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit import QuantizedTensor, QuantSpec, dequantize
from lowbit.calib.driver import default_recipe, layer_inputs, quantize_model
from lowbit.methods.gptq import gptq
from lowbit.models import llama
from lowbit.core.transforms import flatten, partition, quantize_params
from lowbit.methods.rtn import rtn

CFG = llama.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def model():
    params = llama.init_params(jax.random.key(0), CFG)
    rng = np.random.default_rng(0)
    # Zipf-like tokens: a few frequent ids, like text, so activations are correlated
    tokens = np.minimum(rng.zipf(1.3, size=(12, 32)) - 1, CFG.vocab_size - 1).astype(np.int32)
    return params, tokens


def _logit_err(params, qparams, tokens):
    ref = llama.forward(params, tokens, CFG)
    out = llama.forward(qparams, tokens, CFG)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def test_gptq_model_beats_rtn_and_keeps_embeddings(model):
    params, tokens = model
    spec = QuantSpec(bits=3, group_size=32)
    qg, rows = quantize_model(params, CFG, default_recipe(gptq(spec)), tokens, batch_size=6, progress=False)
    qr, _ = quantize_model(params, CFG, default_recipe(rtn(spec)), tokens, batch_size=6, progress=False)
    assert _logit_err(params, qg, tokens) < _logit_err(params, qr, tokens)
    flat = flatten(qg)
    assert all(isinstance(flat[f"layers/{i}/{p}"], QuantizedTensor) for i in range(2) for p in llama.LINEARS)
    assert flat["embed_tokens"] is params["embed_tokens"]
    assert len(rows) == 2 * len(llama.LINEARS)
    assert all(np.isfinite(r["rel_out_err"]) and r["gptq_loss"] > 0 and r["damp"] >= 0.0099 and r["bits"] == 3 and r["seconds"] >= 0
               for r in rows)
    assert {r["path"] for r in rows} == {f"layers/{i}/{p}" for i in range(2) for p in llama.LINEARS}


def test_rtn_through_the_driver_equals_quantize_params(model):
    params, tokens = model
    spec = QuantSpec(bits=3, group_size=32)
    q1, _ = quantize_model(params, CFG, default_recipe(rtn(spec)), tokens, progress=False)
    q2 = quantize_params(params, default_recipe(rtn(spec)))
    for a, b in zip(jax.tree_util.tree_leaves(q1), jax.tree_util.tree_leaves(q2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_true_sequential_and_all_at_once_both_beat_rtn(model):
    params, tokens = model
    spec = QuantSpec(bits=3, group_size=32)
    rtn_err = _logit_err(params, quantize_params(params, default_recipe(rtn(spec))), tokens)
    for ts in (True, False):
        q, _ = quantize_model(params, CFG, default_recipe(gptq(spec)), tokens, true_sequential=ts, progress=False)
        assert _logit_err(params, q, tokens) < rtn_err


def test_resume_from_a_finished_layer_gives_the_same_model(model):
    params, tokens = model
    recipe = default_recipe(gptq(QuantSpec(bits=3, group_size=32)))
    saved = {}
    full, _ = quantize_model(params, CFG, recipe, tokens, progress=False,
                             on_layer=lambda i, p, rows: saved.setdefault(i, p))
    # "interrupted" after layer 0: restart from its params; inputs recomputed from the quantized layer 0
    resumed, rows = quantize_model(saved[0], CFG, recipe, tokens, start_layer=1, progress=False)
    assert {r["layer"] for r in rows} == {1}
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    X = layer_inputs(saved[0], CFG, tokens, upto=1)
    assert X.shape == (*tokens.shape, CFG.hidden_size)


def test_lm_head_can_be_calibrated_too(model):
    params, tokens = model
    cfg = CFG.replace(tie_word_embeddings=False)
    p = {**params, "lm_head": jax.random.normal(jax.random.key(3), (CFG.vocab_size, CFG.hidden_size))}
    q, rows = quantize_model(p, cfg, default_recipe(rtn(QuantSpec(bits=3, group_size=32))), tokens, progress=False)
    assert not isinstance(q["lm_head"], QuantizedTensor)
    recipe = partition([(r"^embed_tokens$", rtn(QuantSpec(bits=8, group_size=None))),
                        (r"_proj$|^lm_head$", gptq(QuantSpec(bits=3, group_size=32)))])
    q, rows = quantize_model(p, cfg, recipe, tokens, progress=False)
    assert isinstance(q["lm_head"], QuantizedTensor) and isinstance(q["embed_tokens"], QuantizedTensor)
    assert bool(jnp.all(jnp.isfinite(dequantize(q["lm_head"]))))
    assert {r["path"] for r in rows if r["layer"] == -1} == {"embed_tokens", "lm_head"}


def test_errors(model):
    params, tokens = model
    recipe = default_recipe(rtn(QuantSpec(bits=4, group_size=32)))
    with pytest.raises(ValueError, match="recipe"):
        quantize_model(params, CFG, "gptq", tokens)
    with pytest.raises(ValueError, match="tokens"):
        quantize_model(params, CFG, recipe, tokens[0])
    with pytest.raises(ValueError, match="context"):
        quantize_model(params, CFG, recipe, np.zeros((1, 65), np.int32))
    with pytest.raises(ValueError, match="start_layer"):
        quantize_model(params, CFG, recipe, tokens, start_layer=5)


def test_capture_upto_stops_early_with_the_same_inputs(model):
    params, tokens = model
    x = llama.embed(params, tokens[:2], CFG)
    layer = params["layers"][0]
    _, full = llama.block(layer, x, CFG, capture=True)
    for path in llama.LINEARS:
        out, part = llama.block(layer, x, CFG, capture=True, capture_upto=path)
        assert out is None and path in part
        assert set(part) <= set(full)
        for k, v in part.items():
            np.testing.assert_allclose(np.asarray(v), np.asarray(full[k]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="capture_upto"):
        llama.block(layer, x, CFG, capture_upto="mlp/down_proj")


def test_token_cap_and_skip_first_shape_the_statistics(model):
    from lowbit.calib.driver import _cap_rows

    x = jnp.ones((2, 8, 4)).at[0, 0].set(1000.0)
    capped = _cap_rows(x, jnp.float32(10.0))
    norms = jnp.linalg.norm(capped, axis=-1)
    assert float(norms.max()) == pytest.approx(10 * 2.0, rel=1e-5)       # 10 x the median norm (2)
    np.testing.assert_array_equal(np.asarray(capped[1]), np.asarray(x[1]))  # ordinary rows untouched
    params, tokens = model
    spec = QuantSpec(bits=3, group_size=32)
    stats_seen = []

    def spy(t):
        def update(stats, acts, context=None):
            stats_seen.append({k: v.shape for k, v in acts.items()})
            return t.update(stats, acts, context)
        return t._replace(update=update)

    q, _ = quantize_model(params, CFG, default_recipe(spy(gptq(spec))), tokens, batch_size=6, skip_first=2,
                          token_cap=10.0, progress=False)
    assert all(s[1] == tokens.shape[1] - 2 for d in stats_seen for s in d.values())
    with pytest.raises(ValueError, match="token_cap"):
        quantize_model(params, CFG, default_recipe(gptq(spec)), tokens, token_cap=0.0, progress=False)
    with pytest.raises(ValueError, match="skip_first"):
        quantize_model(params, CFG, default_recipe(gptq(spec)), tokens, skip_first=32, progress=False)


def test_driver_supplies_a_block_forward_to_transforms_that_require_it(model):
    """A transform declaring ``requires={"block_fn"}`` gets a Context in ``update``: the block's
    forward with weights overridden, the block inputs, and the producers of each linear."""
    from lowbit.core.transforms import Transform

    params, tokens = model
    seen = []

    def init(p):
        return {k: jnp.zeros(()) for k in p}

    def update(state, acts, context=None):
        assert context is not None and context.block_fn is not None
        path = next(iter(acts))
        i = int(path.split("/")[1])
        layer = params["layers"][i]
        x = context.block_input
        # no overrides: the block itself; zeroing a weight changes the output
        ref = llama.block(layer, x, CFG)
        np.testing.assert_allclose(np.asarray(context.block_fn({}, x)), np.asarray(ref), rtol=1e-5, atol=1e-5)
        zeroed = context.block_fn({f"layers/{i}/mlp/down_proj": jnp.zeros_like(layer["mlp"]["down_proj"])}, x)
        assert float(jnp.max(jnp.abs(zeroed - ref))) > 1e-3
        seen.append((path, dict(context.producers)))
        return {k: s + 1 for k, s in state.items()}, acts

    def apply(p, state):
        return dict(p), {k: {"batches": s} for k, s in state.items()}

    probe = Transform(init, update, apply, frozenset({"block_fn"}))
    _, rows = quantize_model(params, CFG, default_recipe(probe), tokens, batch_size=6, progress=False,
                             true_sequential=False)
    assert seen and all(r["batches"] == 2 for r in rows)
    producers = seen[0][1]
    assert producers["layers/0/self_attn/q_proj"] == "layers/0/input_layernorm"
    assert producers["layers/0/mlp/down_proj"] == "layers/0/mlp/up_proj"
