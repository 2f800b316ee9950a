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


WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge "
         "boxing matches and jovial kings pack my box with five dozen liquor jugs").split()


@pytest.fixture(scope="session")
def tiny_experiment(tmp_path_factory):
    """A tiny saved Llama model + corpus + config (fp / rtn / gptq rows): (root, config path)."""
    import jax
    import numpy as np
    import yaml
    from tokenizers import Tokenizer as Tk, models, pre_tokenizers, trainers

    from lowbit.data.tokenizer import Tokenizer
    from lowbit.models import llama
    from lowbit.models.loaders import save_model

    root = tmp_path_factory.mktemp("exp")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(400):
        lines.append(" ".join(rng.choice(WORDS, size=rng.integers(5, 15))) + ".")
        if i % 7 == 6:
            lines.append("")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(lines))
    tk = Tk(models.BPE(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train([str(corpus)], trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]"]))
    cfg = llama.LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=64, intermediate_size=128,
                            num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=64)
    save_model(str(root / "model"), llama.init_params(jax.random.key(0), cfg), cfg, Tokenizer(tk))
    conf = {"experiment": "tiny", "model": str(root / "model"), "seed": 3,
            "calib": {"data": str(corpus), "nsamples": 8, "seqlen": 32, "batch_size": 4},
            "eval": {"data": [str(corpus)], "seqlen": 32, "max_windows": 4, "batch_size": 2},
            "methods": [{"name": "fp", "method": "fp"},
                        {"name": "rtn-w3g32", "method": "rtn", "quant": {"bits": 3, "group_size": 32}},
                        {"name": "gptq-w3g32", "method": "gptq", "quant": {"bits": 3, "group_size": 32}}],
            "variants": {"small": {"eval": {"max_windows": 2}}}}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(conf))
    return root, path


# A skip for a missing package says one of these (pytest.importorskip, or a test's own
# "X not importable" skip); with LOWBIT_REQUIRE_EXTRAS=1 (set by .ci/run, which installs the
# [test,torch] extras) such a skip is a failure: the cross-checks the extras promise must run.
_MISSING_PACKAGE = ("could not import", "not importable")


def _extras_required() -> bool:
    import os

    return os.environ.get("LOWBIT_REQUIRE_EXTRAS") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and _extras_required() and call.excinfo is not None:
        msg = str(call.excinfo.value)
        if any(s in msg for s in _MISSING_PACKAGE):
            rep.outcome = "failed"
            rep.longrepr = (f"LOWBIT_REQUIRE_EXTRAS=1: skipped for a package the [test,torch] extras "
                            f"install: {msg}")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop jax's compiled programs after each test module. One pytest process compiles thousands
    of XLA:CPU executables; kept alive they exhaust the kernel's memory-map limit
    (vm.max_map_count, 65530 by default) and LLVM's JIT then crashes the process (a segfault
    inside backend_compile late in the suite). Modules share nothing compiled, so nothing is lost."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
