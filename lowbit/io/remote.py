"""Results directories on remote storage (``gs://bucket/path``, ``s3://...``, any fsspec URL).

``lowbit run CONFIG --results gs://bucket/lowbit`` runs in a local **stage** directory that mirrors
the remote one: before the run every remote file the stage lacks (or holds at another size) is
downloaded -- finished rows (reused, as locally) and the per-layer checkpoints of an interrupted row
(resumed from, as locally); during the run the stage is uploaded after every committed layer,
every finished row and the summary. A preempted TPU VM therefore loses at most the layer in flight,
and a replacement VM resumes from the bucket. The remote side is reached through fsspec (the backend
``etils.epath`` uses for ``gs://`` when TensorFlow is absent; ``pip install gcsfs`` for Google Cloud
Storage, ``s3fs`` for S3).

What a reader of the bucket can rely on: an upload sends a directory's files before its commit
files (``metrics.json``, ``manifest.json``, ``.lowbit-output.json``), so a row whose ``metrics.json``
is there is complete, and a per-layer checkpoint caught half-uploaded fails its checksums on restore
(the runner then discards and recomputes that layer). Files the run removed locally (a finished
row's per-layer checkpoints, replaced run directories) are removed remotely after the new files are
up. Locks are local to the stage: two machines must not run the same experiment into one bucket at
once. In a multi-process job every process downloads; only process 0 uploads.
"""

from __future__ import annotations

import hashlib
import os
import posixpath

__all__ = ["is_remote", "Mirror", "default_stage"]

# written last (in this order), so that their presence remotely means the rest of the directory is there
_COMMIT_FILES = (".lowbit-output.json", "manifest.json", "metrics.json")
_SKIP = (".lock",)


def is_remote(path) -> bool:
    """True for a URL with a scheme other than ``file://`` (``gs://b/p``, ``s3://b/p``, ``memory://p``)."""
    s = os.fspath(path)
    return "://" in s and not s.startswith("file://")


def default_stage(url: str) -> str:
    """The local stage of ``url``: ``$LOWBIT_STAGE_DIR/<hash>`` (default ``~/.cache/lowbit/stage``)."""
    root = os.environ.get("LOWBIT_STAGE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "lowbit", "stage"))
    return os.path.join(root, hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16])


def _skipped(rel: str) -> bool:
    parts = rel.split("/")
    return parts[-1] in _SKIP or any(".tmp-" in p for p in parts)


def _commit_rank(rel: str) -> int:
    name = rel.rsplit("/", 1)[-1]
    return _COMMIT_FILES.index(name) + 1 if name in _COMMIT_FILES else 0


class Mirror:
    """A local ``stage`` directory kept in step with the remote ``url`` (see the module docstring).

    ``pull()`` downloads what the stage lacks; ``push()`` uploads what changed locally since the last
    push (size or modification time), commit files last, then deletes remote files that no longer
    exist locally. Both return the relative paths they transferred."""

    def __init__(self, url: str, stage: str | None = None):
        import fsspec

        if not is_remote(url):
            raise ValueError(f"results {url!r}: not a remote URL (expected e.g. gs://bucket/path)")
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as e:
            scheme = self.url.split("://", 1)[0]
            hint = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs"}.get(scheme)
            raise ValueError(f"results {url!r}: no filesystem for {scheme}:// ({e})"
                             + (f"; pip install {hint}" if hint else "")) from None
        self.root = self.root.rstrip("/")
        self.stage = os.path.abspath(stage or default_stage(self.url))
        self._sent: dict[str, tuple[int, int]] = {}

    def _remote(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def remote_files(self) -> dict[str, int]:
        """``{relative path: size}`` of every remote file under the URL."""
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for path, info in found.items():
            if info.get("type") == "directory":
                continue
            path = path.rstrip("/")
            if path.startswith(self.root + "/") and not _skipped(rel := path[len(self.root) + 1:]):
                out[rel] = int(info.get("size") or 0)
        return out

    def _local_files(self) -> dict[str, tuple[int, int]]:
        out = {}
        for d, dirs, files in os.walk(self.stage):
            dirs[:] = [x for x in dirs if ".tmp-" not in x]
            for f in files:
                full = os.path.join(d, f)
                rel = os.path.relpath(full, self.stage).replace(os.sep, "/")
                if not _skipped(rel) and os.path.isfile(full):
                    st = os.stat(full)
                    out[rel] = (st.st_size, st.st_mtime_ns)
        return out

    def pull(self) -> list[str]:
        """Download every remote file that the stage lacks or holds at another size; stage files the
        remote lacks are left alone (a stage is a cache: the remote is the record)."""
        os.makedirs(self.stage, exist_ok=True)
        local = self._local_files()
        got = []
        for rel, size in sorted(self.remote_files().items(), key=lambda kv: (_commit_rank(kv[0]), kv[0])):
            if rel in local and local[rel][0] == size:
                continue
            dest = os.path.join(self.stage, *rel.split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = f"{dest}.tmp-pull-{os.getpid()}"
            self.fs.get_file(self._remote(rel), tmp)
            os.replace(tmp, dest)
            got.append(rel)
        self._sent = self._local_files()   # in step with the remote now
        return got

    def push(self) -> list[str]:
        """Upload what changed in the stage since the last pull / push (commit files last), then remove
        the remote files the stage no longer has."""
        local = self._local_files()
        changed = sorted((rel for rel, st in local.items() if self._sent.get(rel) != st),
                         key=lambda r: (_commit_rank(r), r))
        for rel in changed:
            target = self._remote(rel)
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            self.fs.put_file(os.path.join(self.stage, *rel.split("/")), target)
        gone = sorted(set(self.remote_files()) - set(local), key=lambda r: (-_commit_rank(r), r))
        for rel in gone:   # commit files first: a reader never sees a commit file without its directory
            self.fs.rm_file(self._remote(rel))
        self._sent = local
        return changed + gone
