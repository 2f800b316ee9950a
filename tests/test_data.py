"""Tests for lowbit.data.corpora: offline corpora, splits, token windows, local files, the HF offline error,
and the R data reading behind the Austen corpus (our lazy-load database framing, the ``rdata``
package for the R serialization)."""

import gzip
import lzma
import os
import re
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest

from lowbit.data import corpora as data
from lowbit.io import assets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _asset_or_skip(fn):
    try:
        return fn()
    except RuntimeError as e:  # registry unreachable on this machine: nothing to test against
        pytest.skip(f"asset not available: {e}")


@pytest.fixture(scope="module")
def brown():
    _asset_or_skip(assets.brown_dir)
    return {split: data.load_text("brown", split) for split in data.SPLITS}


@pytest.fixture(scope="module")
def austen():
    _asset_or_skip(assets.austen_dir)
    return {split: data.load_text("austen", split) for split in data.SPLITS}


# ---------------------------------------------------------------------------------------------
# Brown
# ---------------------------------------------------------------------------------------------

def test_brown_splits_are_disjoint_cover_everything_and_follow_the_rule(brown):
    calib, ev, everything = (brown[s]["id"] for s in ("calib", "eval", "all"))
    assert len(everything) == len(set(everything)) == 500
    assert set(calib).isdisjoint(ev)
    assert set(calib) | set(ev) == set(everything)
    assert sorted(ev) == sorted(i for i in everything if i.endswith("6"))
    assert len(ev) == 51
    assert {i[1] for i in ev} == {i[1] for i in everything}      # all 15 genres in eval
    assert len({i[1] for i in everything}) == 15
    assert list(brown["all"]["split"]) == ["eval" if i.endswith("6") else "calib" for i in everything]


def test_brown_is_deterministic(brown):
    again = data.load_text("brown", "eval")
    assert list(again["id"]) == list(brown["eval"]["id"])
    assert list(again["text"]) == list(brown["eval"]["text"])


def test_brown_known_content_and_clean_text(brown):
    docs = dict(zip(brown["all"]["id"], brown["all"]["text"]))
    assert docs["ca01"].startswith("The Fulton County Grand Jury said Friday an investigation of "
                                   "Atlanta's recent primary election produced \"no evidence\" that "
                                   "any irregularities took place.\nThe jury further said")
    assert "won by Mayor-nominate Ivan Allen Jr.\n" in docs["ca01"]
    assert "Merger proposed\nHowever, the jury said" in docs["ca01"]   # headline = own paragraph
    assert docs["ck01"].startswith("Thirty-three\nScotty did not go back to school. His parents")
    text = "\n".join(docs.values())
    tags = r"at|nn|nns|np|np\$|vbd|vbn|vbz|in|jj|cc|cs|rb|pps|ppss|dt|to|md|``|''"
    assert not re.search(rf"\S/(?:{tags})(?:-tl|-hl)?(?=\s|$)", text)       # "B.t.u./in." is fine
    assert "./." not in text and ",/," not in text and "-hl" not in text
    assert "``" not in text and not re.search(r"(?:^|\s)''(?:\s|$)", text)   # 10'' (inches) stays
    assert " ," not in text and " ." not in text and " ;" not in text and "( " not in text
    assert "? ?" not in text and ";;" not in text
    assert 5_500_000 < len(text) < 6_500_000


def test_brown_detokenizer():
    words = ["``", "Yes", "''", ",", "he", "said", "(", "twice", ")", ";", ";", "'", "ok", "'",
             "Jr.", ".", "Why", "?", "?"]
    assert data._detokenize_brown(words) == "\"Yes\", he said (twice); 'ok' Jr. Why?"


# ---------------------------------------------------------------------------------------------
# Austen
# ---------------------------------------------------------------------------------------------

def test_austen_six_novels_split_per_novel(austen):
    assert list(austen["calib"]["id"]) == list(data.AUSTEN_NOVELS)
    assert list(austen["eval"]["id"]) == list(data.AUSTEN_NOVELS)
    assert len(austen["all"]) == 12
    for calib, ev in zip(austen["calib"]["text"], austen["eval"]["text"]):
        frac = len(ev) / (len(ev) + len(calib))
        assert 0.05 < frac < 0.15
        assert calib == calib.strip("\n") and ev == ev.strip("\n")
    pp = dict(zip(austen["calib"]["id"], austen["calib"]["text"]))["prideprejudice"]
    assert pp.startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged, that a single man in possession\nof a good " \
           "fortune, must be in want of a wife." in pp
    ev = dict(zip(austen["eval"]["id"], austen["eval"]["text"]))
    assert ev["sensesensibility"].endswith("THE END")


