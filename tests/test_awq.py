"""AWQ (lowbit.methods.awq): the scale search against an independent loop, the folding being an exact
equivalence, the clip search, the objective (never worse than r = 0; AWQ + GPTQ no worse than
GPTQ where salient channels exist), the driver's data flow and the bad inputs (issue 12).
Tiny Llama models (hidden 64, 2 layers)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.calib.driver import default_recipe, quantize_model
from lowbit.core.qtensor import QuantSpec
from lowbit.core.quantizers import fake_quant
from lowbit.core.transforms import Context, flatten, partition, identity
from lowbit.methods import registry
from lowbit.methods.awq import (AWQOptions, CLIP_GRID, N_GRID, awq, fold_scale, search_clip, search_scale)
from lowbit.models import llama
from lowbit.models.common import scale_groups
from lowbit.models.protocol import family_of

SPEC = QuantSpec(bits=3, group_size=32, symmetric=False)
MHA = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=4, max_position_embeddings=64)
GQA = MHA.replace(num_kv_heads=2)


@functools.lru_cache(maxsize=4)
def _salient(cfg):
    """A random model whose norms make a few input channels large (as real LLMs have): the case
    AWQ is built for."""
    p = llama.init_params(jax.random.key(0), cfg)
    boost = jnp.ones(cfg.hidden_size).at[jnp.array([3, 17, 40])].set(12.0)
    layers = [{**l, "input_layernorm": l["input_layernorm"] * boost,
               "post_attention_layernorm": l["post_attention_layernorm"] * boost} for l in p["layers"]]
    return {**p, "layers": layers}


def _tokens(n=8, t=32, seed=0):
    return np.random.default_rng(seed).integers(0, MHA.vocab_size, (n, t))


def _block_inputs(params, cfg, tokens):
    fam = family_of(cfg)
    x = fam.embed_jit(fam.embed_params(params), jnp.asarray(tokens), cfg)
    y, captured = fam.block_jit(params["layers"][0], x, cfg, capture=True)
    return x, captured


# ----------------------------------------------------------------------------- the searches

def test_scale_search_matches_an_independent_loop_and_prefers_the_salient_channel():
    """One linear whose input has one salient channel: the jitted grid picks exactly the ratio an
    independent Python loop over the reference's formula picks, and it is not r = 0."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 64)).astype(np.float32)
    x = rng.standard_normal((512, 64)).astype(np.float32)
    x[:, 5] *= 40.0
    layer = {"lin": jnp.asarray(w)}
    losses, best, s = search_scale(layer, jnp.asarray(x), ("lin",), None, SPEC)
    ref = []
    x_mean = np.abs(x).mean(0)
    for i in range(N_GRID):
        r = i / N_GRID
        sc = np.maximum(x_mean ** r, 1e-4)
        sc = sc / np.sqrt(sc.max() * sc.min())
        wq = np.asarray(fake_quant(jnp.asarray(w * sc[None]), SPEC)) / sc[None]
        ref.append(np.mean((x @ w.T - x @ wq.T) ** 2))
    np.testing.assert_allclose(np.asarray(losses), ref, rtol=2e-3)
    assert int(best) == int(np.argmin(ref)) > 0
    sc = np.maximum(x_mean ** (int(best) / N_GRID), 1e-4)
    np.testing.assert_allclose(np.asarray(s), sc / np.sqrt(sc.max() * sc.min()), rtol=1e-5)
    assert float(losses[best]) < float(losses[0])


def test_module_search_uses_the_attention_output():
    """q/k/v are searched on the attention module's output (projections, attention, o_proj)."""
    params = _salient(MHA)
    _, cap = _block_inputs(params, MHA, _tokens())
    fam = family_of(MHA)
    fn = lambda layer, name, h: fam.module_fn(layer, name, h, MHA)
    lins = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj")
    losses, best, _ = search_scale(params["layers"][0], cap["self_attn/q_proj"], lins, "self_attn", SPEC,
                                   module_fn=fn)
    # r = 0 is plain fake quantization of q/k/v: its loss is the attention-output MSE of that
    layer = params["layers"][0]
    h = cap["self_attn/q_proj"]
    fq = {**layer, "self_attn": {**layer["self_attn"], **{k.split("/")[1]: fake_quant(layer["self_attn"][k.split("/")[1]], SPEC)
                                                          for k in lins}}}
    want = jnp.mean((fn(layer, "self_attn", h) - fn(fq, "self_attn", h)) ** 2)
    np.testing.assert_allclose(float(losses[0]), float(want), rtol=1e-4)
    assert float(losses[best]) <= float(losses[0]) and losses.shape == (N_GRID,)


