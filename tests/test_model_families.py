"""Llama-family variants (Qwen2 q/k/v bias, Qwen3 q/k norm, Llama, Mistral sliding window) against
transformers on tiny random-weight models.

Each case builds a tiny HF model in torch (float32, eager attention), gives every parameter a
non-trivial random value (norm weights away from 1, non-zero biases), saves it with
``save_pretrained`` and loads it back with lowbit's own :func:`lowbit.models.loaders.load_hf_dir`,
then compares the logits of both implementations on random tokens.
"""

from __future__ import annotations

import math
import warnings

import jax
import numpy as np
import pytest

from lowbit.models.llama import LlamaConfig, forward_jit, init_params, shapes

V = 96
REL_TOL = 1e-4


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _hf_model(model_type: str, seed: int = 0, **kw):
    """A tiny transformers model with random, non-trivial float32 weights (eager attention)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cls_cfg, cls_model = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                          "mistral": ("MistralConfig", "MistralForCausalLM"),
                          "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                          "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[model_type]
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    base.update(kw)
    hf_cfg = getattr(transformers, cls_cfg)(**base)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, cls_model)(hf_cfg).to(torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):                  # input/post/final norms and q/k norms
                p.copy_(1.0 + 0.2 * z)
            elif name.endswith(".bias"):
                p.copy_(0.1 * z)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(z)
            else:                                               # linears (out, in), lm_head
                p.copy_(z / math.sqrt(p.shape[1]))
    return model


def _to_lowbit(model, tmp_path):
    """Save with transformers, load with lowbit's HF-directory loader -> (params, cfg)."""
    from lowbit.models.loaders import load_hf_dir

    d = str(tmp_path / "hf")
    model.save_pretrained(d, safe_serialization=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no tokenizer.json.*")
        params, cfg, _ = load_hf_dir(d)
    return params, cfg


def _hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def _tokens(B, T, seed=3):
    return np.asarray(jax.random.randint(jax.random.key(seed), (B, T), 0, V), np.int32)


# (model_type, HF config overrides, expected lowbit config fields, seq len)
CASES = [
    ("qwen2", dict(), dict(qkv_bias=True, o_bias=False, qk_norm=False), 24),
    ("qwen3", dict(head_dim=16), dict(qkv_bias=False, o_bias=False, qk_norm=True, head_dim=16), 24),
    ("qwen3", dict(head_dim=8, attention_bias=True, tie_word_embeddings=True, num_key_value_heads=1),
     dict(qkv_bias=True, o_bias=True, qk_norm=True, tie_word_embeddings=True, num_kv_heads=1), 24),
    ("llama", dict(tie_word_embeddings=True), dict(qkv_bias=False, qk_norm=False, tie_word_embeddings=True), 24),
    # T > sliding_window, and T > ATTN_CHUNK (128) so the chunked causal path clips keys too
    ("mistral", dict(sliding_window=24), dict(sliding_window=24, qk_norm=False), 160),
]


@pytest.mark.parametrize("model_type,hf_kw,want,T", CASES,
                         ids=["qwen2", "qwen3", "qwen3-bias-tied-mqa", "llama-tied", "mistral-window"])
def test_logits_match_transformers(tmp_path, model_type, hf_kw, want, T):
    model = _hf_model(model_type, **hf_kw)
    params, cfg = _to_lowbit(model, tmp_path)
    assert cfg.model_type == model_type
    for k, v in want.items():
        assert getattr(cfg, k) == v, (k, getattr(cfg, k), v)
    tokens = _tokens(2, T)
    ref = _hf_logits(model, tokens)
    ours = np.asarray(forward_jit(params, tokens, cfg))
    assert ours.shape == ref.shape
    err = _rel_err(ours, ref)
    assert err < REL_TOL, f"{model_type}: relative logit error {err:.2e}"
    if cfg.sliding_window is not None:   # the window really matters at this length
        full = np.asarray(forward_jit(params, tokens, cfg.replace(sliding_window=None)))
        assert _rel_err(full, ref) > 100 * REL_TOL
    if cfg.qk_norm:                      # and so do the q/k norm weights
        flat = jax.tree_util.tree_map(lambda x: x, params)
        for layer in flat["layers"]:
            layer["self_attn"]["q_norm"] = layer["self_attn"]["q_norm"] * 0 + 1
        assert _rel_err(np.asarray(forward_jit(flat, tokens, cfg)), ref) > 100 * REL_TOL


def _assert_greedy(logits, chosen, what):
    """``chosen`` is the arg-max of ``logits`` (up to float ties: within 1e-4 of the max)."""
    picked = np.take_along_axis(logits, chosen[..., None], -1)[..., 0]
    best = logits.max(-1)
    bad = picked < best - 1e-4 * (1 + np.abs(best))
    assert not bad.any(), f"{what}: {int(bad.sum())} tokens are not the arg-max"


def test_qwen3_kv_cache_greedy_generation_matches_full_forward(tmp_path):
    from lowbit.eval.generate import generate

    model = _hf_model("qwen3", seed=5, head_dim=16)
    params, cfg = _to_lowbit(model, tmp_path)
    assert cfg.qk_norm
    P, N = 6, 10
    prompt = _tokens(2, P, seed=7)
    out = np.asarray(generate(params, cfg, prompt, N, temperature=0))
    assert out.shape == (2, P + N) and (out[:, :P] == prompt).all()
    new = out[:, P:]
    ours = np.asarray(forward_jit(params, out[:, :-1], cfg))[:, P - 1:]    # predicts out[:, P:]
    _assert_greedy(ours, new, "lowbit full forward")
    _assert_greedy(_hf_logits(model, out[:, :-1])[:, P - 1:], new, "transformers forward")


def test_qwen3_config_shapes_and_export_round_trip():
    from lowbit.io.export import _hf_name, hf_config

    base = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
            "head_dim": 16, "model_type": "qwen3"}
    cfg = LlamaConfig.from_hf_config(base)
    assert cfg.qk_norm and not cfg.qkv_bias and not cfg.o_bias and cfg.head_dim == 16
    cfg_b = LlamaConfig.from_hf_config({**base, "attention_bias": True})
    assert cfg_b.qkv_bias and cfg_b.o_bias
    for bad in ({"use_sliding_window": True}, {"layer_types": ["full_attention", "sliding_attention"]}):
        with pytest.raises(ValueError, match="Qwen3 use_sliding_window"):
            LlamaConfig.from_hf_config({**base, **bad})
    assert not LlamaConfig.from_hf_config({**base, "model_type": "qwen2"}).qk_norm
    s = shapes(cfg)
    assert s["layers/1/self_attn/q_norm"] == (16,) and s["layers/1/self_attn/k_norm"] == (16,)
    assert "layers/0/self_attn/q_norm" not in shapes(cfg.replace(qk_norm=False))
    p = init_params(jax.random.key(0), cfg.replace(num_layers=1))
    qn = np.asarray(p["layers"][0]["self_attn"]["q_norm"])
    assert qn.shape == (16,) and 0.5 < qn.mean() < 1.5 and qn.std() > 0
    for c in (cfg, cfg_b):
        assert LlamaConfig.from_hf_config(hf_config(c)) == c
    assert hf_config(cfg)["architectures"] == ["Qwen3ForCausalLM"]
    assert _hf_name("layers/3/self_attn/k_norm") == "model.layers.3.self_attn.k_norm"
    with pytest.raises(ValueError, match="qk_norm"):
        hf_config(cfg.replace(model_type="llama"))
