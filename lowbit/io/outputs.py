"""Output directories and files: what lowbit may replace, checked before any work is done.

Every directory lowbit writes as a whole (a checkpoint from :func:`lowbit.io.checkpoint.save` /
:func:`lowbit.models.loaders.save_model`, an HF export from :mod:`lowbit.io.export`) carries a marker
``.lowbit-output.json`` = ``{"kind": "checkpoint" | "export-gptq" | ..., "files": [relative paths]}``
listing every file lowbit wrote into it; it is written inside the temporary directory, before the
directory is renamed into place. :func:`prepare_output_dir` decides whether ``path`` may be
(re)written:

* missing or empty -> yes;
* a lowbit output of the same kind whose files are (at most) those listed -> yes, it is replaced atomically;
* a lowbit output of another kind -> only with ``overwrite``;
* any file lowbit did not write (not listed, or no marker at all) -> never, not even with ``overwrite``:
  lowbit does not delete what it did not write;
* the working directory or one of its parents, the home directory, a filesystem root -> never.

It also checks what would make the write fail late: ``path`` is an existing file, a parent component
is a file, the parent directory is not writable (parents are created and a probe file is written and
removed). Every refusal is a one-line ``ValueError``.

The swap in :func:`lowbit.io.checkpoint.atomic_directory` names its temporaries ``.NAME.tmp-<pid>-<rand>``
(and ``...old`` for the directory being replaced); :func:`recover` puts back a directory whose swap was
cut short by a killed process, :func:`remove_stale_temps` removes the temporaries of dead processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid

__all__ = ["MARKER", "prepare_output_dir", "prepare_output_file", "write_marker", "read_marker",
           "check_protected", "check_contents", "temp_dir_name", "recover", "remove_stale_temps"]

MARKER = ".lowbit-output.json"


# ----------------------------------------------------------------------------- markers


def _listing(path: str) -> list[str]:
    """Every file under ``path`` (symbolic links included, also links to directories), relative, '/'-separated."""
    out = []
    for root, dirs, files in os.walk(path):
        rel = os.path.relpath(root, path)
        for n in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            out.append(n if rel == "." else f"{rel}/{n}".replace(os.sep, "/"))
    return sorted(out)


def write_marker(path: str, kind: str) -> list[str]:
    """Write ``path/.lowbit-output.json`` listing every file now under ``path``; returns the list."""
    files = [f for f in _listing(path) if f != MARKER]
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump({"kind": kind, "files": files}, f, indent=1)
    return files


def read_marker(path: str) -> dict | None:
    """The marker of directory ``path`` (``{"kind", "files"}``), or None if missing or malformed."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    if (not isinstance(m, dict) or not isinstance(m.get("kind"), str) or not isinstance(m.get("files"), list)
            or not all(isinstance(x, str) for x in m["files"])):
        return None
    return m


# ----------------------------------------------------------------------------- checks


def _shown(path: str, component: str) -> str:
    """``component`` (an absolute ancestor of ``path``) as the user would write it."""
    return component if os.path.isabs(path) else os.path.relpath(component)


def check_protected(path: str, *, name: str = "--out", shown: str | None = None) -> None:
    """Refuse a filesystem root, the home directory, the working directory and its parents."""
    shown = path if shown is None else shown
    rp = os.path.realpath(path)
    if rp == os.path.dirname(rp) or os.path.ismount(rp):
        raise ValueError(f"{name} {shown}: is a filesystem root; lowbit never replaces it, choose a new directory")
    if rp == os.path.realpath(os.path.expanduser("~")):
        raise ValueError(f"{name} {shown}: is the home directory; lowbit never replaces it, choose a new directory")
    cwd = os.path.realpath(os.getcwd())
    if os.path.commonpath([rp, cwd]) == rp:
        raise ValueError(f"{name} {shown}: is the working directory or contains it; lowbit never replaces it, "
                         "choose a new directory")