def test_austen_splits_cover_every_line_once(austen):
    novels = data.read_rdb(os.path.join(assets.austen_dir(), "data", "Rdata.rdb"))
    assert set(novels) == set(data.AUSTEN_NOVELS)
    rows = list(zip(austen["all"]["id"], austen["all"]["split"], austen["all"]["text"]))
    for name in data.AUSTEN_NOVELS:
        lines = novels[name].tolist()
        assert all(isinstance(s, str) for s in lines)           # no NA lines in the package
        (calib,) = [t for i, s, t in rows if i == name and s == "calib"]
        (ev,) = [t for i, s, t in rows if i == name and s == "eval"]
        full = "\n".join(s.rstrip() for s in lines).strip("\n")
        # calib, then blank line(s) (the paragraph boundary), then eval is the whole novel
        assert full.startswith(calib) and full.endswith(ev)
        middle = full[len(calib):len(full) - len(ev)]
        assert "\n\n" in middle and not middle.strip("\n")


def test_offline_corpus_cache(tmp_path, monkeypatch):
    _asset_or_skip(assets.austen_dir)
    monkeypatch.setattr(data, "_text_cache_dir", lambda: str(tmp_path))
    first = list(data.load_text("austen", "eval")["text"])
    (cached,) = tmp_path.glob("austen-*.json")
    monkeypatch.setattr(data, "_parse_austen", lambda d: pytest.fail("cache not used"))
    assert list(data.load_text("austen", "eval")["text"]) == first
    cached.write_text("{not json")                              # a damaged cache is re-parsed
    monkeypatch.undo()
    monkeypatch.setattr(data, "_text_cache_dir", lambda: str(tmp_path))
    assert list(data.load_text("austen", "eval")["text"]) == first


def test_corpus_text_joins_documents(brown):
    text = data.corpus_text("brown", "eval")
    assert text == "\n\n".join(brown["eval"]["text"])
    assert data.corpus_text("brown", "eval", sep=" ") == " ".join(brown["eval"]["text"])


# ---------------------------------------------------------------------------------------------
# Token windows
# ---------------------------------------------------------------------------------------------

def test_calibration_windows_reproducible_and_in_bounds():
    toks = np.arange(10_000, dtype=np.int64) * 3
    w1, s1 = data.calibration_windows(toks, nsamples=16, seqlen=128, seed=0)
    w2, s2 = data.calibration_windows(list(toks), nsamples=16, seqlen=128, seed=0)
    w3, s3 = data.calibration_windows(toks, nsamples=16, seqlen=128, seed=1)
    assert w1.shape == (16, 128) and w1.dtype == np.int32 and s1.dtype == np.int64
    np.testing.assert_array_equal(w1, w2)
    np.testing.assert_array_equal(s1, s2)
    assert not np.array_equal(s1, s3)
    assert s1.min() >= 0 and s1.max() <= len(toks) - 128 - 1
    for w, s in zip(w1, s1):
        np.testing.assert_array_equal(w, toks[s:s + 128])


def test_calibration_windows_edges_and_errors():
    w, s = data.calibration_windows(np.arange(9), nsamples=3, seqlen=8, seed=5)
    np.testing.assert_array_equal(s, [0, 0, 0])
    with pytest.raises(ValueError, match=r"seqlen \+ 1 = 9 tokens, got 8"):
        data.calibration_windows(np.arange(8), nsamples=1, seqlen=8, seed=0)
    with pytest.raises(ValueError, match="nsamples"):
        data.calibration_windows(np.arange(100), nsamples=0, seqlen=8, seed=0)
    with pytest.raises(ValueError, match="seed=None"):
        data.calibration_windows(np.arange(100), nsamples=1, seqlen=8, seed=None)
    with pytest.raises(ValueError, match="1-D"):
        data.calibration_windows(np.zeros((2, 50), np.int32), nsamples=1, seqlen=8, seed=0)


