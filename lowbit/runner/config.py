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
      - {name: gptq-w4g128, method: gptq, quant: {bits: 4, group_size: 128}, gptq: {act_order: true}}
    variants:
      smoke: {calib: {nsamples: 4, seqlen: 128}, eval: {seqlen: 128, max_windows: 2}}

Methods come from the registry (:mod:`lowbit.methods`): ``method`` names a registered method and
the method's options live under the key named after it (``gptq: {act_order: true}``), checked
against its options dataclass. Driver options (``true_sequential``, ``skip_first``, ``token_cap``)
are calibration settings (``calib:``).

A config may say what it reproduces (``expect:``, big_vision style): per row and dataset the
expected perplexity and a relative tolerance; ``lowbit run`` prints each row against it and flags
departures::

    expect:
      tolerance: 0.01                      # relative, default 1%
      rows: {fp: {brown: 32.80}, rtn-w4g128: {brown: 43.40}}

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
import math
import os
import re
import types
import typing
from typing import Any, Sequence

import yaml

from lowbit import methods as method_registry
from lowbit.data.corpora import SPLITS

__all__ = ["QuantCfg", "MethodCfg", "CalibCfg", "EvalCfg", "ExpectCfg", "FinetuneCfg", "DistillCfg", "ExperimentCfg", "load_config",
           "config_hash", "to_dict", "from_dict"]


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
    dq_map: str = "linear"        # "dynamic": bitsandbytes' double quantization (QLoRA)
    scale_dtype: str = "float16"  # storage dtype of the scales (QLoRA / bitsandbytes: float32)

#: QuantCfg fields added after results were published, left out of a row's config hash while they
#: hold their default (so existing results stay up to date)
QUANT_HASH_DEFAULTS = {"dq_map": "linear", "scale_dtype": "float16"}


@dataclasses.dataclass(frozen=True)
class MethodCfg:
    """One row of the table: a registered ``method`` (``fp``, ``rtn``, ``gptq``, ...) with its
    ``options`` (an instance of the method's options dataclass; YAML key: the method's name) on
    every linear whose path does not match ``skip`` (regex, default: embeddings and lm_head stay dense)."""
    name: str
    method: str = "rtn"
    quant: QuantCfg = QuantCfg()
    options: Any = None
    skip: str = r"^(embed_tokens|lm_head)$"
    finetune: bool = False   # then LoRA adapters are trained on the row's model (the experiment's ``finetune:``)
    distill: bool = False    # then the row's OneBit model is trained by distillation (the experiment's ``distill:``)
    recipe: str | None = None  # a mixed-precision recipe file (lowbit.alloc.recipe): per-linear specs, not ``quant``

    def __post_init__(self):
        m = method_registry.get(self.method)
        if self.options is None:
            object.__setattr__(self, "options", m.options())
        elif not isinstance(self.options, m.options):
            raise ValueError(f"methods.{self.name}.{self.method}: expected {m.options.__name__} options, "
                             f"got {type(self.options).__name__}")
        if self.distill and self.method != "onebit":
            raise ValueError(f"methods.{self.name}.distill: distillation trains OneBit weights; the row's method is "
                             f"{self.method!r} (use method: onebit)")
        if self.recipe is not None and not (isinstance(self.recipe, str) and self.recipe):
            raise ValueError(f"methods.{self.name}.recipe={self.recipe!r}: expected the path of a recipe file")
        if self.distill and self.finetune:
            raise ValueError(f"methods.{self.name}: distill and finetune are exclusive (one training per row)")

    @property
    def quantizes(self) -> bool:
        return method_registry.get(self.method).quantizes


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
    true_sequential: bool = True  # calibrate a block's linears group by group (else from one capture pass)
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
    bos: bool = False        # start every window with the tokenizer's BOS (Gemma); False: the GPTQ protocol


@dataclasses.dataclass(frozen=True)
class ExpectCfg:
    """What the config should reproduce: ``rows[method name][dataset] = expected perplexity``
    (from the committed results, see ``paper/``), within a relative ``tolerance``."""
    tolerance: float = 0.01
    rows: Any = None

    def __post_init__(self):
        rows = self.rows or {}
        if not isinstance(rows, dict) or not all(isinstance(v, dict) for v in rows.values()):
            raise ValueError(f"expect.rows: expected {{method name: {{dataset: ppl}}}}, got {self.rows!r}")
        for name, d in rows.items():
            for ds, v in d.items():
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                    raise ValueError(f"expect.rows.{name}.{ds}={v!r}: expected a positive perplexity")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"expect.tolerance={self.tolerance!r}: expected a relative tolerance in (0, 1)")
        object.__setattr__(self, "rows", {k: dict(v) for k, v in rows.items()})


