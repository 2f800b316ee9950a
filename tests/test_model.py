"""Llama-family model, loaders, tokenizer and generation on tiny synthetic models (fast)."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit import QuantizedTensor, QuantSpec, ops
from lowbit.models import common, llama
from lowbit.models.llama import LINEARS, LlamaConfig, block, embed, forward, forward_jit, head, init_params
from lowbit.models.protocol import forward_layerwise
from lowbit.core.transforms import flatten, identity, partition, quantize_params
from lowbit.methods.rtn import rtn

V = 320


def _cfg(**kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=2, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5,
                bos_token_id=1, eos_token_id=0)
    base.update(kw)
    return LlamaConfig(**base)


def _tokens(T=12, B=2, seed=1):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


def _perm_qk(params, cfg, fn):
    out = jax.tree_util.tree_map(lambda x: x, params)
    for layer in out["layers"]:
        a = layer["self_attn"]
        for name, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads)):
            a[f"{name}_proj"] = jnp.asarray(fn(np.asarray(a[f"{name}_proj"]), heads))
            if f"{name}_bias" in a:
                a[f"{name}_bias"] = jnp.asarray(fn(np.asarray(a[f"{name}_bias"]), heads))
    return out


# ----------------------------------------------------------------------------- config

def test_config_validation_and_round_trip():
    cfg = _cfg()
    assert cfg.head_dim == 8 and cfg.num_kv_heads == 2
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
    hash(cfg)
    with pytest.raises(ValueError, match="num_heads=4 must be a multiple of num_kv_heads=3"):
        _cfg(num_kv_heads=3)
    with pytest.raises(ValueError, match="rope_style"):
        _cfg(rope_style="neox")
    with pytest.raises(ValueError, match="hidden_size"):
        _cfg(hidden_size=0)
    with pytest.raises(ValueError, match="dtype"):
        _cfg(dtype="int8")
    with pytest.raises(ValueError, match="bos_token_id"):
        _cfg(bos_token_id=V)
    with pytest.raises(ValueError, match="unknown keys"):
        LlamaConfig.from_dict({**cfg.to_dict(), "foo": 1})


def test_from_hf_config_families_and_errors():
    base = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    c = LlamaConfig.from_hf_config({**base, "model_type": "qwen2", "eos_token_id": [5, 6]})
    assert c.qkv_bias and not c.o_bias and c.eos_token_id == 5 and c.rope_style == "half"
    c = LlamaConfig.from_hf_config({**base, "model_type": "mistral", "sliding_window": 16})
    assert c.sliding_window == 16
    c = LlamaConfig.from_hf_config({**base, "model_type": "llama", "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}})
    assert c.rope_scaling == "llama3"
    with pytest.raises(ValueError, match=r"model_type='bert'.*BertModel.*supported model types"):
        LlamaConfig.from_hf_config({"model_type": "bert", "architectures": ["BertModel"]})
    with pytest.raises(ValueError, match="rope scaling 'yarn'"):
        LlamaConfig.from_hf_config({**base, "model_type": "llama", "rope_scaling": {"type": "yarn", "factor": 2}})


# ----------------------------------------------------------------------------- model semantics

def test_rope_styles_equivalent_under_qk_permutation():
    cfg = _cfg(qkv_bias=True)                              # q/k biases are permuted like the rows
    p = init_params(jax.random.key(0), cfg)
    t = _tokens()
    ref = forward_jit(p, t, cfg)
    p_int = _perm_qk(p, cfg, llama.permute_qk_half_to_interleaved)
    out = forward_jit(p_int, t, cfg.replace(rope_style="interleaved"))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    # ... and the wrong pairing really is a different model
    wrong = forward_jit(p, t, cfg.replace(rope_style="interleaved"))
    assert float(jnp.abs(wrong - ref).max()) > 1e-2
    back = _perm_qk(p_int, cfg, llama.permute_qk_interleaved_to_half)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(p)):
        np.testing.assert_array_equal(a, b)


def test_rope_matches_complex_rotation():
    cfg = _cfg()
    T, d = 7, cfg.head_dim
    x = jax.random.normal(jax.random.key(3), (1, T, 1, d))
    inv = llama.rope_inv_freq(cfg)
    cos, sin = common.rope_tables(jnp.arange(T), inv)
    rot = np.exp(1j * np.arange(T)[:, None] * inv[None, :])                  # (T, d/2)
    xi = np.asarray(x[0, :, 0])
    z = (xi[:, 0::2] + 1j * xi[:, 1::2]) * rot                              # adjacent pairs
    got = np.asarray(llama.apply_rope(x, cos, sin, "interleaved")[0, :, 0])
    np.testing.assert_allclose(got[:, 0::2], z.real, atol=1e-5)
    np.testing.assert_allclose(got[:, 1::2], z.imag, atol=1e-5)
    z = (xi[:, : d // 2] + 1j * xi[:, d // 2:]) * rot                       # half-split pairs
    got = np.asarray(llama.apply_rope(x, cos, sin, "half")[0, :, 0])
    np.testing.assert_allclose(got[:, : d // 2], z.real, atol=1e-5)
    np.testing.assert_allclose(got[:, d // 2:], z.imag, atol=1e-5)


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_gqa_equals_mha_with_repeated_kv_heads(kv):
    cfg = _cfg(num_kv_heads=kv)
    p = init_params(jax.random.key(kv), cfg)
    rep = cfg.num_heads // kv
    mha_cfg = cfg.replace(num_kv_heads=cfg.num_heads)
    p_mha = jax.tree_util.tree_map(lambda x: x, p)
    for layer in p_mha["layers"]:
        for name in ("k_proj", "v_proj"):
            w = layer["self_attn"][name].reshape(kv, cfg.head_dim, cfg.hidden_size)
            layer["self_attn"][name] = jnp.repeat(w, rep, axis=0).reshape(-1, cfg.hidden_size)
    t = _tokens()
    np.testing.assert_allclose(forward_jit(p, t, cfg), forward_jit(p_mha, t, mha_cfg), atol=2e-5, rtol=1e-5)


def _naive_attention_forward(p, tokens, cfg):
    """A loop-per-head reference (HF-style): repeat kv heads, full softmax, then SwiGLU."""
    def norm(x, w):
        return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps)
    x = np.asarray(p["embed_tokens"])[np.asarray(tokens)]
    T, d, H = tokens.shape[1], cfg.head_dim, cfg.num_heads
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2) / d)
    ang = np.arange(T)[:, None] * inv[None]
    cos, sin = np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)

    def rope(z):
        rot = np.concatenate([-z[..., d // 2:], z[..., : d // 2]], -1)
        return z * cos[None, :, None] + rot * sin[None, :, None]
    for L in p["layers"]:
        a, m = {k: np.asarray(v) for k, v in L["self_attn"].items()}, {k: np.asarray(v) for k, v in L["mlp"].items()}
        h = norm(x, np.asarray(L["input_layernorm"]))
        q = rope((h @ a["q_proj"].T).reshape(*h.shape[:2], H, d))
        k = rope((h @ a["k_proj"].T).reshape(*h.shape[:2], -1, d))
        v = (h @ a["v_proj"].T).reshape(*h.shape[:2], -1, d)
        k, v = np.repeat(k, H // k.shape[2], 2), np.repeat(v, H // v.shape[2], 2)
        s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        o = np.einsum("bhts,bshd->bthd", pr, v).reshape(*h.shape[:2], -1)
        x = x + o @ a["o_proj"].T
        h2 = norm(x, np.asarray(L["post_attention_layernorm"]))
        g = h2 @ m["gate_proj"].T
        x = x + ((g / (1 + np.exp(-g))) * (h2 @ m["up_proj"].T)) @ m["down_proj"].T
    x = norm(x, np.asarray(p["norm"]))
    return x @ np.asarray(p["lm_head"]).T


def test_forward_matches_naive_reference():
    cfg = _cfg()
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), init_params(jax.random.key(7), cfg))
    t = _tokens(T=40, B=1)
    ref = _naive_attention_forward(p, t, cfg)
    pj = jax.tree_util.tree_map(jnp.asarray, p)
    np.testing.assert_allclose(forward_jit(pj, t, cfg), ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 5])
def test_chunked_causal_attention_equals_one_softmax(window):
    cfg = _cfg(sliding_window=window)
    T = 37
    k1, k2, k3 = jax.random.split(jax.random.key(8), 3)
    q = jax.random.normal(k1, (2, T, cfg.num_heads, cfg.head_dim))
    k = jax.random.normal(k2, (2, T, cfg.num_kv_heads, cfg.head_dim))
    v = jax.random.normal(k3, (2, T, cfg.num_kv_heads, cfg.head_dim))
    pos = jnp.arange(T)
    scale = llama.layer_spec(cfg).scale
    full = jax.jit(lambda q, k, v: common.attend(q, k, v, common.causal_mask(pos, pos, window), scale))(q, k, v)
    chunked = jax.jit(lambda q, k, v: common.causal_self_attend(q, k, v, pos, scale, window, chunk=8))(q, k, v)
    np.testing.assert_allclose(chunked, full, atol=1e-5, rtol=1e-5)
    if window is not None:   # the window really restricts attention
        nowin = common.attend(q, k, v, common.causal_mask(pos, pos, None), scale)
        assert float(jnp.abs(nowin - full)[:, window:].max()) > 1e-3
        np.testing.assert_allclose(nowin[:, :window], full[:, :window], atol=1e-6)


def test_causal_future_tokens_do_not_change_past_logits():
    cfg = _cfg()
    p = init_params(jax.random.key(1), cfg)
    t = _tokens(T=16, B=1)
    t2 = t.at[0, 9].set((t[0, 9] + 1) % V)
    a, b = forward_jit(p, t, cfg), forward_jit(p, t2, cfg)
    np.testing.assert_array_equal(a[:, :9], b[:, :9])
    assert float(jnp.abs(a[:, 9:] - b[:, 9:]).max()) > 1e-3


@pytest.mark.parametrize("tied", [False, True])
def test_forward_equals_embed_blocks_head_and_jit_variants(tied):
    cfg = _cfg(tie_word_embeddings=tied)
    p = init_params(jax.random.key(2), cfg)
    assert ("lm_head" in p) != tied
    t = _tokens()
    x = embed(p, t, cfg)
    for layer in p["layers"]:
        x = block(layer, x, cfg)
    ref = head(p, x, cfg)
    assert ref.dtype == jnp.float32 and ref.shape == (2, 12, V)
    np.testing.assert_allclose(forward(p, t, cfg), ref, atol=1e-6)
    np.testing.assert_allclose(forward_jit(p, t, cfg), ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(forward_layerwise(p, t, cfg), ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(forward(p, t[0], cfg), ref[0], atol=1e-6)


def test_param_paths_are_hf_like():
    cfg = _cfg(qkv_bias=True)
    flat = flatten(init_params(jax.random.key(0), cfg))
    assert {"embed_tokens", "norm", "lm_head", "layers/1/self_attn/q_proj", "layers/1/mlp/down_proj",
            "layers/0/input_layernorm", "layers/0/post_attention_layernorm",
            "layers/0/self_attn/q_bias"} <= set(flat)
    assert flat["layers/0/self_attn/q_proj"].shape == (32, 32)
    assert flat["layers/0/self_attn/k_proj"].shape == (16, 32)
    assert flat["layers/0/mlp/down_proj"].shape == (32, 48)


def test_block_capture_returns_the_exact_linear_inputs(monkeypatch):
    cfg = _cfg(qkv_bias=True)
    p = init_params(jax.random.key(4), cfg)
    layer = p["layers"][0]
    x = embed(p, _tokens(), cfg)
    seen = {}
    real = ops.linear
    ids = {id(layer["self_attn"][n.split("/")[1]] if n.startswith("self_attn") else layer["mlp"][n.split("/")[1]]): n
           for n in LINEARS}

    def spy(xx, w, bias=None):
        seen[ids[id(w)]] = xx
        return real(xx, w, bias)

    monkeypatch.setattr(ops, "linear", spy)
    out, inputs = block(layer, x, cfg, capture=True)
    monkeypatch.setattr(ops, "linear", real)
    assert set(inputs) == set(LINEARS) == set(seen)
    for name in LINEARS:
        np.testing.assert_array_equal(inputs[name], seen[name])
        assert inputs[name].shape == (2, 12, (cfg.intermediate_size if name == "mlp/down_proj" else
                                              cfg.num_heads * cfg.head_dim if name == "self_attn/o_proj"
                                              else cfg.hidden_size))
    np.testing.assert_array_equal(out, block(layer, x, cfg))


def test_quantized_model_runs_through_ops_linear_and_is_close():
    cfg = _cfg()
    p = init_params(jax.random.key(5), cfg)
    recipe = partition([(r"_proj$", rtn(QuantSpec(bits=8, group_size=None))), (r".*", identity())])
    q = quantize_params(p, recipe)
    assert isinstance(q["layers"][1]["mlp"]["down_proj"], QuantizedTensor)
    assert not isinstance(q["lm_head"], QuantizedTensor)
    t = _tokens()
    ref, out = forward_jit(p, t, cfg), forward_jit(q, t, cfg)
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 0.02, rel
    assert float(jnp.mean(jnp.argmax(out, -1) == jnp.argmax(ref, -1))) > 0.9
    # a quantized embedding table works too (tied head)
    ct = cfg.replace(tie_word_embeddings=True)
    pt = init_params(jax.random.key(5), ct)
    qt = quantize_params(pt, partition([(r"embed_tokens", rtn(QuantSpec(bits=8, group_size=None)))]))
    ref_t = forward_jit(pt, t, ct)
    rel = float(jnp.linalg.norm(forward_jit(qt, t, ct) - ref_t) / jnp.linalg.norm(ref_t))
    assert rel < 0.02


def test_bfloat16_compute_is_close_to_float32():
    cfg = _cfg()
    p = init_params(jax.random.key(6), cfg)
    t = _tokens()
    ref = forward_jit(p, t, cfg)
    pb = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), p)
    out = forward_jit(pb, t, cfg.replace(dtype="bfloat16"))
    assert out.dtype == jnp.float32
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 0.05


def test_forward_errors():
    cfg = _cfg()
    p = init_params(jax.random.key(0), cfg)
    with pytest.raises(ValueError, match="exceeds the model's context max_position_embeddings=64"):
        forward(p, jnp.zeros((1, 65), jnp.int32), cfg)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 320\)"):
        forward(p, jnp.full((1, 4), V), cfg)
    with pytest.raises(ValueError, match="missing layers/1/mlp/up_proj"):
        bad = jax.tree_util.tree_map(lambda x: x, p)
        del bad["layers"][1]["mlp"]["up_proj"]
        llama.check_params(bad, cfg)


# ----------------------------------------------------------------------------- generation

def _greedy_by_full_forward(p, cfg, prompt, n):
    """Greedy decoding by full forwards over a fixed-size buffer (one compilation): the tokens
    after the current position are placeholders, which a causal model never looks at."""
    prompt = np.asarray(prompt)
    P = prompt.shape[1]
    seq = np.concatenate([prompt, np.zeros((prompt.shape[0], n), prompt.dtype)], 1)
    for i in range(n):
        logits = forward_jit(p, seq, cfg)
        seq[:, P + i] = np.asarray(jnp.argmax(logits[:, P + i - 1], -1))
    return seq


def test_generate_greedy_matches_repeated_full_forward():
    from lowbit.eval.generate import generate

    cfg = _cfg(num_layers=1)
    p = init_params(jax.random.key(9), cfg)
    prompt = _tokens(T=5, B=2)
    out = generate(p, cfg, prompt, 8, temperature=0.0)
    np.testing.assert_array_equal(out, _greedy_by_full_forward(p, cfg, prompt, 8))
    # top_k=1 sampling is greedy too; 1-D prompts give 1-D output
    out1 = generate(p, cfg, prompt[0], 8, jax.random.key(0), temperature=0.7, top_k=1)
    np.testing.assert_array_equal(out1, out[0])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(p, cfg, prompt, 60, temperature=0.0)


def test_generate_sampling_and_self_generated_calibration():
    from lowbit.eval.generate import generate, self_generated_calibration

    cfg = _cfg(num_layers=1)
    p = init_params(jax.random.key(10), cfg)
    a = generate(p, cfg, _tokens(T=3, B=2), 10, jax.random.key(1))
    b = generate(p, cfg, _tokens(T=3, B=2), 10, jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 13) and a.dtype == jnp.int32
    cal = self_generated_calibration(p, cfg, nsamples=5, seqlen=12, key=jax.random.key(2), batch_size=2,
                                     n_greedy=3, progress=False)
    assert cal.shape == (5, 12) and cal.dtype == np.int32
    assert not np.isin(cal[:, 0], [cfg.bos_token_id, cfg.eos_token_id]).any()
    assert len(set(cal[:, 0].tolist())) > 1
    # tokens 1..n_greedy are the greedy continuation of the first token
    greedy = _greedy_by_full_forward(p, cfg, cal[:, :1], 3)
    np.testing.assert_array_equal(cal[:, :4], greedy)
    cal2 = self_generated_calibration(p, cfg, nsamples=5, seqlen=12, key=jax.random.key(2), batch_size=2,
                                      n_greedy=3, progress=False)
    np.testing.assert_array_equal(cal, cal2)
    bos = self_generated_calibration(p, cfg, 2, 12, jax.random.key(3), batch_size=2, n_greedy=3,
                                     first_token="bos", progress=False)
    assert (bos[:, 0] == cfg.bos_token_id).all()


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_chunked_encoding_equals_whole_text(tiny_tokenizer):
    tk = tiny_tokenizer
    assert tk.chunk_safe
    pieces = ["The quick brown fox.", "  \n\n  Two spaces", "\n\nParagraph", " 1811 and 42 cats",
              "\t\ttabs\n x", "café 東京 🙂", "Mr. Darcy's", "   ", "\n", "a  b   c", " 7 8  9x",
              "<|im_start|>hello<|endoftext|>", "end\n  \nstart", "word\u00a0nbsp"]
    rng = np.random.default_rng(0)
    text = "".join(pieces[i] for i in rng.integers(0, len(pieces), 3000))
    whole = np.asarray(tk.tk.encode(text, add_special_tokens=False).ids, np.int32)
    tk.chunk_chars = 97                                   # many chunk boundaries
    try:
        got = tk.encode(text)
        assert len(tk._chunks(text)) > 50
    finally:
        tk.chunk_chars = 1 << 16
    np.testing.assert_array_equal(got, whole)
    assert tk.decode(got) == text
    assert tk.encode("<|im_start|>x")[0] == 1             # control tokens stay whole


def test_tokenizer_bos_eos_and_json_round_trip(tiny_tokenizer):
    from lowbit.data.tokenizer import Tokenizer

    tk = tiny_tokenizer
    ids = tk.encode("hello world", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 0 and ids.dtype == np.int32
    tk2 = Tokenizer.from_json(tk.to_json())
    assert (tk2.bos_id, tk2.eos_id, tk2.vocab_size) == (1, 0, tk.vocab_size)
    np.testing.assert_array_equal(tk2.encode("Mr. Darcy 1811"), tk.encode("Mr. Darcy 1811"))
    with pytest.raises(ValueError, match="lowbit-tokenizer"):
        Tokenizer.from_json('{"format": "x"}')
    with pytest.raises(ValueError, match="pre-tokenizer 'qwen2' is not supported"):
        Tokenizer.from_gguf_vocab(["a"], [], pre="qwen2")
    with pytest.raises(ValueError, match="model 'llama' is not supported"):
        Tokenizer.from_gguf_vocab(["a"], [], model="llama")


# ----------------------------------------------------------------------------- GGUF

def _write_tiny_gguf(path, p, cfg, tiny_bpe, arch="llama", permute=True):
    import gguf

    tokens, merges, types = tiny_bpe
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    names = {"embed_tokens": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight"}
    layer_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                   "self_attn/q_proj": "attn_q", "self_attn/k_proj": "attn_k", "self_attn/v_proj": "attn_v",
                   "self_attn/o_proj": "attn_output", "mlp/gate_proj": "ffn_gate", "mlp/up_proj": "ffn_up",
                   "mlp/down_proj": "ffn_down"}
    for path_, a in flatten(p).items():
        a = np.asarray(a, np.float32)
        if path_.startswith("layers/"):
            _, i, rest = path_.split("/", 2)
            if permute and rest in ("self_attn/q_proj", "self_attn/k_proj"):
                a = llama.permute_qk_half_to_interleaved(a, cfg.num_heads if "q_" in rest else cfg.num_kv_heads)
            name = f"blk.{i}.{layer_names[rest]}.weight"
        else:
            name = names[path_]
        w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_load_gguf_tiny_unpermutes_qk_and_reads_metadata(tmp_path, tiny_bpe):
    from lowbit.models.loaders import load_gguf, load_model

    cfg = _cfg(vocab_size=len(tiny_bpe[0]), bos_token_id=1, eos_token_id=0)
    p = init_params(jax.random.key(11), cfg)
    fn = tmp_path / "tiny.gguf"
    _write_tiny_gguf(fn, p, cfg, tiny_bpe)
    p2, cfg2, tok = load_model(str(fn))
    assert cfg2.replace(rms_norm_eps=cfg.rms_norm_eps) == cfg
    for a, b in zip(jax.tree_util.tree_leaves(p2), jax.tree_util.tree_leaves(p)):
        np.testing.assert_array_equal(a, b)
    # as stored (interleaved rows) + interleaved RoPE is the same model
    p3, cfg3, _ = load_gguf(str(fn), unpermute_qk=False)
    assert cfg3.rope_style == "interleaved"
    t = _tokens()
    np.testing.assert_allclose(forward_jit(p3, t, cfg3), forward_jit(p2, t, cfg2), atol=2e-5, rtol=1e-5)
    assert tok.bos_id == 1 and tok.vocab_size == len(tiny_bpe[0])
    text = "Mr. Darcy's 1811 cats"
    np.testing.assert_array_equal(tok.encode(text), np.asarray(
        _ref_tokenizer(tiny_bpe).encode(text).ids, np.int32))


def _ref_tokenizer(tiny_bpe):
    """The same BPE assembled independently (the trainer's own pipeline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokens, merges, _ = tiny_bpe
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges]))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return tk