def test_eval_windows():
    toks = np.arange(1000)
    w = data.eval_windows(toks, 128)
    assert w.shape == (7, 128) and w.dtype == np.int32
    np.testing.assert_array_equal(w.reshape(-1), toks[:7 * 128])   # consecutive, no overlap
    assert data.eval_windows(toks, 128, max_windows=3).shape == (3, 128)
    assert data.eval_windows(toks, 128, max_windows=50).shape == (7, 128)
    assert data.eval_windows(toks, 1000).shape == (1, 1000)
    with pytest.raises(ValueError, match="got 1000 tokens, fewer than seqlen=1001"):
        data.eval_windows(toks, 1001)
    with pytest.raises(ValueError, match="max_windows"):
        data.eval_windows(toks, 128, max_windows=0)


# ---------------------------------------------------------------------------------------------
# Local files, names, HF
# ---------------------------------------------------------------------------------------------

def _doc(n_paragraphs, tag):
    return "\n\n".join(f"{tag} paragraph {i} line a\n{tag} paragraph {i} line b"
                       for i in range(n_paragraphs)) + "\n"


def test_local_file(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text(_doc(20, "B"))
    calib, ev, everything = (data.load_text(str(f), s) for s in data.SPLITS)
    assert list(calib["id"]) == list(ev["id"]) == ["book.txt"]
    assert calib["text"][0].startswith("B paragraph 0 line a\nB paragraph 0 line b\n\n")
    assert ev["text"][0] == "B paragraph 18 line a\nB paragraph 18 line b\n\n" \
                            "B paragraph 19 line a\nB paragraph 19 line b"
    assert list(everything["text"]) == list(calib["text"]) + list(ev["text"])
    assert data.corpus_text(str(f), "all") == _doc(20, "B").strip()


def test_local_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text(_doc(10, "B"))
    (tmp_path / "sub" / "a.txt").write_text(_doc(10, "A"))
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / "empty.txt").write_text("\n\n")
    ev = data.load_text(str(tmp_path), "eval")
    assert list(ev["id"]) == ["b.txt", "sub/a.txt"]
    assert list(ev["text"]) == ["B paragraph 9 line a\nB paragraph 9 line b",
                          "A paragraph 9 line a\nA paragraph 9 line b"]
    calib = data.load_text(str(tmp_path), "calib")
    assert all("paragraph 9 " not in t for t in calib["text"])


def test_local_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="holds no text"):
        data.load_text(str(empty))
    d = tmp_path / "d"
    d.mkdir()
    (d / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="no .txt files"):
        data.load_text(str(d))
    one = tmp_path / "one.txt"
    one.write_text("a single line\n")
    assert list(data.load_text(str(one), "calib")["text"]) == ["a single line"]
    with pytest.raises(ValueError, match="too short"):
        data.load_text(str(one), "eval")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        data.load_text(str(bad))


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match=r"'brown', 'austen'.*'wikitext2', 'c4', 'ptb'"):
        data.load_text("wikitext-103")
    with pytest.raises(ValueError, match=r"split='test'.*'calib', 'eval', 'all'"):
        data.load_text("brown", "test")


@pytest.mark.parametrize("name", data.HF_NAMES)
def test_hf_names_fail_fast_offline(name):
    if data._hub_probe() is None:
        pytest.skip("the Hugging Face hub is reachable from this machine")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="unreachable") as e:
        data.load_text(name, "eval")
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert "'brown'" in msg and "'austen'" in msg and ".txt" in msg and name in msg


def test_hf_offline_mode_fails_fast(tmp_path):
    """With HF_DATASETS_OFFLINE=1 and an empty HF cache, datasets itself fails; we wrap it."""
    code = textwrap.dedent("""
        import time
        from lowbit import data
        t0 = time.monotonic()
        try:
            data.load_text("wikitext2", "eval")
        except RuntimeError as e:
            print("OK", round(time.monotonic() - t0, 1), e)
    """)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path),
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=env, cwd=ROOT)
    assert r.stdout.startswith("OK"), r.stdout + r.stderr
    assert float(r.stdout.split()[1]) < 15
    assert "'brown'" in r.stdout and ".txt" in r.stdout


# ---------------------------------------------------------------------------------------------
# R data (unserialize_r = the rdata package + our conventions; read_rdb = our framing) on
# hand-made XDR bytes
# ---------------------------------------------------------------------------------------------

NA_INTEGER = -(2 ** 31)


def _i(*xs):
    return struct.pack(f">{len(xs)}i", *xs)


