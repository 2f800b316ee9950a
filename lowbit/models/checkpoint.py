"""lowbit model checkpoints: a params tree (weight nodes allowed) with its model config and
tokenizer.

lowbit model checkpoint convention (:func:`save_model` / :func:`load_model`): a
:func:`lowbit.io.checkpoint.save` directory of the params tree (QuantizedTensors allowed) whose
``extra.json`` holds::

    {"lowbit_model": 1,
     "model_config": dataclasses.asdict(cfg),      # LlamaConfig.from_dict() reads it back
     "tokenizer": Tokenizer.to_json() string | a path (absolute, or relative to the checkpoint) | null,
     ...}                                          # the caller's extra keys (recipe, source, metrics)
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from lowbit.core.lora import strip_lora
from lowbit.core.nodes import is_opaque
from lowbit.data.tokenizer import Tokenizer
from lowbit.models.llama import LlamaConfig

__all__ = ["save_model", "load_checkpoint", "family_api"]


def family_api(cfg_or_name, where: str = ""):
    """``(family name, config class, check_params)`` of a config instance or a family name."""
    from lowbit.models import gemma3, llama

    api = {"llama": (llama.LlamaConfig, llama.check_params),
           "gemma3": (gemma3.Gemma3Config, gemma3.check_params)}
    if isinstance(cfg_or_name, str):
        if cfg_or_name not in api:
            raise ValueError(f"{where}: model_family {cfg_or_name!r} is not supported; supported: {sorted(api)}")
        return (cfg_or_name, *api[cfg_or_name])
    for name, (cls, check) in api.items():
        if isinstance(cfg_or_name, cls):
            return name, cls, check
    raise ValueError(f"cfg: {type(cfg_or_name).__name__} is not a config of a model family with "
                     f"checkpoint support ({sorted(api)})")


def save_model(path: str, params, cfg: LlamaConfig, tokenizer: Tokenizer | None, extra: dict | None = None, *,
               extra_files: dict | None = None, overwrite: bool = False, check_view=None) -> str:
    """Write a lowbit model checkpoint (see the module docstring for the ``extra.json`` convention).

    ``extra_files`` ({relative name: str or bytes}, e.g. ``layers.csv``) are written inside the atomic
    write and listed in the directory's marker; an existing ``path`` is replaced only as
    :func:`lowbit.io.outputs.prepare_output_dir` allows (``overwrite``: also another kind of lowbit output).
    ``check_view`` maps ``params`` to what the family's shape check sees (default: LoRA adapters
    replaced by their bases, :func:`lowbit.core.lora.strip_lora`, so a model with adapters is checked on
    its bases).
    """
    from lowbit.io import checkpoint

    family, _, check = family_api(cfg)
    check((check_view or strip_lora)(params), cfg)
    meta = dict(extra or {})
    clash = {"lowbit_model", "model_config", "tokenizer", "model_family"} & set(meta)
    if clash:
        raise ValueError(f"extra: keys {sorted(clash)} are reserved by save_model")
    meta.update({"lowbit_model": 1, "model_config": cfg.to_dict(),
                 "tokenizer": tokenizer.to_json() if tokenizer is not None else None})
    if family != "llama":  # Llama checkpoints stay as they were (no key = llama)
        meta["model_family"] = family
    return checkpoint.save(path, params, extra=meta, extra_files=extra_files, overwrite=overwrite)


def load_checkpoint(path: str, *, dtype=None, check_view=None):
    """Read a directory written by :func:`save_model` -> ``(params, cfg, tokenizer)``; a damaged
    checkpoint raises :class:`lowbit.io.checkpoint.CheckpointError` naming the directory.
    ``check_view``: as for :func:`save_model`."""
    from lowbit.io import checkpoint

    extra = checkpoint.read_extra(path)
    if not isinstance(extra, dict) or "model_config" not in extra:
        raise checkpoint.CheckpointError(f"{path}: lowbit checkpoint without 'model_config' in extra.json "
                                         "(not written by lowbit.models.save_model)")
    _, config_cls, check = family_api(extra.get("model_family", "llama"), path)
    cfg = config_cls.from_dict(extra["model_config"])
    params = checkpoint.restore(path)
    if dtype is not None:   # float leaves cast; weight nodes (QuantizedTensors, ...) stored as they are
        import jax

        dt = jnp.dtype(dtype)
        params = jax.tree_util.tree_map(lambda x: x if is_opaque(x) else x.astype(dt), params, is_leaf=is_opaque)
        cfg = cfg.replace(dtype=str(dt))
    check((check_view or strip_lora)(params), cfg)
    tok = extra.get("tokenizer")
    if tok is None:
        tokenizer = None
    elif tok.lstrip().startswith("{"):
        tokenizer = Tokenizer.from_json(tok)
    else:
        tp = tok if os.path.isabs(tok) else os.path.join(path, tok)
        with open(tp) as f:
            text = f.read()
        try:
            tokenizer = Tokenizer.from_json(text)
        except ValueError:  # a plain HF tokenizer.json
            tokenizer = Tokenizer.from_file(tp, cfg.bos_token_id, cfg.eos_token_id)
    return params, cfg, tokenizer
