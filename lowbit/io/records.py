"""Run records: versions, device, git state, peak memory, and atomic text / JSON writes, for every
file lowbit writes about a run (``metrics.json``, ``lowbit eval --out``, recipes, checkpoint metadata)."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import platform
import resource
import subprocess
import sys

__all__ = ["environment_info", "cpu_info", "numerics_info", "peak_rss_mb", "proc_status_mib", "reset_peak_rss", "sha256_text", "write_json",
           "write_text", "write_bytes", "layers_csv"]


def _git_info() -> dict:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}
    return {"git_sha": sha, "git_dirty": dirty if sha else None}


def proc_status_mib(field: str) -> float:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``: the peak since the process
    started or since :func:`reset_peak_rss`) in MiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (``VmHWM``; Linux ``clear_refs`` 5), so
    that it measures from here; False where the kernel does not allow it. (``getrusage``'s
    ``ru_maxrss`` cannot be reset and survives ``exec``: a child reports its parent's peak when
    that was larger.)"""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process (``getrusage``; Linux reports KiB) in MiB."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


#: CPU feature flags that change which float code XLA emits (and so the last bits of a result)
_ISA_FLAGS = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
              "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "asimd", "sve", "sve2")


def cpu_info() -> dict:
    """``{"cpu_model", "isa"}``: the CPU's model name and those of its feature flags that change the
    float code XLA emits (Linux ``/proc/cpuinfo``; elsewhere what :mod:`platform` says)."""
    model, flags = platform.processor() or None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and model in (None, "", platform.machine()):
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"cpu_model": model, "isa": [f for f in _ISA_FLAGS if f in flags]}


def numerics_info() -> dict:
    """What changes numbers besides the code: ``XLA_FLAGS``, ``LOWBIT_KERNELS`` and the jax settings of
    matmul precision and 64-bit mode."""
    import jax

    return {"xla_flags": os.environ.get("XLA_FLAGS") or None, "lowbit_kernels": os.environ.get("LOWBIT_KERNELS") or None,
            "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
            "jax_enable_x64": bool(jax.config.jax_enable_x64)}


def environment_info() -> dict:
    """Versions, device (CPU model and ISA flags, or the accelerator kind), the settings that change
    numerics, and git state, for results records."""
    import jax
    import jaxlib

    import lowbit

    dev = jax.devices()[0]
    return {"lowbit": lowbit.__version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "device_kind": dev.device_kind, "platform_backend": dev.platform,
            "n_devices": jax.device_count(), "cpu_count": os.cpu_count(), **cpu_info(), **numerics_info(),
            **_git_info()}


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (a temporary file in the same directory,
    flushed to disk, then ``os.replace``): a reader sees the old file or the new one, never a
    truncated mix, and a crash right after the return keeps the new one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    """:func:`write_bytes` of ``text`` (UTF-8, newlines as they are)."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, record: dict) -> None:
    """:func:`write_text` of ``record`` as indented JSON."""
    write_text(path, json.dumps(record, indent=2, default=str) + "\n")


def layers_csv(rows: list[dict]) -> str:
    """The per-weight report rows as ``layers.csv`` text: every key of any row a column, ``layer`` and
    ``path`` first, the rest sorted (one format for ``lowbit run``, ``lowbit quantize`` and ``lowbit merge``)."""
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("layer", "path"), k))
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
