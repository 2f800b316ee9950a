"""Experiment configs: YAML files loaded into frozen dataclasses.

A config file describes one experiment (one paper table): a model, calibration and evaluation
data, and a list of methods (the table's rows)::

    # configs/gptq_smollm2.yaml
    # Reproduces: GPTQ paper Table 3 protocol (w4 / w3, RTN vs GPTQ) on SmolLM2-135M / Brown.
    # Run: lowbit run configs/gptq_smollm2.yaml            (smoke: --variant smoke)
    base: _base.yaml                  # inherit; mappings merge key by key, lists are replaced
    experiment: gptq_smollm2
    methods:
      - {name: fp, method: fp}
      - {name: gptq-w4g128, method: gptq, quant: {bits: 4, group_size: 128}}
    variants:
      smoke: {calib: {nsamples: 4, seqlen: 128}, eval: {seqlen: 128, max_windows: 2}}

Top-level keys starting with ``_`` are ignored (use them to hold YAML anchors, e.g.
``_gptq: &gptq {act_order: true}`` then ``gptq: *gptq`` in several methods).

Resolution order: ``base`` chain (recursively, relative paths) -> the file -> ``variants[name]``
-> ``--set key.path=value`` overrides (values parsed as YAML; list items by index, e.g.
``methods.1.quant.bits=2``). Unknown keys are errors that name the full key path.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import types
import typing
from typing import Any, Sequence

import yaml

__all__ = ["QuantCfg", "GPTQCfg", "MethodCfg", "CalibCfg", "EvalCfg", "ExperimentCfg", "load_config",
           "config_hash", "to_dict", "from_dict", "METHODS"]

METHODS = ("fp", "rtn", "gptq")


@dataclasses.dataclass(frozen=True)
class QuantCfg:
    """Arguments of :class:`lowbit.QuantSpec` (group_size null = per output channel). Partial last
    groups are on by default here, as in the GPTQ reference code (SmolLM2's 576 = 4 x 128 + 64)."""
    bits: int = 4
    group_size: int | None = 128
    partial_groups: bool = True
    symmetric: bool = False
    format: str = "int"
    clip: bool = False
    double_quant: bool = False


@dataclasses.dataclass(frozen=True)
class GPTQCfg:
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    blocksize: int = 128
    true_sequential: bool = True


@dataclasses.dataclass(frozen=True)
class MethodCfg:
    """One row of the table: ``fp`` (no quantization), ``rtn`` or ``gptq`` on every linear whose
    path does not match ``skip`` (regex, default: embeddings and lm_head stay dense)."""
    name: str
    method: str = "rtn"
    quant: QuantCfg = QuantCfg()
    gptq: GPTQCfg = GPTQCfg()
    skip: str = r"^(embed_tokens|lm_head)$"


@dataclasses.dataclass(frozen=True)
class CalibCfg:
    """Calibration windows: ``nsamples`` random windows of ``seqlen`` tokens from ``data``'s
    ``split`` (``source: corpus``) or sampled from the model itself (``source: self``)."""
    data: str = "brown"
    split: str = "calib"
    nsamples: int = 128
    seqlen: int = 2048
    source: str = "corpus"
    batch_size: int = 8
    skip_first: int = 0      # leading positions per window left out of the statistics (attention sinks)
    token_cap: float | None = None  # cap token input norms at this multiple of the median (massive activations)


@dataclasses.dataclass(frozen=True)
class EvalCfg:
    """Perplexity (GPTQ protocol) on each of ``data`` (``split``), windows of ``seqlen``."""
    data: tuple[str, ...] = ("brown", "austen")
    split: str = "eval"
    seqlen: int = 2048
    max_windows: int | None = None
    batch_size: int = 4


@dataclasses.dataclass(frozen=True)
class ExperimentCfg:
    experiment: str
    methods: tuple[MethodCfg, ...]
    description: str = ""
    model: str = "smollm2-135m"
    seed: int = 0
    calib: CalibCfg = CalibCfg()
    eval: EvalCfg = EvalCfg()
    variant: str | None = None

    def __post_init__(self):
        if not self.methods:
            raise ValueError("methods: expected at least one method (a table row)")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"methods: names must be unique, got {names}")
        for i, m in enumerate(self.methods):
            if m.method not in METHODS:
                raise ValueError(f"methods.{i}.method={m.method!r}: expected one of {METHODS}")
            if not m.name or any(c in m.name for c in "/\\ ") or m.name.startswith("."):
                raise ValueError(f"methods.{i}.name={m.name!r}: expected a non-empty file-name-safe string")
        if self.calib.source not in ("corpus", "self"):
            raise ValueError(f"calib.source={self.calib.source!r}: expected 'corpus' or 'self'")
        for key, v in (("calib.nsamples", self.calib.nsamples), ("calib.seqlen", self.calib.seqlen),
                       ("eval.seqlen", self.eval.seqlen), ("calib.batch_size", self.calib.batch_size),
                       ("eval.batch_size", self.eval.batch_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{key}={v!r}: expected a positive integer")
        if not self.eval.data:
            raise ValueError("eval.data: expected at least one dataset")


# ----------------------------------------------------------------------------- dict <-> dataclass


def _convert(tp, value, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if isinstance(value, (str, int, float)) or value is None:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(item, v, f"{where}.{i}") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ValueError(f"{where}={value!r}: expected {tp.__name__}")
    return value


def from_dict(cls, d: Any, where: str = ""):
    """Build dataclass ``cls`` from a mapping, recursively; unknown keys raise naming their path."""
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{where + '.' if where else ''}{unknown[0]}: unknown key (expected one of {sorted(fields)})")
    kw = {k: _convert(hints[k], v, f"{where + '.' if where else ''}{k}") for k, v in d.items()}
    missing = [n for n, f in fields.items() if n not in kw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{where + '.' if where else ''}{missing[0]}: required key is missing")
    return cls(**kw)


def to_dict(cfg) -> dict:
    """Plain, JSON/YAML-able dict of a config dataclass or dict (tuples become lists)."""
    return json.loads(json.dumps(cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)))


def config_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- loading


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def _read(path: str, seen: tuple[str, ...] = ()) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise ValueError(f"{path}: circular 'base' chain {' -> '.join(seen + (path,))}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config {path}: no such file")
    with open(path) as f:
        try:
            d = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config {path}: invalid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"config {path}: expected a mapping at the top level")
    for k in [k for k in d if isinstance(k, str) and k.startswith("_")]:
        del d[k]  # private keys: holders of YAML anchors shared by several entries
    base = d.pop("base", None)
    if base is None:
        return d
    return _merge(_read(os.path.join(os.path.dirname(path), base), seen + (path,)), d)


def _set(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = d
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ValueError(f"--set {dotted}: {'.'.join(keys[:i + 1])} is not an index of a {len(node)}-item list")
            node = node[int(k)]
        else:
            node = node.setdefault(k, {})
            if not isinstance(node, (dict, list)):
                raise ValueError(f"--set {dotted}: {'.'.join(keys[:i + 1])} is not a mapping")
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ValueError(f"--set {dotted}: {last!r} is not an index of a {len(node)}-item list")
        node[int(last)] = value
    else:
        node[last] = value


def load_config(path: str, *, variant: str | None = None, overrides: Sequence[str] = ()) -> ExperimentCfg:
    """Resolve a config file (see the module docstring) into an :class:`ExperimentCfg`."""
    d = _read(path)
    variants = d.pop("variants", {}) or {}
    if variant is not None:
        if variant not in variants:
            raise ValueError(f"--variant {variant}: config {path} defines variants {sorted(variants) or 'none'}")
        d = _merge(d, variants[variant])
        d["variant"] = variant
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: value is not valid YAML: {e}") from None
        _set(d, key.strip(), value)
    return from_dict(ExperimentCfg, d)