def test_gguf_errors(tmp_path, tiny_bpe):
    from lowbit.models.loaders import load_gguf, load_model

    cfg = _cfg(vocab_size=len(tiny_bpe[0]), num_layers=1)
    fn = tmp_path / "g.gguf"
    _write_tiny_gguf(fn, init_params(jax.random.key(0), cfg), cfg, tiny_bpe, arch="falcon")
    with pytest.raises(ValueError, match=r"architecture 'falcon' is not supported; supported: .*'llama'"):
        load_model(str(fn))
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_gguf(str(tmp_path / "nope.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_gguf(str(bad))


# ----------------------------------------------------------------------------- HF directories

def _hf_state(p, cfg):
    st = {"model.embed_tokens.weight": p["embed_tokens"], "model.norm.weight": p["norm"]}
    if not cfg.tie_word_embeddings:
        st["lm_head.weight"] = p["lm_head"]
    for i, L in enumerate(p["layers"]):
        pre = f"model.layers.{i}."
        st[pre + "input_layernorm.weight"] = L["input_layernorm"]
        st[pre + "post_attention_layernorm.weight"] = L["post_attention_layernorm"]
        for k, v in L["self_attn"].items():
            st[pre + "self_attn." + (k if k.endswith("proj") else k[0] + "_proj") + (".weight" if k.endswith("proj") else ".bias")] = v
        for k, v in L["mlp"].items():
            st[pre + f"mlp.{k}.weight"] = v
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in st.items()}


def _hf_config(cfg, model_type="llama"):
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[model_type]
    d = {"model_type": model_type, "architectures": [arch], "vocab_size": cfg.vocab_size,
         "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
         "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
         "num_key_value_heads": cfg.num_kv_heads, "max_position_embeddings": cfg.max_position_embeddings,
         "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "hidden_act": "silu",
         "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
         "eos_token_id": cfg.eos_token_id, "torch_dtype": "float32", "attention_bias": False}
    if model_type == "mistral":
        d["sliding_window"] = cfg.sliding_window
    if model_type == "qwen2":
        d.update(use_sliding_window=False, sliding_window=None)
    return d


def _write_hf_dir(path, p, cfg, model_type="llama", shards=1, tokenizer=None):
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_hf_config(cfg, model_type), f)
    st = _hf_state(p, cfg)
    if shards == 1:
        save_file(st, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        names = sorted(st)
        wm = {}
        for s in range(shards):
            fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: st[k] for k in names[s::shards]}
            save_file(part, os.path.join(path, fn), metadata={"format": "pt"})
            wm.update({k: fn for k in part})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": wm}, f)
    if tokenizer is not None:
        tokenizer.tk.save(os.path.join(path, "tokenizer.json"))
    return path


