"""Cross-check lowbit against transformers on the real SmolLM2-135M GGUF (slow; needs torch).

    pytest -m slow tests/test_torch_reference.py
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.torch]


@pytest.fixture(scope="module")
def hf(smollm2_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    d, name = os.path.dirname(smollm2_path), os.path.basename(smollm2_path)
    model = transformers.LlamaForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    return torch, model, tok


@pytest.fixture(scope="module")
def paragraphs():
    from lowbit import data

    out = []
    for corpus in ("brown", "austen"):
        text = data.corpus_text(corpus, "eval")
        paras = [p for p in text.split("\n") if len(p) > 200]
        out += paras[:4] + paras[-2:]
    return out


def test_logits_match_transformers_on_real_text(smollm2, hf, paragraphs):
    from lowbit.models.llama import forward_jit

    params, cfg, tok = smollm2
    torch, model, _ = hf
    ids = tok.encode("\n".join(paragraphs))[:384]
    assert len(ids) == 384
    ours = np.asarray(forward_jit(params, ids[None], cfg)[0], np.float64)
    with torch.no_grad():
        ref = model(torch.tensor(ids[None].astype(np.int64))).logits[0].double().numpy()
    err = np.abs(ours - ref)
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    agree = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    print(f"max|diff| {err.max():.3e}  rel {rel:.3e}  top-1 agreement {agree:.4f}  logit std {ref.std():.2f}")
    assert rel < 1e-4 and err.max() < 5e-3
    assert agree > 0.995


def test_gguf_tokenizer_equals_transformers(smollm2, hf, paragraphs):
    _, _, tok = smollm2
    _, _, ref = hf
    text = "\n\n".join(paragraphs)
    ours = tok.encode(text)
    theirs = np.asarray(ref(text, add_special_tokens=False)["input_ids"], np.int32)
    np.testing.assert_array_equal(ours, theirs)
    for p in paragraphs:
        np.testing.assert_array_equal(tok.encode(p), ref(p, add_special_tokens=False)["input_ids"])
    assert tok.decode(ours) == text
    assert ref.decode(list(ours)) == text


def test_gguf_as_stored_with_interleaved_rope_equals_unpermuted_half(smollm2, smollm2_path, paragraphs):
    from lowbit.models.llama import forward_jit
    from lowbit.models.loaders import load_gguf

    params, cfg, tok = smollm2
    raw, cfg_raw, _ = load_gguf(smollm2_path, unpermute_qk=False)
    assert cfg_raw.rope_style == "interleaved" and cfg.rope_style == "half"
    ids = tok.encode(paragraphs[0])[:128][None]
    a = np.asarray(forward_jit(params, ids, cfg))
    b = np.asarray(forward_jit(raw, ids, cfg_raw))
    np.testing.assert_allclose(a, b, atol=2e-3, rtol=1e-4)


def test_chunked_encoding_of_a_whole_corpus_equals_one_shot(smollm2):
    from lowbit import data

    _, _, tok = smollm2
    text = data.corpus_text("austen", "eval")
    assert tok.chunk_safe and len(tok._chunks(text)) > 3
    whole = np.asarray(tok.tk.encode(text, add_special_tokens=False).ids, np.int32)
    np.testing.assert_array_equal(tok.encode(text), whole)
