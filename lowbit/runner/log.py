"""The runner's one log line format (``[lowbit] ...`` on stdout, flushed)."""

__all__ = ["log"]


def log(msg: str) -> None:
    print(f"[lowbit] {msg}", flush=True)