@dataclasses.dataclass(frozen=True)
class FinetuneCfg:
    """LoRA fine-tuning of the rows marked ``finetune: true`` (QLoRA when the row quantizes the
    base first): adapters of ``rank``/``alpha``/``dropout`` on every linear matching ``targets``,
    trained for ``steps`` optimizer steps of ``batch_size`` x ``accum`` windows of ``seqlen``
    tokens from ``data``'s ``split`` (the evaluation split is never trained on). Defaults: the QLoRA
    paper's (r 64, alpha 16, AdamW lr 2e-4 constant after 3% warmup, max grad norm 0.3, beta2 0.999)."""
    data: str = "austen"
    split: str = "calib"
    steps: int = 100
    batch_size: int = 4
    seqlen: int = 256
    accum: int = 1
    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.1      # the QLoRA paper's LoRA dropout for models up to 13B
    targets: str = r"^layers/\d+/.*_proj$"
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    clip_norm: float = 0.3
    compute_dtype: str = "bfloat16"
    save_every: int = 25

    def __post_init__(self):
        _check_training("finetune", self, positive=("steps", "batch_size", "seqlen", "accum", "rank", "save_every"),
                        reals=("alpha", "lr", "clip_norm"))
        if not (0 <= self.dropout < 1 and 0 <= self.warmup_ratio < 1):
            raise ValueError(f"finetune.dropout={self.dropout!r} / warmup_ratio={self.warmup_ratio!r}: "
                             "expected fractions in [0, 1)")


def _check_training(key: str, c, *, positive: tuple[str, ...], reals: tuple[str, ...], nonneg: tuple[str, ...] = (),
                    check_split: bool = True) -> None:
    """The checks every training block (``finetune:``, ``distill:``) shares: positive ints, finite
    positive reals, ints >= 0, a split the evaluation does not use, the compute dtype."""
    for name in positive + nonneg:
        v, lo = getattr(c, name), (1 if name in positive else 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{key}.{name}={v!r}: expected {'a positive integer' if lo else 'an integer >= 0'}")
    for name in reals:
        v = getattr(c, name)
        if not (isinstance(v, float) and math.isfinite(v) and v > 0):
            raise ValueError(f"{key}.{name}={v!r}: expected a finite positive number")
    if check_split and (c.split not in SPLITS or c.split == "all"):
        raise ValueError(f"{key}.split={c.split!r}: expected 'calib' or 'eval' (a split that the "
                         "evaluation does not use)")
    if c.compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"{key}.compute_dtype={c.compute_dtype!r}: expected float32 or bfloat16")


@dataclasses.dataclass(frozen=True)
class DistillCfg:
    """Knowledge distillation of the rows marked ``distill: true`` (OneBit, :mod:`lowbit.methods.onebit`):
    the float model is the teacher; ``steps`` optimizer steps of ``batch_size`` x ``accum`` windows
    of ``seqlen`` tokens, on ``data``: ``self`` (``nsamples`` sequences sampled from the float model,
    LLM-QAT's protocol as the reference's training data) or a corpus name (its ``split``).
    Optimizer: the reference's (AdamW 0.9 / 0.98, weight decay 0.01, clip 1.0, ``warmup_steps`` then
    cosine to 0) at ``lr``. ``eval_every``: every that many steps the perplexity of the model being
    trained on the first ``eval_windows`` windows (of ``seqlen``) of the first eval dataset (the
    perplexity-vs-steps curve; 0: none). ``save_model``: also write the packed distilled model (1-bit
    codes + the two float16 vectors per linear) as a lowbit checkpoint in the row's ``model/``
    (it changes no number, so it is not part of the row's config hash)."""
    data: str = "self"
    split: str = "calib"
    nsamples: int = 64
    steps: int = 100
    batch_size: int = 4
    seqlen: int = 256
    accum: int = 1
    lr: float = 4e-4
    warmup_steps: int = 10
    compute_dtype: str = "float32"
    eval_every: int = 0
    eval_windows: int = 4
    save_every: int = 25
    save_model: bool = False

    def __post_init__(self):
        if not isinstance(self.save_model, bool):
            raise ValueError(f"distill.save_model={self.save_model!r}: expected a bool")
        _check_training("distill", self, positive=("nsamples", "steps", "batch_size", "seqlen", "accum", "save_every",
                                                   "eval_windows"),
                        reals=("lr",), nonneg=("warmup_steps", "eval_every"), check_split=self.data != "self")
        if self.seqlen < 2:
            raise ValueError(f"distill.seqlen={self.seqlen}: expected >= 2")