def test_clip_search_matches_an_independent_loop():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    w[:, 7] *= 6.0                          # an outlier weight per row: clipping it can pay off
    x = rng.standard_normal((1500, 64)).astype(np.float32)
    max_val, org_max = search_clip(jnp.asarray(w), jnp.asarray(x), SPEC)
    xs = x[:: 1500 // 512]                  # the reference's stride: n // 512
    g = 32
    wg, xg = w.reshape(16, 2, g), xs.reshape(-1, 2, g)
    org_out = np.einsum("rgk,ngk->rng", wg, xg)
    omax = np.abs(wg).max(-1)
    errs = []
    for i in range(int(0.5 * CLIP_GRID)):
        m = omax * (1 - i / CLIP_GRID)
        cw = np.clip(wg, -m[..., None], m[..., None]).reshape(16, 64)
        q = np.asarray(fake_quant(jnp.asarray(cw), SPEC)).reshape(16, 2, g)
        errs.append(((np.einsum("rgk,ngk->rng", q, xg) - org_out) ** 2).mean(1))
    best = np.argmin(np.stack(errs), axis=0)
    np.testing.assert_allclose(np.asarray(org_max), omax, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(max_val), omax * (1 - best / CLIP_GRID), rtol=1e-6)
    assert (best > 0).any()


# ----------------------------------------------------------------------------- folding and prepare

def _prepare(params, cfg, tokens, opts, spec=SPEC, linears=None):
    fam = family_of(cfg)
    x, cap = _block_inputs(params, cfg, tokens)
    layer = params["layers"][0]
    pre = "layers/0/"
    block = {pre + p: v for p, v in flatten(layer).items()}
    linears = fam.linears(cfg) if linears is None else linears
    inputs = {pre + p: cap[p] for p in linears}
    ctx = Context(prefix=pre, layer=layer, module_fn=lambda l, n, h: fam.module_fn(l, n, h, cfg),
                  scale_groups=fam.scale_groups(cfg), norm_offset=fam.norm_offset)
    new, metrics = awq(spec, opts).prepare(block, inputs, ctx)
    return x, layer, new, metrics


@pytest.mark.parametrize("cfg", [MHA, GQA, MHA.replace(qkv_bias=True, o_bias=True)], ids=["mha", "gqa", "bias"])
def test_scaling_without_clipping_is_an_exact_equivalence(cfg):
    """Folded scales change no output: the scaled float block equals the original block."""
    from lowbit.core.transforms import unflatten

    params = _salient(cfg)
    x, layer, new, metrics = _prepare(params, cfg, _tokens(), AWQOptions(clip=False))
    scaled = unflatten(layer, {p[len("layers/0/"):]: v for p, v in new.items()})
    fam = family_of(cfg)
    np.testing.assert_allclose(np.asarray(fam.block_jit(scaled, x, cfg)), np.asarray(fam.block_jit(layer, x, cfg)),
                               rtol=2e-4, atol=2e-4)
    changed = {p for p in new if not np.array_equal(np.asarray(new[p]), np.asarray(flatten(layer)[p[9:]]))}
    o_scaled = cfg.num_kv_heads == cfg.num_heads          # GQA: v_proj cannot take o_proj's scales
    assert ("layers/0/self_attn/o_proj" in changed) == o_scaled
    assert {"layers/0/input_layernorm", "layers/0/post_attention_layernorm", "layers/0/mlp/up_proj",
            "layers/0/mlp/down_proj", "layers/0/self_attn/q_proj"} <= changed
    assert np.isnan(metrics["layers/0/self_attn/o_proj"]["awq_ratio"]) != o_scaled
    for p, m in metrics.items():
        if "awq_loss" in m:
            assert float(m["awq_loss"]) <= float(m["awq_loss_r0"])


def test_fold_into_offset_norms_and_biases():
    """Gemma stores norms as w with the norm multiplying by (1 + w): folding writes (1 + w)/s - 1;
    a producing linear's bias is divided with its rows."""
    s = jnp.array([2.0, 4.0])
    block = {"n": jnp.array([0.5, -0.25]), "a": jnp.ones((2, 2)), "v_proj": jnp.ones((2, 3)),
             "v_bias": jnp.array([2.0, 8.0]), "o_proj": jnp.ones((3, 2))}
    out = fold_scale(block, "n", ["a"], s, norm_offset=1.0)
    np.testing.assert_allclose(np.asarray(out["n"]), [(1.5 / 2) - 1, (0.75 / 4) - 1])
    np.testing.assert_allclose(np.asarray(out["a"]), [[2.0, 4.0], [2.0, 4.0]])
    out = fold_scale(block, "v_proj", ["o_proj"], s)
    np.testing.assert_allclose(np.asarray(out["v_proj"]), [[0.5] * 3, [0.25] * 3])
    np.testing.assert_allclose(np.asarray(out["v_bias"]), [1.0, 2.0])
    assert np.all(np.asarray(out["o_proj"]) == np.array([2.0, 4.0]))


def test_bad_input_names_the_path():
    params = _salient(MHA)
    with pytest.raises(ValueError, match="route all of them or none"):
        _prepare(params, MHA, _tokens(), AWQOptions(), linears=("self_attn/q_proj", "self_attn/k_proj"))
    fam = family_of(MHA)
    x, cap = _block_inputs(params, MHA, _tokens())
    layer = params["layers"][0]
    block = {"layers/0/" + p: v for p, v in flatten(layer).items()}
    ctx = Context(prefix="layers/0/", layer=layer, module_fn=lambda l, n, h: fam.module_fn(l, n, h, MHA),
                  scale_groups=scale_groups({**llama.PRODUCERS, "mlp/down_proj": None}))
    with pytest.raises(ValueError, match="'layers/0/mlp/down_proj'.*no scale producer"):
        awq(SPEC).prepare(block, {"layers/0/mlp/down_proj": cap["mlp/down_proj"]}, ctx)
    ctx = ctx._replace(scale_groups=scale_groups(llama.PRODUCERS)[:3])
    with pytest.raises(ValueError, match="'layers/0/mlp/down_proj'.*declares no scale producer"):
        awq(SPEC).prepare(block, {"layers/0/mlp/down_proj": cap["mlp/down_proj"]}, ctx)
    for bad, match in (({"then": "spqr"}, "then='spqr'"), ({"n_grid": 0}, "n_grid=0"),
                       ({"clip_max_shrink": 1.0}, "clip_max_shrink"), ({"clip": "yes"}, "clip='yes'")):
        with pytest.raises(ValueError, match=match):
            AWQOptions(**bad)


# ----------------------------------------------------------------------------- through the driver

def _final_hidden_err(q, params, cfg, tokens):
    from lowbit.models.protocol import hidden_layerwise

    ref = hidden_layerwise(params, tokens, cfg)
    return float(jnp.linalg.norm(hidden_layerwise(q, tokens, cfg) - ref) / jnp.linalg.norm(ref))


def test_awq_then_rtn_and_gptq_through_the_driver():
    """AWQ + RTN beats RTN and AWQ + GPTQ is no worse than GPTQ on a model with salient channels
    (final hidden states vs the float model, on held-out windows); report rows carry the search."""
    params, cfg = _salient(MHA), MHA
    calib, held = _tokens(16, 32, seed=0), _tokens(8, 32, seed=5)
    errs, rows = {}, {}
    for name, method, opts in (("rtn", "rtn", None), ("gptq", "gptq", None),
                               ("awq", "awq", AWQOptions()), ("awq+gptq", "awq", AWQOptions(then="gptq"))):
        recipe = default_recipe(registry.build(method, SPEC, opts))
        q, rows[name] = quantize_model(params, cfg, recipe, calib, batch_size=8, progress=False)
        errs[name] = _final_hidden_err(q, params, cfg, held)
    assert errs["awq"] < errs["rtn"], errs
    assert errs["awq+gptq"] <= errs["gptq"] * 1.02, errs
    r = {x["path"]: x for x in rows["awq"]}
    assert 0.0 <= r["layers/1/mlp/gate_proj"]["awq_ratio"] < 1.0 and "awq_clip" in r["layers/1/mlp/down_proj"]
    assert "awq_clip" not in r["layers/1/self_attn/q_proj"]
    assert all(x["format"] == "int" and x["bits"] == 3 for x in rows["awq+gptq"])


def test_awq_feeds_float_outputs_on_and_resumes_with_the_reference():
    """AWQ + RTN: block 1's search sees the float block 0's outputs, so resuming from layer 1 with
    ``reference=`` (the float params) reproduces the uninterrupted run bit for bit."""
    params, cfg = _salient(MHA), MHA
    calib = _tokens(8, 32, seed=3)
    recipe = default_recipe(registry.build("awq", SPEC, AWQOptions()))
    full, _ = quantize_model(params, cfg, recipe, calib, batch_size=8, progress=False)
    half = {**params, "layers": [full["layers"][0], params["layers"][1]]}
    with pytest.raises(ValueError, match="reference"):
        quantize_model(half, cfg, recipe, calib, batch_size=8, start_layer=1, progress=False)
    resumed, _ = quantize_model(half, cfg, recipe, calib, batch_size=8, start_layer=1, reference=params,
                                progress=False)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_partition_routes_prepare_to_the_owned_linears():
    """Only the linears routed to awq are scaled: an attention-only AWQ leaves the MLP's weights and
    norm alone."""
    params, cfg = _salient(MHA), MHA
    recipe = partition([(r"mlp", identity()), (r"_proj$", registry.build("awq", SPEC, AWQOptions()))])
    q, _ = quantize_model(params, cfg, recipe, _tokens(8, 32), batch_size=8, progress=False)
    l0, p0 = q["layers"][0], params["layers"][0]
    assert np.array_equal(np.asarray(l0["post_attention_layernorm"]), np.asarray(p0["post_attention_layernorm"]))
    assert np.array_equal(np.asarray(l0["mlp"]["up_proj"]), np.asarray(p0["mlp"]["up_proj"]))
    assert not np.array_equal(np.asarray(l0["input_layernorm"]), np.asarray(p0["input_layernorm"]))


def test_runner_rows(tiny_experiment, tmp_path):
    """``method: awq`` rows in a ``lowbit run`` config (AWQ + RTN and AWQ + GPTQ), with the search's
    columns in layers.csv."""
    import csv
    import os

    import yaml

    from lowbit.runner.config import load_config
    from lowbit.runner.experiment import experiment_dir, run_experiment

    root, path = tiny_experiment
    conf = yaml.safe_load(path.read_text())
    q = {"bits": 3, "group_size": 32, "symmetric": False}
    conf["experiment"] = "awq"
    conf["methods"] = [{"name": "fp", "method": "fp"},
                       {"name": "awq-w3g32", "method": "awq", "quant": q},
                       {"name": "awq-gptq-w3g32", "method": "awq", "quant": q, "awq": {"then": "gptq"}}]
    p = tmp_path / "awq.yaml"
    p.write_text(yaml.safe_dump(conf))
    cfg = load_config(str(p))
    run_experiment(cfg, results_dir=str(tmp_path / "r"), progress=False)
    d = experiment_dir(cfg, str(tmp_path / "r"))
    for row in ("awq-w3g32", "awq-gptq-w3g32"):
        with open(os.path.join(d, row, "layers.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 14 and all(r["awq_ratio"] != "" for r in rows)
        assert {r["path"] for r in rows if r["awq_clip"] == ""} == {f"layers/{i}/self_attn/{n}"
                                                                    for i in range(2) for n in ("q_proj", "k_proj")}
    assert (yaml.safe_load(open(os.path.join(d, "awq-gptq-w3g32", "config.yaml")))["methods"][0]["awq"]["then"]
            == "gptq")


def test_awq_model_exports_to_autoawq(tmp_path):
    """AWQ w4 asymmetric g32 (the AutoAWQ format) exports with ``--format awq``; the export decodes
    (independently, tests/test_export_awq.py) to exactly lowbit's dequantized weights."""
    import os

    from safetensors.numpy import load_file

    from lowbit.core.quantizers import dequantize
    from lowbit.io.export import export_awq
    from test_export_awq import decode

    cfg = MHA.replace(qkv_bias=True, o_bias=True)
    spec = QuantSpec(bits=4, group_size=32, symmetric=False)
    params = _salient(cfg)
    q, _ = quantize_model(params, cfg, default_recipe(registry.build("awq", spec, AWQOptions())), _tokens(8, 32),
                          batch_size=8, progress=False)
    out = export_awq(str(tmp_path / "hf"), q, cfg)
    t = load_file(os.path.join(out, "model.safetensors"))
    for p in ("layers/1/self_attn/v_proj", "layers/1/mlp/down_proj"):
        name = "model." + p.replace("/", ".")
        np.testing.assert_array_equal(decode(t, name), np.asarray(dequantize(flatten(q)[p])))
    # the folded norms and v biases are plain tensors of the export
    np.testing.assert_array_equal(t["model.layers.0.input_layernorm.weight"],
                                  np.asarray(q["layers"][0]["input_layernorm"]).astype(np.float16))
