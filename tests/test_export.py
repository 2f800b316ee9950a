import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from lowbit import QuantSpec, dequantize, quantize
from lowbit.calib.driver import default_recipe
from lowbit.io.export import export_gptq
from lowbit.methods.gptq import gptq
from lowbit.models import llama
from lowbit.core.transforms import calibrate, flatten, quantize_params
from lowbit.methods.rtn import rtn

CFG = llama.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=64)


def _decode_column_bitstream(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Independent decoder: each column of int32 words is a little-endian bitstream of n codes."""
    u = np.ascontiguousarray(words.view(np.uint32).T)             # (cols, n_words)
    bitplanes = np.unpackbits(u.view(np.uint8), axis=1, bitorder="little")[:, : n * bits]
    codes = bitplanes.reshape(u.shape[0], n, bits) @ (1 << np.arange(bits))
    return codes.T                                                 # (n, cols)


def _decode_layer(t: dict, prefix: str, bits: int, in_f: int, out_f: int, v1: bool) -> np.ndarray:
    codes = _decode_column_bitstream(t[f"{prefix}.qweight"], bits, in_f)          # (in, out)
    n_groups = t[f"{prefix}.scales"].shape[0]
    zeros = _decode_column_bitstream(t[f"{prefix}.qzeros"].T.copy(), bits, out_f).T  # (n_groups, out)
    zeros = zeros + 1 if v1 else zeros
    g = t[f"{prefix}.g_idx"]
    assert g.shape == (in_f,) and g.max() < n_groups
    W = (codes - zeros[g]) * t[f"{prefix}.scales"].astype(np.float32)[g]          # (in, out)
    return W.T


def _qparams(act_order, bits=4, group_size=32, seed=0):
    """GPTQ with act-order (a stored permutation) or plain RTN: the export must not care which."""
    params = llama.init_params(jax.random.key(seed), CFG)
    if not act_order:
        return quantize_params(params, default_recipe(rtn(QuantSpec(bits=bits, group_size=group_size))))
    rng = np.random.default_rng(seed)
    recipe = default_recipe(gptq(QuantSpec(bits=bits, group_size=group_size), act_order=True))
    flat = flatten(params)
    acts = {p: jnp.asarray(rng.standard_t(3, size=(256, w.shape[1])), jnp.float32)
            for p, w in flat.items() if p.endswith("_proj")}
    return quantize_params(params, recipe, calibrate(recipe, flat, [acts]))


@pytest.mark.parametrize("bits, group_size, act_order", [(4, 32, True), (3, 64, False), (2, 32, False), (8, None, False)])
def test_export_decodes_back_independently(tmp_path, bits, group_size, act_order):
    q = _qparams(act_order, bits, group_size)
    out = export_gptq(str(tmp_path / "hf"), q, CFG, checkpoint_format="gptq_v2" if bits == 2 else "gptq")
    t = load_file(os.path.join(out, "model.safetensors"))
    conf = json.load(open(os.path.join(out, "config.json")))
    qc = conf["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["desc_act"] == act_order
    assert qc["group_size"] == (group_size or -1) and qc["sym"] is False
    assert conf["num_hidden_layers"] == 2 and conf["num_key_value_heads"] == 2
    flat = flatten(q)
    for i in range(2):
        for p in llama.LINEARS:
            qt = flat[f"layers/{i}/{p}"]
            prefix = f"model.layers.{i}.{p.replace('/', '.')}"
            assert t[f"{prefix}.qweight"].dtype == np.int32 and t[f"{prefix}.scales"].dtype == np.float16
            W = _decode_layer(t, prefix, bits, qt.shape[1], qt.shape[0], v1=qc["checkpoint_format"] == "gptq")
            np.testing.assert_allclose(W, np.asarray(dequantize(qt)), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(t["model.embed_tokens.weight"],
                                  np.asarray(flat["embed_tokens"]).astype(np.float16))
    assert "model.layers.1.post_attention_layernorm.weight" in t and "model.norm.weight" in t


def test_symmetric_export_stores_the_mid_zero(tmp_path):
    params = llama.init_params(jax.random.key(1), CFG)
    q = quantize_params(params, default_recipe(rtn(QuantSpec(bits=4, group_size=32, symmetric=True))))
    out = export_gptq(str(tmp_path / "hf"), q, CFG)
    t = load_file(os.path.join(out, "model.safetensors"))
    assert np.all(t["model.layers.0.mlp.up_proj.qzeros"].view(np.uint32) == 0x77777777)  # 8 - 1, v1
    assert json.load(open(os.path.join(out, "config.json")))["quantization_config"]["sym"] is True


def test_export_errors(tmp_path):
    params = llama.init_params(jax.random.key(1), CFG)
    with pytest.raises(ValueError, match="nothing is quantized"):
        export_gptq(str(tmp_path / "a"), params, CFG)
    q = quantize_params(params, default_recipe(rtn(QuantSpec(bits=4, format="nf4", group_size=32))))
    with pytest.raises(ValueError, match="cannot be exported as GPTQ"):
        export_gptq(str(tmp_path / "a"), q, CFG)
    from lowbit.core.transforms import partition, identity
    mixed = quantize_params(params, partition([(r"q_proj", identity()), (r"_proj$", rtn(QuantSpec(bits=4, group_size=32)))]))
    with pytest.raises(ValueError, match="dense"):
        export_gptq(str(tmp_path / "a"), mixed, CFG)
    two = quantize_params(params, partition([(r"mlp", rtn(QuantSpec(bits=3, group_size=32))),
                                             (r"_proj$", rtn(QuantSpec(bits=4, group_size=32)))]))
    with pytest.raises(ValueError, match="one \\(bits"):
        export_gptq(str(tmp_path / "a"), two, CFG)
    # all-positive group -> zero point 0 -> not representable in v1
    w = jnp.abs(jax.random.normal(jax.random.key(2), (CFG.hidden_size, CFG.hidden_size))) + 0.1
    pos = quantize_params(params, default_recipe(rtn(QuantSpec(bits=4, group_size=32))))
    pos["layers"][0]["self_attn"]["o_proj"] = quantize(w, QuantSpec(bits=4, group_size=32))
    with pytest.raises(ValueError, match="gptq_v2"):
        export_gptq(str(tmp_path / "a"), pos, CFG)
    assert not os.path.exists(tmp_path / "a")  # failed exports leave nothing behind
    export_gptq(str(tmp_path / "a"), pos, CFG, checkpoint_format="gptq_v2")
