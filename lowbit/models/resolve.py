"""Which loader a model name or path goes to, the hub download, and a model's fingerprint.

``load_model(name_or_path)`` accepts, in this order:

* ``"smollm2-135m"`` -- the embedded default, SmolLM2-135M-Instruct Q4_1 GGUF (fetched and cached by
  :func:`lowbit.io.assets.smollm2_gguf`), dequantized to float: lowbit's float baseline;
* ``"gemma3-270m"`` -- Gemma-3-270M (base) Q4_K_M GGUF (:func:`lowbit.io.assets.gemma3_270m_gguf`,
  Gemma terms of use), dequantized to float: a :mod:`lowbit.models.gemma3` model;
* a ``.gguf`` file (architecture ``llama``, or ``gemma3``: see :func:`load_gguf`);
* a lowbit model checkpoint directory (``manifest.json``, written by :func:`save_model`);
* an HF model directory (``config.json`` + ``*.safetensors``; model_type llama / mistral / qwen2 / qwen3);
* a hub id ``owner/name``, downloaded with ``huggingface_hub.snapshot_download`` when the hub is
  reachable (offline it fails at once with the list of offline options).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import threading

from lowbit.models.checkpoint import load_checkpoint
from lowbit.models.formats.gguf import load_gguf
from lowbit.models.formats.hf import load_hf_dir

__all__ = ["load_model", "resolve_model", "model_fingerprint", "DEFAULT_MODEL", "GEMMA3_MODEL"]


DEFAULT_MODEL = "smollm2-135m"
GEMMA3_MODEL = "gemma3-270m"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def resolve_model(name_or_path: str) -> tuple[str, str]:
    """``(kind, path)`` with kind in gguf | checkpoint | hf_dir | hub; raises if nothing matches."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"model: expected a name or path, got {name_or_path!r}")
    if name_or_path.lower() in (DEFAULT_MODEL, "smollm2", "smollm2-135m-instruct"):
        from lowbit.io import assets

        return "gguf", assets.smollm2_gguf()
    if name_or_path.lower() in (GEMMA3_MODEL, "gemma-3-270m"):
        from lowbit.io import assets

        return "gguf", assets.gemma3_270m_gguf()
    from lowbit.io import remote

    if remote.is_remote(name_or_path):   # a checkpoint or model directory in a bucket: its local copy
        mirror = remote.Mirror(name_or_path)
        if not mirror.pull() and not os.listdir(mirror.stage):
            raise FileNotFoundError(f"{name_or_path}: nothing there")
        name_or_path = mirror.stage
    p = os.path.expanduser(name_or_path)
    if os.path.isfile(p):
        if p.endswith(".gguf"):
            return "gguf", p
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf", p
        raise ValueError(f"{p}: not a .gguf file; pass a GGUF file, an HF model directory or a "
                         "lowbit checkpoint directory")
    if os.path.isdir(p):
        if os.path.isfile(os.path.join(p, "manifest.json")):
            return "checkpoint", p
        if os.path.isfile(os.path.join(p, "config.json")):
            return "hf_dir", p
        ggufs = glob.glob(os.path.join(p, "*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise FileNotFoundError(f"{p}: directory has no config.json, manifest.json or single .gguf file")
    if _HUB_ID.match(name_or_path) and not name_or_path.startswith((".", "/")):
        return "hub", name_or_path
    raise FileNotFoundError(f"model {name_or_path!r}: no such file or directory; expected "
                            f"{DEFAULT_MODEL!r}, {GEMMA3_MODEL!r}, a .gguf file, an HF model directory, a lowbit "
                            "checkpoint directory or a hub id 'owner/name'")


def _offline_message(repo: str, why: str) -> str:
    return (f"model {repo!r}: cannot download from the Hugging Face hub ({why}). Offline options: "
            f"'{DEFAULT_MODEL}' (the embedded SmolLM2-135M GGUF), a local .gguf file, a local HF "
            "directory with config.json + *.safetensors (+ tokenizer.json), or a lowbit checkpoint "
            "directory written by save_model()")


def _hub_reachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """None if a TCP connection to the endpoint opens within ``timeout`` s, else the reason."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(endpoint)
    host, port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
    result: list[str | None] = ["timed out"]

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result[0] = None
        except OSError as e:
            result[0] = f"{host}:{port} unreachable: {e}"

    th = threading.Thread(target=probe, daemon=True)
    th.start()
    th.join(timeout + 1.0)
    return result[0]


def _download_hub(repo: str) -> str:
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise RuntimeError(_offline_message(repo, "huggingface_hub is not installed")) from None
    patterns = ["*.json", "*.safetensors", "tokenizer*"]
    try:  # already in the local cache?
        return huggingface_hub.snapshot_download(repo, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(_offline_message(repo, "HF_HUB_OFFLINE is set and it is not cached"))
    why = _hub_reachable(constants.ENDPOINT)
    if why is not None:
        raise RuntimeError(_offline_message(repo, why))
    try:
        return huggingface_hub.snapshot_download(repo, allow_patterns=patterns, etag_timeout=10)
    except Exception as e:
        raise RuntimeError(_offline_message(repo, f"{type(e).__name__}: {e}")) from None


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype="float32"):
    """Load any supported model -> ``(params, cfg, tokenizer)`` (see the module docstring).

    ``dtype`` is the dtype of the float parameters and of the forward pass (QuantizedTensor leaves
    of a checkpoint are kept as they are).
    """
    kind, path = resolve_model(name_or_path)
    if kind == "gguf":
        return load_gguf(path, dtype=dtype)
    if kind == "checkpoint":
        return load_checkpoint(path, dtype=dtype)
    if kind == "hub":
        path = _download_hub(path)
    return load_hf_dir(path, dtype=dtype)


def model_fingerprint(name_or_path: str) -> dict:
    """``{"kind", "path", "sha256", "files"}`` of what :func:`load_model` would read (no hub access:
    hub ids are reported as such with ``sha256=None``). Directories hash the sorted list of
    ``(relative path, sha256)`` of their files."""
    kind, path = resolve_model(name_or_path)
    if kind == "hub":
        return {"kind": kind, "path": path, "sha256": None, "files": None}

    def sha(fn):
        h = hashlib.sha256()
        with open(fn, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        return h.hexdigest()

    if os.path.isfile(path):
        return {"kind": kind, "path": os.path.abspath(path), "sha256": sha(path), "files": None}
    files = {}
    for root, _, names in os.walk(path):
        for n in names:
            fn = os.path.join(root, n)
            files[os.path.relpath(fn, path)] = sha(fn)
    h = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()
    return {"kind": kind, "path": os.path.abspath(path), "sha256": h, "files": files}
