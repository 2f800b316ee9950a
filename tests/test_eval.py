"""Perplexity protocol, logit comparison and the ``lowbit eval`` CLI."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.eval.likelihood import compare_logits, make_windows, perplexity
from lowbit.models.llama import LlamaConfig, forward_jit, init_params

V = 97


@pytest.fixture(scope="module")
def tiny():
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=32)
    return init_params(jax.random.key(0), cfg), cfg


def _stream(n, seed=0):
    return np.random.default_rng(seed).integers(0, V, n).astype(np.int32)


def test_ppl_equals_hand_computation_of_the_gptq_protocol(tiny):
    p, cfg = tiny
    seqlen, tokens = 16, _stream(3 * 16 + 5)                   # 3 windows + a 5-token tail
    res = perplexity(p, cfg, tokens, seqlen=seqlen, batch_size=2, progress=False, return_nlls=True)
    nlls, per_window = [], []
    for i in range(3):
        w = tokens[i * seqlen:(i + 1) * seqlen]
        logits = np.asarray(forward_jit(p, w[None], cfg)[0], np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nll = -logp[np.arange(seqlen - 1), w[1:]]              # positions 1..15 from 0..14
        nlls.append(nll)
        per_window.append(nll.mean())
    hand = math.exp(np.concatenate(nlls).astype(np.float64).mean())
    assert res["n_windows"] == 3 and res["n_tokens"] == 3 * 15 and res["seqlen"] == 16
    assert res["ppl"] == pytest.approx(hand, rel=1e-5)
    # GPTQ's formula: exp(sum_i loss_i * seqlen / (n * seqlen)) is the same number
    gptq = math.exp(sum(l * seqlen for l in per_window) / (3 * seqlen))
    assert res["ppl"] == pytest.approx(gptq, rel=1e-5)
    np.testing.assert_allclose(res["nlls"], np.stack(nlls), atol=1e-5)
    assert res["nll"] == pytest.approx(math.log(res["ppl"]))
    assert 0.0 <= res["top1_acc"] <= 1.0 and res["tokens_per_s"] > 0 and res["wall_s"] > 0


def test_batch_size_and_prewindowed_input_do_not_change_the_result(tiny):
    p, cfg = tiny
    tokens = _stream(5 * 8 + 3, seed=1)
    ref = perplexity(p, cfg, tokens, seqlen=8, batch_size=1, progress=False)
    for bs in (2, 3, 5, 8):                                     # 3 pads the last batch
        assert perplexity(p, cfg, tokens, seqlen=8, batch_size=bs, progress=False)["ppl"] == \
            pytest.approx(ref["ppl"], rel=1e-6)
    win = make_windows(tokens, 8)
    assert perplexity(p, cfg, win, batch_size=2, progress=False)["ppl"] == pytest.approx(ref["ppl"], rel=1e-6)
    two = perplexity(p, cfg, tokens, seqlen=8, max_windows=2, progress=False)
    assert two["n_windows"] == 2
    assert two["ppl"] == pytest.approx(perplexity(p, cfg, win[:2], progress=False)["ppl"], rel=1e-6)


def test_uniform_model_has_ppl_equal_to_vocab_size(tiny):
    p, cfg = tiny
    flat = jax.tree_util.tree_map(lambda x: x, p)
    flat["lm_head"] = jnp.zeros_like(flat["lm_head"])           # logits all zero -> uniform
    res = perplexity(flat, cfg, _stream(64), seqlen=16, progress=False)
    assert res["ppl"] == pytest.approx(V, rel=1e-5)


def test_perplexity_errors(tiny):
    p, cfg = tiny
    with pytest.raises(ValueError, match="got 10 tokens, fewer than seqlen=16"):
        perplexity(p, cfg, _stream(10), seqlen=16, progress=False)
    with pytest.raises(ValueError, match="seqlen=64 exceeds the model's context max_position_embeddings=32"):
        perplexity(p, cfg, _stream(200), seqlen=64, progress=False)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 97\)"):
        perplexity(p, cfg, np.full(40, V, np.int32), seqlen=16, progress=False)
    with pytest.raises(ValueError, match="batch_size=0"):
        perplexity(p, cfg, _stream(40), seqlen=16, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="seqlen=1"):
        perplexity(p, cfg, _stream(40), seqlen=1, progress=False)


def test_compare_logits_self_is_zero_and_differs_for_other_model(tiny):
    p, cfg = tiny
    tokens = _stream(48)
    same = compare_logits(p, p, cfg, tokens, seqlen=16, batch_size=2, progress=False)
    assert abs(same["kl"]) < 1e-6 and same["top1_agreement"] == 1.0 and same["n_positions"] == 48
    other = init_params(jax.random.key(1), cfg)
    diff = compare_logits(p, other, cfg, tokens, seqlen=16, progress=False)
    assert diff["kl"] > 0.1 and diff["top1_agreement"] < 0.5


def test_cli_eval_writes_a_reproducible_record(tmp_path, tiny_tokenizer, capsys):
    data = pytest.importorskip("lowbit.data.corpora")
    from lowbit import cli
    from lowbit.models.loaders import save_model

    cfg = LlamaConfig(vocab_size=tiny_tokenizer.vocab_size, hidden_size=32, intermediate_size=48,
                      num_layers=1, num_heads=4, num_kv_heads=2, max_position_embeddings=64)
    ck = save_model(str(tmp_path / "ck"), init_params(jax.random.key(2), cfg), cfg, tiny_tokenizer)
    text_file = tmp_path / "t.txt"
    text_file.write_text("\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7}."
                                   for i in range(60)))
    out = tmp_path / "r" / "res.json"
    rc = cli.main(["eval", "--model", ck, "--data", str(text_file), "--split", "all", "--seqlen", "32",
                   "--max-windows", "3", "--batch-size", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert "ppl" in capsys.readouterr().out
    assert rec["protocol"]["n_windows"] == 3 and rec["n_tokens"] == 3 * 31
    assert rec["model"]["kind"] == "checkpoint" and len(rec["model"]["sha256"]) == 64
    assert rec["data"]["split"] == "all" and len(rec["data"]["text_sha256"]) == 64
    for k in ("jax", "jaxlib", "lowbit", "device_kind", "git_sha"):
        assert k in rec["env"]
    assert rec["peak_rss_mb"] > 0 and rec["timing"]["tokens_per_s"] > 0
    text = data.corpus_text(str(text_file), "all")
    windows = data.eval_windows(tiny_tokenizer.encode(text), 32, 3)
    from lowbit.models.loaders import load_model
    p, c, _ = load_model(ck)
    assert rec["ppl"] == pytest.approx(perplexity(p, c, windows, progress=False)["ppl"], rel=1e-6)
    # errors: one line on stderr, exit code 2
    rc = cli.main(["eval", "--model", ck, "--data", str(text_file), "--split", "all", "--seqlen", "128",
                   "--no-progress"])
    assert rc == 2 and "exceeds the model's context" in capsys.readouterr().err
    rc = cli.main(["eval", "--model", str(tmp_path / "nope"), "--data", str(text_file), "--no-progress"])
    assert rc == 2 and "no such file or directory" in capsys.readouterr().err


def test_cli_has_subcommand_registry():
    from lowbit import cli

    assert "eval" in cli.COMMANDS
    with pytest.raises(SystemExit):
        cli.main([])
    with pytest.raises(ValueError, match="already registered"):
        cli.register("eval", "x", lambda p: None, lambda a: 0)


# ----------------------------------------------------------------------------- real model (slow)

@pytest.mark.slow
def test_smollm2_brown_perplexity_is_sane_and_rope_style_matters(smollm2):
    from lowbit import data

    params, cfg, tok = smollm2
    tokens = tok.encode(data.corpus_text("brown", "eval"))
    res = perplexity(params, cfg, tokens, seqlen=512, max_windows=4, batch_size=2, progress=False)
    assert 5.0 < res["ppl"] < 60.0, res
    wrong = perplexity(params, cfg.replace(rope_style="interleaved"), tokens, seqlen=512, max_windows=2,
                       progress=False)
    assert wrong["ppl"] > 3 * res["ppl"], (wrong["ppl"], res["ppl"])
