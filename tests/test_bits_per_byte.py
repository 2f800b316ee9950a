"""Tokenizer-free metric: bits per byte = total NLL (bits) / UTF-8 bytes of the predicted text."""

from __future__ import annotations

import math

import pytest

from conftest import _TRAIN_TEXT


def test_token_bytes_sum_to_the_utf8_length_of_the_text(tiny_tokenizer):
    ids = tiny_tokenizer.encode(_TRAIN_TEXT)
    nb = tiny_tokenizer.token_bytes()
    assert nb.shape == (tiny_tokenizer.vocab_size,)
    assert int(nb[ids].sum()) == len(_TRAIN_TEXT.encode("utf-8"))

    special = tiny_tokenizer.token_to_id("<|endoftext|>")
    assert nb[special] == 0


def test_sentencepiece_style_vocab_counts_metaspace_and_byte_tokens():
    from tokenizers import Tokenizer as Tk, models

    from lowbit.data.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "\u2581the": 1, "<0xE2>": 2, "caf\u00e9": 3, "\u2581": 4}
    tk = Tokenizer(Tk(models.WordLevel(vocab=vocab, unk_token="<unk>")))
    nb = tk.token_bytes()
    assert list(nb[[1, 2, 3, 4]]) == [4, 1, 5, 1]


def test_perplexity_reports_bits_per_byte(tiny_tokenizer):
    import jax

    from lowbit.eval.likelihood import perplexity
    from lowbit.models.llama import LlamaConfig, init_params

    cfg = LlamaConfig(vocab_size=tiny_tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=2, num_kv_heads=1, max_position_embeddings=64)
    params = init_params(jax.random.key(0), cfg)
    ids = tiny_tokenizer.encode(_TRAIN_TEXT * 2)
    r = perplexity(params, cfg, ids, seqlen=32, progress=False, token_bytes=tiny_tokenizer.token_bytes())
    windows = ids[: r["n_windows"] * 32].reshape(-1, 32)
    want_bytes = int(tiny_tokenizer.token_bytes()[windows[:, 1:]].sum())
    assert r["n_bytes"] == want_bytes
    assert r["bits_per_byte"] == pytest.approx(r["nll"] * r["n_tokens"] / math.log(2) / want_bytes, rel=1e-12)
    assert "bits_per_byte" not in perplexity(params, cfg, ids, seqlen=32, progress=False)


def test_bos_windows_predict_every_text_token(tiny_tokenizer):
    import jax

    from lowbit.eval import perplexity
    from lowbit.models.llama import LlamaConfig, init_params

    cfg = LlamaConfig(vocab_size=tiny_tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=2, num_kv_heads=1, max_position_embeddings=64)
    params = init_params(jax.random.key(0), cfg)
    ids = tiny_tokenizer.encode(_TRAIN_TEXT * 2)
    nb = tiny_tokenizer.token_bytes()
    r = perplexity(params, cfg, ids, seqlen=32, progress=False, token_bytes=nb, bos_id=1, return_nlls=True)
    n = len(ids) // 31
    assert r["n_windows"] == n and r["seqlen"] == 32 and r["n_tokens"] == n * 31
    assert r["n_bytes"] == int(nb[ids[: n * 31]].sum())          # every text token is predicted once
    # the same windows pre-cut: identical
    pre = perplexity(params, cfg, ids[: n * 31].reshape(n, 31), seqlen=32, progress=False, bos_id=1)
    assert pre["nll"] == r["nll"]
    with pytest.raises(ValueError, match="bos_id"):
        perplexity(params, cfg, ids, seqlen=32, progress=False, bos_id=10**6)
