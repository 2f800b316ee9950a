"""Shared pytest fixtures: a tiny byte-level BPE tokenizer (fast tests) and the real SmolLM2-135M
GGUF loaded once per session (tests marked ``slow``; pyproject's ``addopts`` deselects them by
default, select them with ``pytest -m slow``)."""

from __future__ import annotations

import json

import pytest

_TRAIN_TEXT = """The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst
of times; in 1811 there were 3 sisters and 42 cats.   Mr. Darcy's  "pride" and Elizabeth's prejudice!
\tTabs, newlines\n\nand   multiple    spaces... 2024-01-02 12:34 ~ $100 (approx.) e-mail: a@b.c
Ünïcödé wörds, naïve café, 東京 and emoji 🙂 are byte-level encoded.
"""


def train_tiny_bpe(vocab_size: int = 320):
    """A byte-level BPE trained on a few lines -> (tokens in id order, merges 'a b', token_types)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([_TRAIN_TEXT] * 4, trainer)
    spec = json.loads(tk.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    types = [3 if t.startswith("<|") else 1 for t in tokens]
    return tokens, merges, types


@pytest.fixture(scope="session")
def tiny_bpe():
    return train_tiny_bpe()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_bpe):
    from lowbit.data.tokenizer import Tokenizer

    tokens, merges, types = tiny_bpe
    return Tokenizer.from_gguf_vocab(tokens, merges, token_types=types, model="gpt2", pre="smollm",
                                     bos_id=1, eos_id=0)


@pytest.fixture(scope="session")
def smollm2_path():
    from lowbit.io import assets

    return assets.smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(params, cfg, tokenizer) of the real SmolLM2-135M GGUF, loaded once per session."""
    from lowbit.models.loaders import load_gguf

    return load_gguf(smollm2_path)


def pytest_configure(config):
    """CI installs the [torch] extra and sets LOWBIT_REQUIRE_TORCH=1: the reference cross-checks
    must then run, not skip quietly."""
    import os

    if os.environ.get("LOWBIT_REQUIRE_TORCH") == "1":
        import torch  # noqa: F401
        import transformers  # noqa: F401