def _char(s, level=64):
    if s is None:
        return _i(9, -1)
    b = s.encode("latin-1" if level == 4 else "utf-8")
    return _i(9 | (level << 12), len(b)) + b


def _header(version=3):
    return b"X\n" + _i(version, 0x040201, 0x030500) + (_i(5) + b"UTF-8" if version == 3 else b"")


def _sym(name):
    return _i(1) + _char(name)


def _attrs(*pairs):
    """A pairlist of (tag bytes, value bytes) cells."""
    return b"".join(_i(2 | 1 << 10) + tag + val for tag, val in pairs) + _i(254)


def test_unserialize_strings_na_encodings_and_attributes():
    """What _parse_austen relies on: a character vector is a 1-D array of str, NA is None, and
    UTF-8 / latin-1 / unflagged (native encoding) strings are decoded."""
    names = _i(16, 3) + _char("a") + _char("b") + _char("c")
    body = (_i(16 | 1 << 9, 3) + _char("plain") + _char(None) + _char("café", level=8)
            + _attrs((_sym("names"), names)))
    obj = data.unserialize_r(_header() + body)
    assert isinstance(obj, np.ndarray) and obj.ndim == 1
    assert obj.tolist() == ["plain", None, "café"]
    latin = data.unserialize_r(_header(2) + _i(16, 1) + _char("naïve", level=4))
    assert latin.tolist() == ["naïve"]
    native = data.unserialize_r(_header() + _i(16, 1) + _char("naïve", level=0))  # UTF-8 header
    assert native.tolist() == ["naïve"]
    assert data.unserialize_r(gzip.compress(_header() + _i(16, 1) + _char("z"))).tolist() == ["z"]


def test_unserialize_list_ints_refs_and_altrep():
    # list(x = 1:3 (ALTREP compact_intseq), y = structure(c(7L, NA), unit = "p"),
    #      z = structure(2.5, unit = "q")); the second "unit" tag is a reference (REFSXP)
    seq = (_i(238) + _i(2) + _sym("compact_intseq") + _i(2) + _sym("base") + _i(2) + _i(13, 1, 13)
           + _i(254) + _i(14, 3) + struct.pack(">3d", 3, 1, 1) + _i(254))
    ints = _i(13 | 1 << 9, 2, 7, NA_INTEGER) + _attrs((_sym("unit"), _i(16, 1) + _char("p")))
    dbl = (_i(14 | 1 << 9, 1) + struct.pack(">d", 2.5)
           + _attrs((_i(255 | 3 << 8), _i(16, 1) + _char("q"))))  # symbols so far: 1 2 3=unit
    names = _i(16, 3) + _char("x") + _char("y") + _char("z")
    body = _i(19 | 1 << 9, 3) + seq + ints + dbl + _attrs((_sym("names"), names))
    d = data.unserialize_r(_header() + body)
    assert isinstance(d, dict) and list(d) == ["x", "y", "z"]
    np.testing.assert_array_equal(d["x"], [1, 2, 3])
    assert d["y"][0] == 7 and np.ma.is_masked(d["y"][1])                  # NA_integer_ is masked
    assert d["z"].tolist() == [2.5]


def test_unserialize_errors():
    for bad, what in [(_header() + _i(3), "closure"),
                      (_header() + _i(16, 2) + _char("only one"), "truncated"),
                      (b"A\n" + _i(3), "ASCII header"),
                      (b"X\n" + _i(4, 0, 0), "version 4"),
                      (b"not R data", "no header"),
                      (_header() + _i(77), "unknown SEXP type"),
                      (_header(2) + _i(16, 1) + _i(9 | 8 << 12, 2) + b"\xff\xfe", "bad UTF-8")]:
        with pytest.raises(data.RUnserializeError, match="R unserialize"):
            data.unserialize_r(bad)
            pytest.fail(what)