def _check_parents(path: str, shown: str, name: str) -> None:
    """The first existing ancestor of ``path`` must be a directory; then make the parents and probe them."""
    ap = os.path.abspath(path)
    a = os.path.dirname(ap)
    while not os.path.lexists(a):
        a = os.path.dirname(a)
    if not os.path.isdir(a):
        raise ValueError(f"{name} {shown}: {_shown(shown, a)} is a file")
    parent = os.path.dirname(ap)
    probe = os.path.join(parent, f".lowbit-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(parent, exist_ok=True)
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{name} {shown}: cannot write to {_shown(shown, parent)}: {e.strerror or e}") from None


def check_contents(path: str, kind: str, overwrite: bool = False, *, name: str = "--out",
                   shown: str | None = None) -> None:
    """May the existing directory ``path`` be replaced by a lowbit output of ``kind``? (see module docstring)"""
    shown = path if shown is None else shown
    present = _listing(path)
    if not present:
        return
    m = read_marker(path)
    listed = set(m["files"]) if m is not None else set()
    foreign = [f for f in present if not (m is not None and (f == MARKER or f in listed))]
    if foreign:
        more = ", ..." if len(foreign) > 3 else ""
        raise ValueError(f"{name} {shown} holds files lowbit did not write ({', '.join(foreign[:3])}{more}); "
                         "choose another directory or remove them yourself")
    if m["kind"] != kind and not overwrite:
        raise ValueError(f"{name} {shown} holds a lowbit {m['kind']} output, not {kind}; "
                         "pass --overwrite to replace it")


def prepare_output_dir(path: str, kind: str, overwrite: bool = False, *, name: str = "--out") -> str:
    """Check, before any work, that directory ``path`` may be written as a lowbit output of ``kind``
    (see the module docstring); creates its parents. Returns the absolute path; raises ``ValueError``."""
    shown = str(path)
    ap = os.path.abspath(path)
    check_protected(ap, name=name, shown=shown)
    if os.path.islink(ap):
        raise ValueError(f"{name} {shown}: is a symbolic link, expected a directory (pass the directory itself)")
    if os.path.lexists(ap) and not os.path.isdir(ap):
        raise ValueError(f"{name} {shown}: is a file, expected a directory")
    _check_parents(ap, shown, name)
    recover(ap)
    if os.path.isdir(ap):
        check_contents(ap, kind, overwrite, name=name, shown=shown)
    return ap


def prepare_output_file(path: str, *, name: str = "--out") -> str:
    """Check, before any work, that file ``path`` can be written: not a directory, no parent component
    is a file, the parent is writable (created if missing). Returns the absolute path."""
    shown = str(path)
    ap = os.path.abspath(path)
    if os.path.isdir(ap):
        raise ValueError(f"{name} {shown}: is a directory, expected a file")
    _check_parents(ap, shown, name)
    return ap


# ----------------------------------------------------------------------------- temporaries of the swap


def _temp_re(path: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(os.path.basename(path))}\.tmp-(\d+)-[0-9a-f]{{8}}(\.old)?$")


def temp_dir_name(path: str) -> str:
    """A fresh temporary sibling of ``path``: ``.NAME.tmp-<pid>-<rand>``."""
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path),
                        f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or no valid pid)
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _dead_temps(path: str) -> list[tuple[str, bool]]:
    """``(temp path, is_old)`` of the temporaries of ``path`` left by processes that are gone."""
    parent = os.path.dirname(path)
    pat = _temp_re(path)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    out = []
    for n in names:
        m = pat.match(n)
        if m and not _alive(int(m.group(1))):
            out.append((os.path.join(parent, n), bool(m.group(2))))
    return out


def recover(path: str) -> None:
    """If ``path`` is missing because a process was killed between the two renames of the swap (old
    directory moved to ``.NAME.tmp-<pid>-<rand>.old``, the complete new one still at ``.NAME.tmp-<pid>-<rand>``),
    finish that swap (or, without the new directory, put the old one back)."""
    path = os.path.abspath(path)
    if os.path.lexists(path):
        return
    olds = [p for p, is_old in _dead_temps(path) if is_old and os.path.isdir(p)]
    if not olds:
        return
    old = max(olds, key=os.path.getmtime)
    new = old[: -len(".old")]
    os.replace(new if os.path.isdir(new) else old, path)


def remove_stale_temps(path: str) -> None:
    """Remove the temporaries of ``path`` left by dead processes (never those of a live one); call
    after :func:`recover`."""
    path = os.path.abspath(path)
    for p, _ in _dead_temps(path):
        shutil.rmtree(p, ignore_errors=True)
