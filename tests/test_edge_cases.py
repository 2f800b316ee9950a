"""Library edge cases that used to give silent garbage or raw tracebacks must raise clear ValueErrors
(issue 11): scale overflow in the storage dtype, inconsistent QuantizedTensor metadata, bad
QuantSpec / GPTQOptions numbers, non-finite or overflowing perplexity, a GGUF whose block_count is
too small, and non-positive batch sizes."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.core.qtensor import QuantizedTensor, QuantSpec
from lowbit.core.quantizers import dequantize, quantize
from lowbit.core.transforms import quantize_params
from lowbit.methods.gptq import GPTQOptions, gptq, quantize_weight
from lowbit.methods.rtn import rtn


def _w(rows=8, cols=64, seed=0):
    return jax.random.normal(jax.random.key(seed), (rows, cols), jnp.float32)


def _hessian(cols=64, seed=1):
    x = jax.random.normal(jax.random.key(seed), (256, cols), jnp.float32)
    return 2.0 * x.T @ x / x.shape[0]


# ----------------------------------------------------------------------------- 1. scale overflow

_OVERFLOW_SPECS = [
    QuantSpec(bits=4, group_size=None),
    QuantSpec(bits=4, group_size=32, symmetric=True),
    QuantSpec(bits=4, group_size=32, format="nf4"),
    QuantSpec(bits=1, group_size=32, format="sign"),
    QuantSpec(bits=4, group_size=None, double_quant=True),
]


@pytest.mark.parametrize("spec", _OVERFLOW_SPECS, ids=lambda s: f"{s.format}-sym{s.symmetric}-dq{s.double_quant}")
def test_fp16_scale_overflow_raises_naming_max_and_dtype(spec):
    w = _w().at[0, :4].set(1e6)  # sign: the mean |w| of the group, 4e6 / 32, must overflow too
    with pytest.raises(ValueError, match=r"(?s)1e\+06.*float16.*scale_dtype=.float32."):
        quantize(w, spec)
    # the suggested fix works and is accurate
    q = quantize(w, spec.replace(scale_dtype="float32"))
    d = dequantize(q)
    assert bool(jnp.all(jnp.isfinite(d)))
    if spec.format != "sign":
        assert abs(float(d[0, 0]) - 1e6) < 0.1 * 1e6


def test_fp16_scale_overflow_raises_through_rtn_and_gptq():
    w = _w().at[3, 5].set(-2e6)
    spec = QuantSpec(bits=4, group_size=32)
    with pytest.raises(ValueError, match=r"(?s)params\['a/q_proj'\].*2e\+06.*float16.*float32"):
        quantize_params({"a": {"q_proj": w}}, rtn(spec))
    H = _hessian()
    with pytest.raises(ValueError, match=r"(?s)2e\+06.*float16.*scale_dtype=.float32."):
        quantize_weight(w, H, spec)
    with pytest.raises(ValueError, match=r"(?s)2e\+06.*float16"):
        quantize_weight(w, H, spec.replace(group_size=None))
    with pytest.raises(ValueError, match=r"(?s)2e\+06.*float16"):
        quantize_weight(w, H, spec, static_groups=True, act_order=True)
    res = quantize_weight(w, H, spec.replace(scale_dtype="float32"))
    assert bool(jnp.all(jnp.isfinite(dequantize(res.q))))
    # through the transform (apply prefixes the weight's path)
    t = gptq(spec)
    params = {"q_proj": w}
    stats = t.init(params)
    stats, _ = t.update(stats, {"q_proj": jax.random.normal(jax.random.key(2), (64, 64))})
    with pytest.raises(ValueError, match=r"(?s)params\['q_proj'\].*float16"):
        t.apply(params, stats)


def test_normal_weights_and_traced_quantize_are_unaffected():
    w = _w()
    q = quantize(w, QuantSpec(bits=4, group_size=32))
    assert float(jnp.max(jnp.abs(dequantize(q) - w))) < 0.5
    # under jit the check cannot run (no host values) and must not break tracing
    d = jax.jit(lambda x: dequantize(quantize(x, QuantSpec(bits=4, group_size=32))))(w)
    np.testing.assert_allclose(np.asarray(d), np.asarray(dequantize(q)))


# ----------------------------------------------------------------------------- 2. QuantizedTensor metadata

def _qt(**spec_kw):
    spec = QuantSpec(**{"bits": 4, "group_size": 32, **spec_kw})
    return quantize(_w(), spec)


@pytest.mark.parametrize("change, match", [
    (dict(shape=(8, 128)), r"data.*\(8, 8\).*expected.*\(8, 16\)"),
    (dict(shape=(16, 64)), r"data.*\(8, 8\).*expected.*\(16, 8\)"),
    (dict(shape=(8, 64, 1)), r"shape=\(8, 64, 1\)"),
    (dict(shape=(8, 0)), r"shape=\(8, 0\)"),
    (dict(bits=3), r"data.*\(8, 8\).*expected.*\(8, 6\).*bits=3"),
    (dict(bits=0), r"bits=0: expected an int in 1\.\.8"),
    (dict(bits=True), r"bits=True"),
    (dict(format="int3"), r"format='int3'"),
    (dict(group_size=0), r"group_size=0: expected a positive int"),
    (dict(group_size=16), r"scales.*\(8, 2\).*expected \(8, 4\)"),
    (dict(format="nf4"), r"levels"),
])
def test_inconsistent_metadata_is_rejected(change, match):
    q = _qt()
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(q, **change)


def test_inconsistent_leaves_are_rejected():
    q = _qt()
    with pytest.raises(ValueError, match=r"perm: shape \(63,\).*expected \(64,\)"):
        dataclasses.replace(q, perm=jnp.arange(63, dtype=jnp.int32))
    with pytest.raises(ValueError, match=r"perm: dtype float32.*integer"):
        dataclasses.replace(q, perm=jnp.arange(64, dtype=jnp.float32))
    with pytest.raises(ValueError, match=r"scales: shape \(2, 8\).*expected \(8, 2\)"):
        dataclasses.replace(q, scales=q.scales.T)
    with pytest.raises(ValueError, match=r"zeros: shape \(8, 2\).*expected \(8, 1\)"):
        dataclasses.replace(q, zeros=jnp.zeros((8, 2), jnp.uint32))
    with pytest.raises(ValueError, match=r"data: dtype int32.*uint32"):
        dataclasses.replace(q, data=q.data.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"data: dtype bfloat16.*uint32"):  # a blanket dtype cast
        jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), q)
    with pytest.raises(ValueError, match=r"col_scale: shape \(8,\).*expected \(64,\)"):
        dataclasses.replace(q, col_scale=jnp.ones((8,)))
    with pytest.raises(ValueError, match=r"zeros"):
        dataclasses.replace(_qt(format="nf4"), zeros=q.zeros)
    sym = _qt(symmetric=True)
    assert sym.zeros is None
    with pytest.raises(ValueError, match=r"scales: shape \(1, 2\).*expected \(8, 2\)"):
        dataclasses.replace(sym, scales=sym.scales[:1])


def test_legitimate_transformations_still_build_quantized_tensors():
    spec = QuantSpec(bits=4, group_size=32)
    q = quantize(_w(), spec)
    leaves, tdef = jax.tree_util.tree_flatten(q)
    # placeholders inside jax machinery
    assert isinstance(jax.tree_util.tree_unflatten(tdef, [None] * len(leaves)), QuantizedTensor)
    assert isinstance(jax.tree_util.tree_unflatten(tdef, [object()] * len(leaves)), QuantizedTensor)
    abstract = jax.eval_shape(lambda w: quantize(w, spec), _w())
    assert abstract.data.shape == q.data.shape
    # jit, vmap (a batch axis in front of every leaf), stacking, vmap axis specs
    qj = jax.jit(lambda w: quantize(w, spec))(_w())
    np.testing.assert_array_equal(np.asarray(qj.data), np.asarray(q.data))
    stack = jnp.stack([_w(seed=0), _w(seed=1)])
    qv = jax.vmap(lambda w: quantize(w, spec))(stack)
    assert qv.data.shape == (2, *q.data.shape)
    d = jax.vmap(dequantize)(qv)
    np.testing.assert_allclose(np.asarray(d[0]), np.asarray(dequantize(q)))
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), q, q)
    axes = jax.tree_util.tree_map(lambda _: 0, stacked)
    assert jax.vmap(dequantize, in_axes=(axes,))(stacked).shape == (2, 8, 64)
    # double quantization (nested QuantizedTensor scales) and act-order GPTQ (perm)
    dq = quantize(_w(), spec.replace(double_quant=True, group_size=None))
    assert dequantize(dq).shape == (8, 64)
    g = quantize_weight(_w(), _hessian(), spec, act_order=True).q
    assert g.perm.shape == (64,) and dequantize(g).shape == (8, 64)
    # partial last group and onebit
    p = quantize(_w(cols=72), spec.replace(partial_groups=True))
    assert p.scales.shape == (8, 3) and dequantize(p).shape == (8, 72)
    ob = quantize(_w(), QuantSpec(bits=1, format="onebit", group_size=None))
    assert dequantize(ob).shape == (8, 64)


# ----------------------------------------------------------------------------- 3. QuantSpec numbers

@pytest.mark.parametrize("bad, match", [
    (dict(group_size=0), r"^group_size=0: expected a positive int or None \(per output channel\)$"),
    (dict(group_size=-32), r"group_size=-32: expected a positive int"),
    (dict(group_size=True), r"group_size=True: expected a positive int"),
    (dict(group_size=32.0), r"group_size=32\.0: expected a positive int"),
    (dict(bits=True), r"bits=True: expected an int in 1\.\.8"),
    (dict(dq_bits=True, double_quant=True), r"dq_bits=True"),
    (dict(dq_bits=1), r"dq_bits=1: expected an int in 2\.\.8"),
    (dict(dq_block=0), r"dq_block=0: expected a positive int"),
    (dict(dq_block=False), r"dq_block=False"),
    (dict(clip_grid=0), r"clip_grid=0: expected a positive int"),
    (dict(clip_grid=2.5), r"clip_grid=2\.5"),
    (dict(clip_maxshrink=float("nan")), r"clip_maxshrink=nan"),
    (dict(clip_maxshrink=1.0), r"clip_maxshrink=1\.0"),
    (dict(clip_norm=float("inf")), r"clip_norm=inf: expected a finite number > 0"),
    (dict(clip_norm=0), r"clip_norm=0"),
    (dict(symmetric="yes"), r"symmetric='yes': expected a bool"),
    (dict(per_tensor=1), r"per_tensor=1: expected a bool"),
    (dict(format="codebook", bits=2, levels=(0.0, float("nan"))), r"levels"),
])
def test_spec_numbers_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**bad)


def test_spec_accepts_numpy_ints_and_bools():
    s = QuantSpec(bits=np.int64(4), group_size=np.int32(32), symmetric=np.bool_(True))
    assert s.group_size == 32


# ----------------------------------------------------------------------------- 4. GPTQ options

@pytest.mark.parametrize("bad, match", [
    (dict(damp=float("inf")), r"damp=inf: expected a finite"),
    (dict(damp=float("nan")), r"damp=nan: expected a finite"),
    (dict(damp=0.0), r"damp=0\.0"),
    (dict(damp=-0.01), r"damp=-0\.01"),
    (dict(damp=1.5), r"damp=1\.5"),
    (dict(damp="0.01"), r"damp='0\.01'"),
    (dict(blocksize=0), r"blocksize=0: expected a positive int"),
    (dict(blocksize=True), r"blocksize=True"),
    (dict(blocksize=64.0), r"blocksize=64\.0"),
    (dict(act_order="yes"), r"act_order='yes': expected a bool"),
    (dict(static_groups=2), r"static_groups=2: expected a bool"),
])
def test_gptq_options_are_checked_at_construction(bad, match):
    with pytest.raises(ValueError, match=match):
        GPTQOptions(**bad)


def test_gptq_options_from_config_fail_before_any_model_is_loaded():
    from lowbit.runner.config import from_dict

    assert GPTQOptions(damp=0.1, blocksize=32, act_order=True).damp == 0.1
    with pytest.raises(ValueError, match="damp=inf"):
        from_dict(GPTQOptions, {"damp": float("inf")})


def test_quantize_weight_rejects_non_finite_damp():
    for damp in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="damp="):
            quantize_weight(_w(), _hessian(), QuantSpec(bits=4, group_size=32), damp=damp)
    with pytest.raises(ValueError, match="blocksize=True"):
        quantize_weight(_w(), _hessian(), QuantSpec(bits=4, group_size=32), blocksize=True)


# ----------------------------------------------------------------------------- 5. perplexity

def _tiny_model(scale=1.0):
    from lowbit.models.llama import LlamaConfig, init_params

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5)
    p = init_params(jax.random.key(3), cfg)
    p = {**p, "lm_head": p["lm_head"] * scale}
    return p, cfg


def _windows(n=2, T=16, vocab=64):
    return np.asarray(jax.random.randint(jax.random.key(5), (n, T), 0, vocab), np.int32)


def test_perplexity_of_a_huge_nll_is_inf_not_overflow_error():
    from lowbit.eval.likelihood import perplexity

    p, cfg = _tiny_model(scale=1e5)  # logits ~1e5: NLL of a wrong token ~1e5 nats, exp overflows
    r = perplexity(p, cfg, _windows(), progress=True, desc="huge")
    assert math.isfinite(r["nll"]) and r["nll"] > 1000
    assert r["ppl"] == math.inf


def test_perplexity_nan_logits_raise_value_error():
    from lowbit.eval.likelihood import perplexity

    p, cfg = _tiny_model()
    p = {**p, "lm_head": p["lm_head"].at[0, 0].set(jnp.nan)}
    with pytest.raises(ValueError, match=r"NaN.*logits"):
        perplexity(p, cfg, _windows(), progress=False)


@pytest.mark.parametrize("bs", [0, -1, True, 1.5])
def test_perplexity_batch_size_checked(bs):
    from lowbit.eval.likelihood import compare_logits, perplexity

    p, cfg = _tiny_model()
    with pytest.raises(ValueError, match=rf"^batch_size={bs!r}: expected a positive int"):
        perplexity(p, cfg, _windows(), batch_size=bs, progress=False)
    with pytest.raises(ValueError, match=rf"^batch_size={bs!r}: expected a positive int"):
        compare_logits(p, p, cfg, _windows(), batch_size=bs, progress=False)


# ----------------------------------------------------------------------------- 7. calibration batch size

@pytest.mark.parametrize("bs", [0, -2, True])
def test_quantize_model_batch_size_checked(bs):
    from lowbit.calib.driver import default_recipe, quantize_model

    p, cfg = _tiny_model()
    with pytest.raises(ValueError, match=rf"^batch_size={bs!r}: expected a positive int"):
        quantize_model(p, cfg, default_recipe(rtn(QuantSpec(bits=4, group_size=16))), _windows(),
                       batch_size=bs, progress=False)


# ----------------------------------------------------------------------------- 6. GGUF block_count

def _write_gguf(path, params, cfg, block_count, tiny_bpe):
    import gguf

    from lowbit.core.transforms import flatten

    tokens, merges, types = tiny_bpe
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_block_count(block_count)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    outside = {"embed_tokens": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight"}
    inside = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn/q_proj": "attn_q", "self_attn/k_proj": "attn_k", "self_attn/v_proj": "attn_v",
              "self_attn/o_proj": "attn_output", "mlp/gate_proj": "ffn_gate", "mlp/up_proj": "ffn_up",
              "mlp/down_proj": "ffn_down"}
    for path_, a in flatten(params).items():
        if path_.startswith("layers/"):
            _, i, rest = path_.split("/", 2)
            name = f"blk.{i}.{inside[rest]}.weight"
        else:
            name = outside[path_]
        w.add_tensor(name, np.ascontiguousarray(np.asarray(a, np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_block_count_smaller_than_its_tensors(tmp_path, tiny_bpe):
    from lowbit.models.llama import LlamaConfig, init_params
    from lowbit.models.loaders import load_gguf

    cfg = LlamaConfig(vocab_size=len(tiny_bpe[0]), hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=64)
    p = init_params(jax.random.key(3), cfg)
    good, bad = tmp_path / "good.gguf", tmp_path / "bad.gguf"
    _write_gguf(good, p, cfg, block_count=2, tiny_bpe=tiny_bpe)
    _write_gguf(bad, p, cfg, block_count=1, tiny_bpe=tiny_bpe)
    p2, cfg2, _ = load_gguf(str(good))
    assert cfg2.num_layers == 2
    with pytest.raises(ValueError, match=r"bad\.gguf.*blk\.1\.\w+\.weight.*block_count=1"):
        load_gguf(str(bad))