def _write_rdb(tmp_path, objs, compressed=1, corrupt=None):
    """Write x.rdb + x.rdx (R's lazy-load layout) holding the serialized objects ``objs``."""
    blob, index = b"", []
    for name, ser in objs.items():
        if compressed == 3:
            chunk = struct.pack(">I", len(ser)) + b"X" + lzma.compress(ser)
        else:
            chunk = struct.pack(">I", len(ser)) + zlib.compress(ser)
        if name == corrupt:
            chunk = chunk[:4] + b"\x00" + chunk[5:]
        index.append((name, len(blob), len(chunk)))
        blob += chunk
    (tmp_path / "x.rdb").write_bytes(blob)
    variables = b"".join(_i(13, 2, off, n) for _, off, n in index)
    var_names = _i(16, len(index)) + b"".join(_char(n) for n, _, _ in index)
    flag = _i(10, 1, 1) if compressed == 1 else _i(14, 1) + struct.pack(">d", compressed)
    rdx = (_header() + _i(19 | 1 << 9, 3)
           + _i(19 | 1 << 9, len(index)) + variables + _attrs((_sym("names"), var_names))
           + _i(19, 0) + flag
           + _attrs((_i(255 | 1 << 8), _i(16, 3) + _char("variables") + _char("references")
                     + _char("compressed"))))
    (tmp_path / "x.rdx").write_bytes(gzip.compress(rdx))
    return str(tmp_path / "x.rdb")


def test_read_rdb_round_trip(tmp_path):
    objs = {"first": _header() + _i(16, 2) + _char("one") + _char("two"),
            "second": _header() + _i(13, 1, 42)}
    for compressed in (1, 3):                              # zlib (R's default) and typed xz chunks
        rdb = _write_rdb(tmp_path, objs, compressed)
        got = data.read_rdb(rdb)
        assert list(got) == ["first", "second"]
        assert got["first"].tolist() == ["one", "two"]
        assert got["second"].tolist() == [42]
        assert list(data.read_rdb(rdb, names=("second",))) == ["second"]
    with pytest.raises(KeyError, match="third"):
        data.read_rdb(rdb, names=("third",))


def test_read_rdb_errors(tmp_path):
    objs = {"good": _header() + _i(13, 1, 1), "bad": _header() + _i(16, 2) + _char("one")}
    rdb = _write_rdb(tmp_path, objs)
    assert data.read_rdb(rdb, names=("good",))["good"].tolist() == [1]
    with pytest.raises(data.RUnserializeError, match="object 'bad'.*R unserialize"):
        data.read_rdb(rdb)
    rdb = _write_rdb(tmp_path, {"z": objs["good"]}, corrupt="z")          # broken zlib stream
    with pytest.raises(data.RUnserializeError, match="object 'z' does not decompress"):
        data.read_rdb(rdb)
    (tmp_path / "x.rdb").write_bytes(b"")                                  # truncated database
    with pytest.raises(data.RUnserializeError, match="past the end of the file"):
        data.read_rdb(rdb)
    (tmp_path / "x.rdx").write_bytes(gzip.compress(_header() + _i(13, 1, 1)))
    with pytest.raises(data.RUnserializeError, match="not a lazy-load index"):
        data.read_rdb(rdb)


def test_hf_path_with_a_fake_hub(monkeypatch):
    """The HF plumbing (split names, column rename, c4's 1100 rows, 'all', separators) offline."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, data_files=None, split=None):
        calls.append((path, name, split))
        if "scripts" in str(path):
            raise RuntimeError(f"Dataset scripts are no longer supported, but found {path}.py")
        col = "sentence" if path == "ptb_text_only" else "text"
        n = 1500 if path == "allenai/c4" else 3
        return datasets.Dataset.from_dict({col: [f"{split} {i}" for i in range(n)],
                                           "extra": list(range(n))})

    monkeypatch.setattr(data, "_hub_probe", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ptb = data.load_text("ptb", "eval")
    assert ptb.column_names == ["text"] and list(ptb["text"]) == ["validation 0", "validation 1",
                                                                   "validation 2"]
    assert data.corpus_text("ptb", "calib") == "train 0 train 1 train 2"
    assert len(data.load_text("c4", "eval")) == 1100 and len(data.load_text("c4", "calib")) == 1500
    wiki = data.load_text("wikitext2", "all")
    assert list(wiki["text"]) == ["train 0", "train 1", "train 2", "test 0", "test 1", "test 2"]
    assert data.corpus_text("wikitext2", "eval") == "test 0\n\ntest 1\n\ntest 2"
    assert ("wikitext", "wikitext-2-raw-v1", "test") in calls
    monkeypatch.setitem(data.HF_SPECS, "ptb", {"column": "text", "eval": {"path": "scripts"}})
    with pytest.raises(RuntimeError, match="loading script.*'brown'"):
        data.load_text("ptb", "eval")
