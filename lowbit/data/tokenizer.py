"""A thin wrapper over the HF ``tokenizers`` package: from ``tokenizer.json`` or from GGUF metadata.

``Tokenizer.encode(text)`` returns ``np.int32`` ids and never inserts BOS/EOS unless asked
(``add_bos=True``); the perplexity protocol of :mod:`lowbit.eval.likelihood` tokenizes raw text without BOS.

Fast encoding of multi-MB text: for byte-level BPE tokenizers (the GPT-2 family: ByteLevel
pre-tokenizer, no normalizer) the text is cut into chunks of about ``chunk_chars`` characters at
positions ``p`` where ``text[p]`` is whitespace and ``text[p+1]`` an ASCII letter (so ``p`` is the last
character of a whitespace run). The chunks are encoded in parallel with ``encode_batch`` and the
ids concatenated. The GPT-2 split regex (``...| ?\\p{L}+|...|\\s+(?!\\S)|\\s+``) always has a
pre-token boundary just before the last whitespace character of a run that is followed by a
letter (the run minus its last character is one pre-token, whether or not the string ends there;
the last character starts the next pre-token), ``Digits`` is not involved next to a letter, and
BPE never merges across pre-token boundaries, so the result is *identical* to encoding the whole
string at once (checked in the tests on real and adversarial text). Tokenizers that are not known to be
chunk-safe (e.g. sentencepiece-style ones with a ``Prepend`` normalizer) encode the whole string.

SentencePiece vocabularies stored in GGUF files (``tokenizer.ggml.model == "llama"``, e.g. Gemma-3) are
rebuilt by :meth:`Tokenizer.from_gguf_sentencepiece` as a BPE with byte fallback whose merges are
derived from the vocabulary (see there); such tokenizers encode the whole string at once (not
chunk-safe), which is fast anyway because their ``\n`` tokens are matched first and cut the text.

Serialization: :meth:`Tokenizer.to_json` returns a JSON string ``{"format": "lowbit-tokenizer",
"version": 1, "tokenizer": <tokenizers JSON string>, "bos_id", "eos_id"}`` that
:meth:`Tokenizer.from_json` reads back (used by lowbit model checkpoints).
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

__all__ = ["Tokenizer", "bytes_to_unicode"]

_FORMAT = "lowbit-tokenizer"
# GGUF `tokenizer.ggml.pre` values this module can rebuild (llama.cpp names), and the digit rule.
_GGUF_PRE = {"smollm": True, "default": False, "gpt-2": False, "gpt2": False}
_SAFE_SPLIT = re.compile(r"\s(?=[A-Za-z])")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _merge_pairs(merges: Sequence[str]) -> list[tuple[str, str]]:
    """GGUF ``tokenizer.ggml.merges`` entries ``"left right"`` -> ``(left, right)`` pairs."""
    pairs = []
    for i, m in enumerate(merges):
        a, sep, b = m.partition(" ")
        if not sep:
            raise ValueError(f"GGUF tokenizer: merge {i} {m!r} is not 'left right'")
        pairs.append((a, b))
    return pairs


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character table used by byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Tokenizer:
    """Wraps a ``tokenizers.Tokenizer`` with the model's BOS/EOS ids."""

    def __init__(self, tk, bos_id: int | None = None, eos_id: int | None = None, *,
                 chunk_chars: int = 1 << 16):
        self.tk = tk
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.chunk_chars = chunk_chars
        self.chunk_safe = _is_chunk_safe(json.loads(tk.to_str()))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_file(cls, path: str, bos_id: int | None = None, eos_id: int | None = None) -> "Tokenizer":
        """From an HF ``tokenizer.json``."""
        from tokenizers import Tokenizer as _Tk

        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        try:
            tk = _Tk.from_file(path)
        except Exception as e:  # tokenizers raises a plain Exception on malformed JSON
            raise ValueError(f"{path}: not a valid tokenizers JSON file ({e})") from None
        return cls(tk, bos_id, eos_id)

    @classmethod
    def from_gguf_vocab(cls, tokens: Sequence[str], merges: Sequence[str], *,
                        token_types: Sequence[int] | None = None, model: str = "gpt2",
                        pre: str | None = "default", bos_id: int | None = None,
                        eos_id: int | None = None) -> "Tokenizer":
        """Rebuild a byte-level BPE tokenizer from GGUF ``tokenizer.ggml.*`` metadata.

        ``model`` must be ``"gpt2"`` (byte-level BPE). ``pre`` (``tokenizer.ggml.pre``) picks the
        pre-tokenizer: ``"smollm"`` = individual digits, then the GPT-2 ByteLevel split;
        ``"default"``/``"gpt-2"`` = the GPT-2 ByteLevel split only. Control tokens
        (``token_type == 3``) become special added tokens, kept whole in the input text.
        """
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as _Tk

        if model != "gpt2":
            raise ValueError(f"GGUF tokenizer model {model!r} is not supported; supported: 'gpt2' "
                             "(byte-level BPE)")
        pre = pre or "default"
        if pre not in _GGUF_PRE:
            raise ValueError(f"GGUF tokenizer pre-tokenizer {pre!r} is not supported; supported: "
                             f"{sorted(_GGUF_PRE)}")
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError("GGUF tokenizer: duplicate tokens in tokenizer.ggml.tokens")
        pairs = _merge_pairs(merges)
        tk = _Tk(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        if _GGUF_PRE[pre]:
            tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                        byte_level])
        else:
            tk.pre_tokenizer = byte_level
        tk.decoder = decoders.ByteLevel()
        if token_types is not None:
            special = [AddedToken(t, special=True, normalized=False)
                       for t, ty in zip(tokens, token_types) if int(ty) == 3]
            if special:
                tk.add_special_tokens(special)
        return cls(tk, bos_id, eos_id)

    @classmethod
    def from_gguf_sentencepiece(cls, tokens: Sequence[str], *, token_types: Sequence[int] | None = None,
                                merges: Sequence[str] | None = None, scores: Sequence[float] | None = None,
                                add_space_prefix: bool = False, bos_id: int | None = None,
                                eos_id: int | None = None, unk_id: int | None = None) -> "Tokenizer":
        """Rebuild a SentencePiece BPE tokenizer (GGUF ``tokenizer.ggml.model == "llama"``, e.g.
        Gemma-3) from GGUF ``tokenizer.ggml.*`` metadata, with the ``tokenizers`` package.

        The pipeline is the one of transformers' Gemma tokenizer: spaces become ``\u2581``
        (normalizer), no pre-tokenization, BPE with byte fallback (``<0xNN>`` tokens) and ``unk``
        fused, decoder ``\u2581`` -> space + byte fallback + fuse. Control tokens
        (``token_type == 3``) are special added tokens and user-defined ones (``4``, e.g. ``\n``
        runs and HTML tags) plain added tokens, both matched whole in the raw text (as llama.cpp does).
        Tokens made only of spaces (Gemma's user-defined space runs) are respelled as ``\u2581``
        runs, the form they take after the normalizer.

        Merges: ``merges`` (``tokenizer.ggml.merges``) when the file has them; else derived from the
        vocabulary: every split ``(left, right)`` of a token into two vocabulary tokens is a merge,
        ranked by the token's priority -- its position in the vocabulary (``scores=None``; Gemma's
        files give user-defined and byte tokens placeholder scores, while the position is the
        SentencePiece order of the regular pieces) or its score (higher first, ties by position)
        -- and, within one token, longer left parts first. Merging by the rank of the merged
        token is SentencePiece's BPE rule (the most likely piece first).

        ``add_space_prefix=True`` (a ``\u2581`` prepended to the text, Llama-2 style) is not
        supported: only prefix-free vocabularies have been checked against a reference.
        """
        from tokenizers import AddedToken, decoders, models, normalizers
        from tokenizers import Tokenizer as _Tk

        if add_space_prefix:
            raise ValueError("GGUF SentencePiece tokenizer with add_space_prefix=true is not supported "
                             "(only vocabularies without a space prefix, e.g. Gemma, are rebuilt)")
        spelled = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
        vocab = {t: i for i, t in enumerate(spelled)}
        if len(vocab) != len(spelled):
            raise ValueError("GGUF tokenizer: duplicate tokens in tokenizer.ggml.tokens")
        if token_types is not None and len(token_types) != len(tokens):
            raise ValueError(f"GGUF tokenizer: {len(token_types)} token types for {len(tokens)} tokens")
        if merges:
            pairs = _merge_pairs(merges)
        else:
            if scores is not None:
                if len(scores) != len(tokens):
                    raise ValueError(f"GGUF tokenizer: {len(scores)} scores for {len(tokens)} tokens")
                order = sorted(range(len(spelled)), key=lambda i: (-float(scores[i]), i))
            else:
                order = range(len(spelled))
            pairs = []
            for i in order:
                t = spelled[i]
                for k in range(len(t) - 1, 0, -1):
                    if t[:k] in vocab and t[k:] in vocab:
                        pairs.append((t[:k], t[k:]))
        unk = spelled[unk_id] if unk_id is not None and 0 <= unk_id < len(spelled) else None
        tk = _Tk(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
        tk.normalizer = normalizers.Replace(" ", "\u2581")
        tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        if token_types is not None:
            special = [AddedToken(t, special=True, normalized=False)
                       for t, ty in zip(spelled, token_types) if int(ty) == 3]
            if special:
                tk.add_special_tokens(special)
            user = [AddedToken(t, special=False, normalized=False)
                    for t, s0, ty in zip(spelled, tokens, token_types) if int(ty) == 4 and t == s0]
            if user:
                tk.add_tokens(user)
        return cls(tk, bos_id, eos_id)

    # ------------------------------------------------------------------ encode / decode
    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def _encode_ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        """``text`` -> ``np.int32`` ids (no BOS/EOS unless asked; see the module docstring)."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        if self.chunk_safe and len(text) > self.chunk_chars:
            ids = _concat(self._encode_ids(self._chunks(text)))
        else:
            ids = np.asarray(self.tk.encode(text, add_special_tokens=False).ids, np.int32)
        parts = []
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no bos_id")
            parts.append(np.asarray([self.bos_id], np.int32))
        parts.append(ids)
        if add_eos:
            if self.eos_id is None:
                raise ValueError("add_eos=True but this tokenizer has no eos_id")
            parts.append(np.asarray([self.eos_id], np.int32))
        return np.concatenate(parts) if len(parts) > 1 else ids

    def encode_batch(self, texts: Iterable[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.int32) for ids in self._encode_ids(list(texts))]

    def _chunks(self, text: str) -> list[str]:
        """Cut before a whitespace character followed by a letter, into ~``chunk_chars`` pieces."""
        out, start, n = [], 0, len(text)
        while start < n:
            if n - start <= self.chunk_chars:
                out.append(text[start:])
                break
            m = _SAFE_SPLIT.search(text, start + self.chunk_chars)
            if m is None:
                out.append(text[start:])
                break
            out.append(text[start:m.start()])
            start = m.start()
        return out

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def token_bytes(self) -> np.ndarray:
        """``(vocab_size,) int32``: how many UTF-8 bytes of text each id stands for.

        Byte-level BPE vocabularies map each character of a token back to one byte (the inverse of
        :func:`bytes_to_unicode`); SentencePiece-style vocabularies count ``\u2581`` as a space
        and byte-fallback tokens ``<0xNN>`` as one byte. Special (control) tokens count 0 bytes:
        they are not text. Used for tokenizer-free bits per byte (:func:`lowbit.eval.likelihood.perplexity`).
        """
        if getattr(self, "_token_bytes", None) is not None:
            return self._token_bytes
        spec = json.loads(self.tk.to_str())
        byte_level = "ByteLevel" in _types(spec.get("decoder"))
        inverse = {c: b for b, c in bytes_to_unicode().items()}
        special = {t["id"] for t in spec.get("added_tokens") or [] if t.get("special")}
        out = np.zeros((self.vocab_size,), np.int32)
        for tok, i in self.tk.get_vocab(with_added_tokens=True).items():
            if i in special or i >= out.shape[0]:
                continue
            if byte_level and all(c in inverse for c in tok):
                out[i] = len(tok)
            elif _BYTE_TOKEN.fullmatch(tok):
                out[i] = 1
            else:
                out[i] = len(tok.replace("\u2581", " ").encode("utf-8"))
        self._token_bytes = out
        return out

    # ------------------------------------------------------------------ serialization
    def to_json(self) -> str:
        return json.dumps({"format": _FORMAT, "version": 1, "tokenizer": self.tk.to_str(),
                           "bos_id": self.bos_id, "eos_id": self.eos_id})

    @classmethod
    def from_json(cls, s: str) -> "Tokenizer":
        from tokenizers import Tokenizer as _Tk

        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"Tokenizer.from_json: not JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"Tokenizer.from_json: expected format {_FORMAT!r}, got "
                             f"{d.get('format') if isinstance(d, dict) else type(d).__name__!r}")
        return cls(_Tk.from_str(d["tokenizer"]), d.get("bos_id"), d.get("eos_id"))

    def __repr__(self):
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"chunk_safe={self.chunk_safe})")


def _concat(parts: list[list[int]]) -> np.ndarray:
    if not parts:
        return np.zeros((0,), np.int32)
    return np.concatenate([np.asarray(p, np.int32) for p in parts])


def _types(node) -> list[str]:
    """All ``type`` names inside a tokenizers JSON component (Sequences flattened)."""
    if node is None:
        return []
    if isinstance(node, dict):
        out = [node["type"]] if "type" in node else []
        for v in node.values():
            if isinstance(v, (dict, list)):
                out += _types(v)
        return out
    if isinstance(node, list):
        return [t for v in node for t in _types(v)]
    return []


def _is_chunk_safe(spec: dict) -> bool:
    """Byte-level BPE with only ByteLevel(use_regex) / Digits pre-tokenizers, no normalizer and no
    added token containing whitespace: the chunk boundaries of :meth:`Tokenizer._chunks` are
    pre-token boundaries."""
    if (spec.get("model") or {}).get("type") != "BPE" or spec.get("normalizer") is not None:
        return False
    if any(re.search(r"\s", t.get("content", "")) for t in spec.get("added_tokens") or []):
        return False
    pre = _types(spec.get("pre_tokenizer"))
    if "ByteLevel" not in pre or not set(pre) <= {"Sequence", "ByteLevel", "Digits"}:
        return False

    def uses_regex(node):
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel":
                return node.get("use_regex", True)
            return all(uses_regex(v) for v in node.get("pretokenizers", []))
        return True

    return bool(uses_regex(spec.get("pre_tokenizer")))
