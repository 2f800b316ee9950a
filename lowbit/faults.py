"""Named crash points for fault-injection tests: ``crash_point("name")`` at every place where lowbit
commits something to disk.

With ``LOWBIT_CRASH_AT=name`` (optionally ``name:N``, the N-th time the point is reached, default 1)
the process dies right there with ``os._exit(137)``, as a ``kill -9`` would: no ``finally`` blocks,
no atexit handlers, no flushing. The fault-injection suite (``tests/test_fault_injection.py``) runs
lowbit in a subprocess once per point and checks that a rerun recovers. Without the variable a
crash point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import sys

__all__ = ["crash_point"]

_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Die here (exit 137, no cleanup) when ``LOWBIT_CRASH_AT`` names this point."""
    want = os.environ.get("LOWBIT_CRASH_AT")
    if not want:
        return
    target, _, nth = want.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        sys.stderr.write(f"[lowbit] LOWBIT_CRASH_AT={want}: killed at {name}\n")
        sys.stderr.flush()
        os._exit(137)
