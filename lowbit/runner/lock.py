"""One run at a time per results directory: an advisory lock on ``DIR/.lock``.

``with hold(directory):`` takes an exclusive, non-blocking ``flock`` on ``directory/.lock`` and
writes who holds it (pid, host, start time) into the file. A second run on the same directory
fails at once with ``another run holds DIR since <time> (pid N on HOST)`` instead of doing the whole
work twice. The kernel releases the lock when the holder exits, however it dies (``kill -9``
included), so a crashed run never leaves a stale lock behind; the file itself stays (harmless).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket

__all__ = ["hold", "LockedError"]


class LockedError(RuntimeError):
    """Another live process holds the lock of this directory."""


@contextlib.contextmanager
def hold(directory: str, what: str = "run"):
    """Exclusive lock on ``directory`` for the ``with`` block (see the module docstring)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ValueError(f"results directory {directory}: cannot write there ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = _read_holder(fd)
            raise LockedError(f"another {holder.get('what', 'run')} holds {directory} since "
                              f"{holder.get('since', '?')} (pid {holder.get('pid', '?')} on "
                              f"{holder.get('host', '?')}); wait for it to finish or stop it") from None
        info = {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        yield info
    finally:
        os.close(fd)  # releases the flock


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