@dataclasses.dataclass(frozen=True)
class ExperimentCfg:
    experiment: str
    methods: tuple[MethodCfg, ...]
    description: str = ""
    model: str = "smollm2-135m"
    seed: int = 0
    calib: CalibCfg = CalibCfg()
    eval: EvalCfg = EvalCfg()
    expect: ExpectCfg = ExpectCfg()
    finetune: FinetuneCfg = FinetuneCfg()
    distill: DistillCfg = DistillCfg()
    variant: str | None = None
    mesh: dict | None = None   # {data: N, model: M} (lowbit.dist); None: every device on data. Changes no number.

    def __post_init__(self):
        if self.mesh is not None:
            from lowbit.dist import parse_mesh

            parse_mesh(self.mesh)
        if not self.methods:
            raise ValueError("methods: expected at least one method (a table row)")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"methods: names must be unique, got {names}")
        _check_name("experiment", self.experiment)
        if self.variant is not None:
            _check_name("variant", self.variant)
        for i, m in enumerate(self.methods):
            _check_name(f"methods.{i}.name", m.name)
        if self.calib.source not in ("corpus", "self"):
            raise ValueError(f"calib.source={self.calib.source!r}: expected 'corpus' or 'self'")
        for key, v in (("calib.nsamples", self.calib.nsamples), ("calib.seqlen", self.calib.seqlen),
                       ("eval.seqlen", self.eval.seqlen), ("calib.batch_size", self.calib.batch_size),
                       ("eval.batch_size", self.eval.batch_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{key}={v!r}: expected a positive integer")
        if not self.eval.data:
            raise ValueError("eval.data: expected at least one dataset")
        if self.eval.max_windows is not None and (not isinstance(self.eval.max_windows, int)
                                                  or isinstance(self.eval.max_windows, bool)
                                                  or self.eval.max_windows <= 0):
            raise ValueError(f"eval.max_windows={self.eval.max_windows!r}: expected a positive integer or null (all)")
        if not isinstance(self.calib.skip_first, int) or self.calib.skip_first < 0 \
                or self.calib.skip_first >= self.calib.seqlen:
            raise ValueError(f"calib.skip_first={self.calib.skip_first!r}: expected an integer in "
                             f"[0, calib.seqlen={self.calib.seqlen})")
        cap = self.calib.token_cap
        if cap is not None and not (isinstance(cap, float) and math.isfinite(cap) and cap > 0):
            raise ValueError(f"calib.token_cap={cap!r}: expected a finite positive multiple of the median, or null")
        for key, split in (("calib.split", self.calib.split), ("eval.split", self.eval.split)):
            if split not in SPLITS:
                raise ValueError(f"{key}={split!r}: expected one of {list(SPLITS)}")
        for m in self.methods:
            if m.finetune and (self.finetune.data, self.finetune.split) in {(d, self.eval.split) for d in self.eval.data}:
                raise ValueError(f"methods.{m.name}: finetune.data {self.finetune.data}/{self.finetune.split} is an "
                                 "evaluation split; train on another split")
            if m.distill and (self.distill.data, self.distill.split) in {(d, self.eval.split) for d in self.eval.data}:
                raise ValueError(f"methods.{m.name}: distill.data {self.distill.data}/{self.distill.split} is an "
                                 "evaluation split; distil on another split or on self-generated data (data: self)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed={self.seed!r}: expected an integer")


#: a results-directory component: letters, digits, ``.``, ``_``, ``-``; no leading dot
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _check_name(key: str, name) -> None:
    """``name`` becomes one directory under the results root: a single safe path component
    (no ``/``, ``..``, absolute paths or hidden names), so no config can write outside it."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"{key}={name!r}: expected a single file-name-safe path component "
                         f"(letters, digits, '.', '_', '-'; not starting with '.'), e.g. 'gptq_smollm2'")


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


def _method_from_dict(d: Any, where: str) -> MethodCfg:
    """A table row: the options of method ``X`` live under key ``X`` (see the module docstring)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping, got {d!r}")
    d = dict(d)
    name = d.get("method", "rtn")
    if name not in method_registry.METHODS:
        raise ValueError(f"{where}.method={name!r}: expected one of {list(method_registry.METHODS)}")
    m = method_registry.get(name)
    opts = d.pop(name, None)
    others = [k for k in d if k in method_registry.METHODS]
    if others:
        raise ValueError(f"{where}.{others[0]}: options of method {others[0]!r} on a {name!r} row")
    row = from_dict(MethodCfg, {**d, "options": None}, where)
    return dataclasses.replace(row, options=from_dict(m.options, opts or {}, f"{where}.{name}"))


def from_dict(cls, d: Any, where: str = ""):
    """Build dataclass ``cls`` from a mapping, recursively; unknown keys raise naming their path."""
    if isinstance(d, cls):
        return d
    if cls is MethodCfg and "options" not in (d or {}):
        return _method_from_dict(d, where or "method")
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


def _plain(x):
    if isinstance(x, MethodCfg):
        d = {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x) if f.name != "options"}
        opts = _plain(x.options)
        if opts:
            d[x.method] = opts
        return d
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def to_dict(cfg) -> dict:
    """Plain, JSON/YAML-able dict of a config dataclass or dict (tuples become lists; a method's
    options under the key named after the method)."""
    return json.loads(json.dumps(_plain(cfg)))


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