HF_CASES = [("llama", dict(), 1), ("llama", dict(tie_word_embeddings=True, num_kv_heads=1), 3),
            ("qwen2", dict(qkv_bias=True), 2), ("mistral", dict(sliding_window=6), 1)]


@pytest.mark.parametrize("model_type,kw,shards", HF_CASES)
def test_hf_dir_loader_matches_transformers(tmp_path, model_type, kw, shards, tiny_tokenizer):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lowbit.models.loaders import load_model

    cfg = _cfg(model_type=model_type, **kw)
    p = init_params(jax.random.key(12), cfg)
    d = _write_hf_dir(str(tmp_path / "m"), p, cfg, model_type, shards, tokenizer=tiny_tokenizer)
    p2, cfg2, tok = load_model(d)
    assert cfg2 == cfg
    t = _tokens(T=20)
    ours = np.asarray(forward_jit(p2, t, cfg2))
    cls = getattr(transformers, _hf_config(cfg, model_type)["architectures"][0])
    ref_model = cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor(np.asarray(t), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)
    assert tok is not None and tok.bos_id == cfg.bos_token_id


def test_hf_dir_errors(tmp_path):
    from lowbit.models.loaders import load_hf_dir, load_model

    cfg = _cfg()
    p = init_params(jax.random.key(0), cfg)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_dir(str(tmp_path / "empty"))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"],
                                                  "hidden_size": 384}))
    with pytest.raises(ValueError, match=r"model_type='bert'.*not supported.*llama"):
        load_model(str(bert))
    d = _write_hf_dir(str(tmp_path / "trunc"), p, cfg)
    fn = os.path.join(d, "model.safetensors")
    with open(fn, "r+b") as f:
        f.truncate(os.path.getsize(fn) // 2)
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt or truncated safetensors"):
        load_model(d)
    os.remove(fn)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
        load_model(d)
    from safetensors.numpy import save_file
    st = _hf_state(p, cfg)
    del st["model.layers.1.mlp.up_proj.weight"]
    save_file(st, fn)
    with pytest.raises(ValueError, match="missing tensors.*layers/1/mlp/up_proj"):
        load_model(d)


def test_hub_name_fails_fast_offline(monkeypatch):
    pytest.importorskip("huggingface_hub")
    from lowbit.models import loaders, resolve

    monkeypatch.setattr(resolve, "_hub_reachable", lambda endpoint, timeout=5.0: "probe refused (test)")
    t = time.perf_counter()
    with pytest.raises(RuntimeError, match="Offline options: 'smollm2-135m'"):
        loaders.load_model("HuggingFaceTB/SmolLM2-135M-not-cached")
    assert time.perf_counter() - t < 30


# ----------------------------------------------------------------------------- lowbit checkpoints

def test_save_model_load_model_round_trip_quantized(tmp_path, tiny_tokenizer):
    from lowbit.models.loaders import load_model, save_model

    cfg = _cfg(vocab_size=tiny_tokenizer.vocab_size)
    p = init_params(jax.random.key(13), cfg)
    q = quantize_params(p, partition([(r"self_attn/.*_proj$", rtn(QuantSpec(bits=4, group_size=16))),
                                      (r"mlp", rtn(QuantSpec(bits=8, group_size=None)))]))
    d = save_model(str(tmp_path / "ck"), q, cfg, tiny_tokenizer, extra={"recipe": "test"})
    from lowbit.io.checkpoint import read_extra
    extra = read_extra(d)
    assert extra["recipe"] == "test" and extra["model_config"] == cfg.to_dict()
    q2, cfg2, tok2 = load_model(d)
    assert cfg2 == cfg
    assert isinstance(q2["layers"][0]["self_attn"]["q_proj"], QuantizedTensor)
    t = _tokens()
    np.testing.assert_allclose(forward_jit(q2, t, cfg2), forward_jit(q, t, cfg), atol=1e-6)
    np.testing.assert_array_equal(tok2.encode("a cat 12"), tiny_tokenizer.encode("a cat 12"))
    with pytest.raises(ValueError, match="reserved"):
        save_model(str(tmp_path / "ck2"), q, cfg, None, extra={"model_config": 1})
