"""``lowbit export --format awq``: the AutoAWQ GEMM layout (quant_method awq, version gemm).

The checkpoint is decoded here with plain NumPy from the format's description (AutoAWQ's
``WQLinear_GEMM.from_linear`` / ``awq.utils.packing_utils.dequantize_gemm``), not with lowbit's
exporter: ``qweight`` int32 ``(in, out / 8)`` and ``qzeros`` int32 ``(n_groups, out / 8)`` hold 8
4-bit values per word along the output features, nibble ``n`` (bits ``4n .. 4n+3``) of word ``k``
holding feature ``8k + ORDER[n]`` with ``ORDER = (0, 2, 4, 6, 1, 3, 5, 7)``; ``scales`` float16
``(n_groups, out)``; ``W[o, i] = (q[i, o] - z[i // G, o]) * s[i // G, o]``.

The decoded weights must equal lowbit's dequantized weights *exactly*. lowbit's default
``scale_dtype="float16"`` stores the same float16 scales AWQ does, so there is nothing to round; for
float32 scales the comparison is with the tensor dequantized with its scales cast to float16 (what
the export stores).
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from lowbit import QuantSpec, dequantize, quantize
from lowbit.calib.driver import default_recipe
from lowbit.core.pack import pack
from lowbit.core.qtensor import QuantizedTensor
from lowbit.core.transforms import flatten, quantize_params
from lowbit.io.export import export_awq, export_gptq
from lowbit.io.outputs import MARKER
from lowbit.methods.rtn import rtn
from lowbit.models import llama

CFG = llama.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=64, qkv_bias=True, o_bias=True)
G = 32
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)    # nibble n of a word holds output feature 8k + ORDER[n]
REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)  # so feature 8k + j sits in nibble REVERSE[j]
AWQ_KEYS = {"quant_method": "awq", "zero_point": True, "group_size": G, "bits": 4, "version": "gemm",
            "modules_to_not_convert": None}


# ----------------------------------------------------------------------------- independent decoder


def unpack_rows(words: np.ndarray) -> np.ndarray:
    """int32 ``(r, c)`` -> ``(r, 8c)`` 4-bit values in output-feature order."""
    assert words.dtype == np.int32
    u = words.view(np.uint32)
    nibbles = (u[:, :, None] >> np.arange(0, 32, 4, dtype=np.uint32)) & np.uint32(0xF)  # (r, c, 8), nibble n
    return nibbles[:, :, list(REVERSE)].reshape(u.shape[0], -1)


def decode(t: dict, prefix: str) -> np.ndarray:
    """``W (out, in)`` float32 of one AWQ GEMM linear."""
    qweight, qzeros, scales = t[f"{prefix}.qweight"], t[f"{prefix}.qzeros"], t[f"{prefix}.scales"]
    assert scales.dtype == np.float16 and f"{prefix}.g_idx" not in t and f"{prefix}.weight" not in t
    q = unpack_rows(qweight).astype(np.float32)                      # (in, out)
    z = unpack_rows(qzeros).astype(np.float32)                       # (n_groups, out)
    in_f, out_f = q.shape
    assert qweight.shape == (in_f, out_f // 8) and qzeros.shape == (in_f // G, out_f // 8)
    assert scales.shape == (in_f // G, out_f)
    g = np.arange(in_f) // G
    return ((q - z[g]) * scales.astype(np.float32)[g]).T


def _set(params, path: str, value):
    """A copy of ``params`` with the leaf at ``a/b/c`` replaced (lists and dicts copied along the way)."""
    keys = path.split("/")

    def go(node, ks):
        k = int(ks[0]) if isinstance(node, list) else ks[0]
        new = list(node) if isinstance(node, list) else dict(node)
        new[k] = value if len(ks) == 1 else go(node[k], ks[1:])
        return new
    return go(params, keys)


@pytest.fixture(scope="module")
def model():
    """``(float params, quantized params)``: RTN 4-bit asymmetric g32 on every block linear; the o_proj of
    layer 0 is all-positive (every zero point 0, which AWQ stores as is) and layer 1's up_proj keeps
    float32 scales (rounded to float16 by the export)."""
    params = llama.init_params(jax.random.key(0), CFG)
    spec = QuantSpec(bits=4, group_size=G, symmetric=False)
    q = quantize_params(params, default_recipe(rtn(spec)))
    pos = jnp.abs(jax.random.normal(jax.random.key(1), (64, 64))) * 0.05 + 0.01
    q = _set(q, "layers/0/self_attn/o_proj", quantize(pos, spec))
    up = flatten(params)["layers/1/mlp/up_proj"]
    q = _set(q, "layers/1/mlp/up_proj", quantize(up, spec.replace(scale_dtype="float32")))
    return params, q


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    _, q = model
    out = export_awq(str(tmp_path_factory.mktemp("awq") / "hf"), q, CFG)
    return out, load_file(os.path.join(out, "model.safetensors")), json.load(open(os.path.join(out, "config.json")))


# ----------------------------------------------------------------------------- the layout


def test_reverse_order_undoes_the_pack_order():
    assert [ORDER[r] for r in REVERSE] == list(range(8))


def test_pack_order_golden_words(tmp_path, model):
    """AutoAWQ packs ``qweight[:, k] |= code[:, 8k + ORDER[n]] << 4n``: output features with codes 0..7
    give the word 0x75316420 and codes 8..15 give 0xFDB9ECA8 (negative as an int32)."""
    _, q = model
    codes = np.tile((np.arange(64) % 16)[:, None], (1, 64)).astype(np.uint8)     # code[o, i] = o % 16
    zcodes = ((np.arange(64) * 5) % 16)[:, None].repeat(2, axis=1).astype(np.uint8)
    qt = QuantizedTensor(data=pack(jnp.asarray(codes), 4), scales=jnp.full((64, 2), 0.5, jnp.float16),
                         zeros=pack(jnp.asarray(zcodes), 4), shape=(64, 64), bits=4, group_size=G)
    out = export_awq(str(tmp_path / "hf"), _set(q, "layers/0/self_attn/q_proj", qt), CFG)
    t = load_file(os.path.join(out, "model.safetensors"))
    w = t["model.layers.0.self_attn.q_proj.qweight"].view(np.uint32)
    assert w.shape == (64, 8)
    assert np.all(w[:, 0::2] == 0x75316420) and np.all(w[:, 1::2] == 0xFDB9ECA8)
    assert t["model.layers.0.self_attn.q_proj.qweight"].min() < 0
    np.testing.assert_array_equal(unpack_rows(t["model.layers.0.self_attn.q_proj.qzeros"]), zcodes.T)
    np.testing.assert_array_equal(decode(t, "model.layers.0.self_attn.q_proj"), np.asarray(dequantize(qt)))


def test_decodes_exactly_to_lowbits_weights(model, exported):
    _, q = model
    _, t, _ = exported
    flat = flatten(q)
    for i in range(CFG.num_layers):
        for p in llama.LINEARS:
            qt = flat[f"layers/{i}/{p}"]
            prefix = f"model.layers.{i}.{p.replace('/', '.')}"
            assert t[f"{prefix}.qweight"].dtype == np.int32 and t[f"{prefix}.qzeros"].dtype == np.int32
            if qt.scales.dtype != jnp.float16:  # float32 scales: the export stores them as float16
                assert (i, p) == (1, "mlp/up_proj")
                assert not np.array_equal(np.asarray(qt.scales).astype(np.float16).astype(np.float32),
                                          np.asarray(qt.scales))
                qt = dataclasses.replace(qt, scales=qt.scales.astype(jnp.float16))
            np.testing.assert_array_equal(decode(t, prefix), np.asarray(dequantize(qt)), err_msg=prefix)
    # zero points of 0 (all-positive weights) are stored as they are, not as zero - 1
    assert np.all(unpack_rows(t["model.layers.0.self_attn.o_proj.qzeros"]) == 0)


def test_config_and_dense_tensors(model, exported):
    params, q = model
    out, t, conf = exported
    assert conf["quantization_config"] == AWQ_KEYS
    assert conf["architectures"] == ["LlamaForCausalLM"] and conf["model_type"] == "llama"
    assert conf["num_hidden_layers"] == 2 and conf["num_key_value_heads"] == 2 and conf["attention_bias"] is True
    assert conf["torch_dtype"] == "float16"
    assert sorted(os.listdir(out)) == sorted([MARKER, "config.json", "model.safetensors"])  # no quantize_config.json
    assert json.load(open(os.path.join(out, MARKER)))["kind"] == "export-awq"
    flat = flatten(params)
    dense = {"model.embed_tokens.weight": "embed_tokens", "model.norm.weight": "norm", "lm_head.weight": "lm_head"}
    for i in range(CFG.num_layers):
        dense[f"model.layers.{i}.input_layernorm.weight"] = f"layers/{i}/input_layernorm"
        dense[f"model.layers.{i}.post_attention_layernorm.weight"] = f"layers/{i}/post_attention_layernorm"
        for b in "qkvo":
            dense[f"model.layers.{i}.self_attn.{b}_proj.bias"] = f"layers/{i}/self_attn/{b}_bias"
    for name, path in dense.items():
        assert t[name].dtype == np.float16, name
        np.testing.assert_array_equal(t[name], np.asarray(flat[path]).astype(np.float16), err_msg=name)
    quantized = {f"model.layers.{i}.{p.replace('/', '.')}.{k}" for i in range(2) for p in llama.LINEARS
                 for k in ("qweight", "qzeros", "scales")}
    assert set(t) == set(dense) | quantized


def test_transformers_reads_the_config(exported):
    """transformers (the [torch] extra) parses quantization_config as AWQ GEMM; loading the weights needs
    gptqmodel and a GPU kernel, so only the config is checked here."""
    transformers = pytest.importorskip("transformers")
    out, _, conf = exported
    c = transformers.AwqConfig.from_dict(dict(conf["quantization_config"]))
    assert (c.bits, c.group_size, c.zero_point, c.format) == (4, G, True, "gemm")
    hf = transformers.AutoConfig.from_pretrained(out)
    assert hf.model_type == "llama" and hf.quantization_config["quant_method"] == "awq"


# ----------------------------------------------------------------------------- refusals


def _bad_cases(params, q):
    w = flatten(params)["layers/1/mlp/up_proj"]   # (128, 64)
    good = flatten(q)["layers/1/mlp/gate_proj"]
    spec = QuantSpec(bits=4, group_size=G)
    return {
        "symmetric": quantize(w, spec.replace(symmetric=True)),
        "format 'nf4'": quantize(w, spec.replace(format="nf4")),
        "bits=3": quantize(w, spec.replace(bits=3)),
        "act-order": dataclasses.replace(good, perm=jnp.arange(64, dtype=jnp.int32)[::-1]),
        "double-quantized": quantize(w, spec.replace(double_quant=True)),
        "does not divide": quantize(w, spec.replace(group_size=48, partial_groups=True)),
        "whole row: per-channel": quantize(w, spec.replace(group_size=None)),
    }


def test_refusals_name_the_tensor_and_leave_nothing(model, tmp_path):
    params, q = model
    out = str(tmp_path / "hf")
    for why, bad in _bad_cases(params, q).items():
        with pytest.raises(ValueError, match=r"layers/1/mlp/up_proj.*" + why + r".*AutoAWQ's GEMM format holds 4-bit"):
            export_awq(out, _set(q, "layers/1/mlp/up_proj", bad), CFG)
        assert not os.path.exists(out), why
    with pytest.raises(ValueError, match=r"params\['lm_head'\]: is quantized.*decoder blocks"):
        export_awq(out, _set(q, "lm_head", quantize(flatten(params)["lm_head"], QuantSpec(bits=4, group_size=G))),
                   CFG)
    with pytest.raises(ValueError, match="AWQ checkpoints quantize every linear of the blocks; these are dense"):
        export_awq(out, _set(q, "layers/0/mlp/up_proj", flatten(params)["layers/0/mlp/up_proj"]), CFG)
    with pytest.raises(ValueError, match="nothing is quantized; AWQ export"):
        export_awq(out, params, CFG)
    with pytest.raises(ValueError, match="rope_style='interleaved'.*half-split"):
        export_awq(out, q, CFG.replace(rope_style="interleaved"))
    assert os.listdir(tmp_path) == []


def test_a_failed_write_leaves_no_partial_directory(model, tmp_path, monkeypatch):
    import safetensors.numpy

    _, q = model
    out = str(tmp_path / "hf")

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", half_written)
    with pytest.raises(OSError, match="No space"):
        export_awq(out, q, CFG)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    export_awq(out, q, CFG)
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    monkeypatch.setattr(safetensors.numpy, "save_file", half_written)
    with pytest.raises(OSError, match="No space"):
        export_awq(out, q, CFG, overwrite=True)
    assert os.listdir(tmp_path) == ["hf"]  # the previous export is intact, no temporaries left
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before


def test_awq_and_gptq_outputs_are_kept_apart(model, tmp_path):
    _, q = model
    out = str(tmp_path / "hf")
    export_gptq(out, q, CFG, checkpoint_format="gptq_v2")
    with pytest.raises(ValueError, match="export-gptq"):
        export_awq(out, q, CFG)
    export_awq(out, q, CFG, overwrite=True)
    assert json.load(open(os.path.join(out, MARKER)))["kind"] == "export-awq"


# ----------------------------------------------------------------------------- CLI


def test_cli_export_awq(tiny_experiment, tmp_path, capsys):
    from lowbit.cli import main
    from lowbit.models.loaders import load_checkpoint, save_model

    root, _ = tiny_experiment
    ck, sym, hf = str(tmp_path / "ck"), str(tmp_path / "sym"), str(tmp_path / "hf")
    quant = ["quantize", "--model", str(root / "model"), "--method", "rtn", "--bits", "4", "--group-size", str(G),
             "--calib", str(root / "corpus.txt"), "--nsamples", "2", "--seqlen", "16", "--no-progress"]
    assert main(quant + ["--out", ck]) == 0
    assert main(["export", ck, "--format", "awq", "--out", hf]) == 0
    assert "awq, version=gemm" in capsys.readouterr().out
    assert sorted(os.listdir(hf)) == sorted([MARKER, "config.json", "model.safetensors", "tokenizer.json"])
    assert json.load(open(os.path.join(hf, MARKER)))["kind"] == "export-awq"
    assert json.load(open(os.path.join(hf, "config.json")))["quantization_config"] == AWQ_KEYS
    t = load_file(os.path.join(hf, "model.safetensors"))
    flat = flatten(load_checkpoint(ck)[0])
    for p in llama.LINEARS:
        np.testing.assert_array_equal(decode(t, f"model.layers.1.{p.replace('/', '.')}"),
                                      np.asarray(dequantize(flat[f"layers/1/{p}"])), err_msg=p)
    assert main(["export", ck, "--format", "awq", "--out", hf]) == 0  # its own kind: replaced
    capsys.readouterr()
    assert main(["export", ck, "--out", hf]) == 2  # gptq (the default) over an awq export: refused
    assert "export-awq" in capsys.readouterr().err
    assert main(["export", ck, "--format", "awq", "--checkpoint-format", "gptq_v2", "--out", str(tmp_path / "x")]) == 2
    assert "only for --format gptq" in capsys.readouterr().err
    # a checkpoint with one symmetric linear (no stored zero points; cheaper than a second quantize run)
    params, cfg, tok = load_checkpoint(ck)
    up = flatten(params)["layers/0/mlp/up_proj"]
    save_model(sym, _set(params, "layers/0/mlp/up_proj", dataclasses.replace(up, zeros=None)), cfg, tok)
    assert main(["export", sym, "--format", "awq", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "layers/0/mlp/up_proj" in err and "symmetric" in err and "AutoAWQ" in err
    assert not os.path.exists(tmp_path / "x")
