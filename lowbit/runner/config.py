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
import math
import os
import re
from typing import Any, NamedTuple, Sequence

import yaml

from lowbit.core.checks import is_int, is_real
from lowbit.core.config import QuantCfg, config_hash, from_dict, to_dict
from lowbit.data.corpora import SPLITS
from lowbit.pipeline import CalibCfg, MethodCfg

__all__ = ["QuantCfg", "MethodCfg", "CalibCfg", "EvalCfg", "ExpectCfg", "TrainingCfg", "FinetuneCfg", "DistillCfg",
           "ExperimentCfg", "Run", "expand", "load_config", "config_hash", "to_dict", "from_dict", "HASH_NEUTRAL"]


#: fields added after results were published, left out of a row's config hash while they hold their
#: default (so existing results stay up to date): {section of the row's config: {field: default}};
#: a method's options block (under the method's name) declares its own in ``HASH_NEUTRAL`` on its class
HASH_NEUTRAL = {"quant": {"dq_map": "linear", "scale_dtype": "float16"}, "calib": {"perturb": 0}}


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
    (from the committed results, see ``paper/``), within a relative ``tolerance``; a row may carry
    its own (``rows: {gptq-w3g128: {brown: 103.8, tolerance: 0.08}}``): the measured spread of a method
    whose numbers move with the float order (GPTQ), where deterministic rows keep the tight default.
    A row run with several seeds is compared by its mean."""
    tolerance: float = 0.01
    rows: Any = None

    def __post_init__(self):
        rows = self.rows or {}
        if not isinstance(rows, dict) or not all(isinstance(v, dict) for v in rows.values()):
            raise ValueError(f"expect.rows: expected {{method name: {{dataset: ppl}}}}, got {self.rows!r}")
        for name, d in rows.items():
            for ds, v in d.items():
                if ds == "tolerance":
                    if not is_real(v) or not 0 < v < 1:
                        raise ValueError(f"expect.rows.{name}.tolerance={v!r}: expected a relative tolerance in (0, 1)")
                elif not is_real(v) or not v > 0:
                    raise ValueError(f"expect.rows.{name}.{ds}={v!r}: expected a positive perplexity")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"expect.tolerance={self.tolerance!r}: expected a relative tolerance in (0, 1)")
        object.__setattr__(self, "rows", {k: dict(v) for k, v in rows.items()})

    def tolerance_of(self, row: str) -> float:
        """The relative tolerance of ``row``'s expectations (its own, or the config's)."""
        return float((self.rows or {}).get(row, {}).get("tolerance", self.tolerance))

    def expected(self, row: str) -> dict:
        """``{dataset: expected perplexity}`` of ``row``."""
        return {ds: v for ds, v in (self.rows or {}).get(row, {}).items() if ds != "tolerance"}


@dataclasses.dataclass(frozen=True)
class TrainingCfg:
    """What the training block of every training row kind (``finetune:``, ``distill:``) holds:
    ``steps`` optimizer steps of ``batch_size`` x ``accum`` windows of ``seqlen`` tokens from ``data``'s
    ``split`` (the evaluation split is never trained on) at learning rate ``lr``, computed in
    ``compute_dtype``, checkpointed every ``save_every`` steps."""
    data: str = "austen"
    split: str = "calib"
    steps: int = 100
    batch_size: int = 4
    seqlen: int = 256
    accum: int = 1
    lr: float = 2e-4
    compute_dtype: str = "bfloat16"
    save_every: int = 25

    def train_cfg(self, optim, trainable: str, seed: int, **kw):
        """The :class:`lowbit.train.TrainCfg` of a training row with this block."""
        from lowbit.train import TrainCfg

        return TrainCfg(steps=self.steps, batch_size=self.batch_size, seqlen=self.seqlen, accum=self.accum,
                        optim=optim, compute_dtype=self.compute_dtype, trainable=trainable, seed=seed,
                        save_every=self.save_every, **kw)

    def _check(self, key: str, *, positive: tuple[str, ...] = (), reals: tuple[str, ...] = (),
               nonneg: tuple[str, ...] = (), check_split: bool = True) -> None:
        """The checks every training block shares (its own fields too: ``positive`` ints, finite
        positive ``reals``, ``nonneg`` ints), a split the evaluation does not use, the compute dtype."""
        positive = ("steps", "batch_size", "seqlen", "accum", "save_every") + positive
        for name in positive + nonneg:
            v, lo = getattr(self, name), (1 if name in positive else 0)
            if not is_int(v) or v < lo:
                raise ValueError(f"{key}.{name}={v!r}: expected {'a positive integer' if lo else 'an integer >= 0'}")
        for name in ("lr",) + reals:
            v = getattr(self, name)
            if not (isinstance(v, float) and math.isfinite(v) and v > 0):
                raise ValueError(f"{key}.{name}={v!r}: expected a finite positive number")
        if check_split and (self.split not in SPLITS or self.split == "all"):
            raise ValueError(f"{key}.split={self.split!r}: expected 'calib' or 'eval' (a split that the "
                             "evaluation does not use)")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"{key}.compute_dtype={self.compute_dtype!r}: expected float32 or bfloat16")


@dataclasses.dataclass(frozen=True)
class FinetuneCfg(TrainingCfg):
    """LoRA fine-tuning of the rows marked ``finetune: true`` (QLoRA when the row quantizes the
    base first): adapters of ``rank``/``alpha``/``dropout`` on every linear matching ``targets``.
    Defaults: the QLoRA paper's (r 64, alpha 16, AdamW lr 2e-4 constant after 3% warmup, max grad
    norm 0.3, beta2 0.999)."""
    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.1      # the QLoRA paper's LoRA dropout for models up to 13B
    targets: str = r"^layers/\d+/.*_proj$"
    warmup_ratio: float = 0.03
    clip_norm: float = 0.3

    def __post_init__(self):
        self._check("finetune", positive=("rank",), reals=("alpha", "clip_norm"))
        if not (0 <= self.dropout < 1 and 0 <= self.warmup_ratio < 1):
            raise ValueError(f"finetune.dropout={self.dropout!r} / warmup_ratio={self.warmup_ratio!r}: "
                             "expected fractions in [0, 1)")


@dataclasses.dataclass(frozen=True)
class DistillCfg(TrainingCfg):
    """Knowledge distillation of the rows marked ``distill: true`` (the method's own training stage,
    e.g. OneBit's, :mod:`lowbit.methods.onebit`): the float model is the teacher; ``data``: ``self``
    (``nsamples`` sequences sampled from the float model, LLM-QAT's protocol as the reference's
    training data) or a corpus name (its ``split``). Optimizer: the method's (OneBit: the
    reference's AdamW 0.9 / 0.98, weight decay 0.01, clip 1.0, ``warmup_steps`` then cosine to 0) at
    ``lr``. ``eval_every``: every that many steps the perplexity of the model being trained on the
    first ``eval_windows`` windows (of ``seqlen``) of the first eval dataset (the perplexity-vs-steps
    curve; 0: none). ``save_model``: also write the distilled model in its stored form (OneBit: the
    1-bit codes + the two float16 vectors per linear) as a lowbit checkpoint in the row's ``model/``
    (it changes no number, so it is not part of the row's config hash)."""
    data: str = "self"
    lr: float = 4e-4
    compute_dtype: str = "float32"
    nsamples: int = 64
    warmup_steps: int = 10
    eval_every: int = 0
    eval_windows: int = 4
    save_model: bool = False

    def __post_init__(self):
        if not isinstance(self.save_model, bool):
            raise ValueError(f"distill.save_model={self.save_model!r}: expected a bool")
        self._check("distill", positive=("nsamples", "eval_windows"), nonneg=("warmup_steps", "eval_every"),
                    check_split=self.data != "self")
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
    #: every row runs once per seed (a row's own ``seeds`` wins; None: once, with ``seed``)
    seeds: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.mesh is not None:
            from lowbit.dist import parse_mesh

            parse_mesh(self.mesh)
        if not self.methods:
            raise ValueError("methods: expected at least one method (a table row)")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"methods: names must be unique, got {names}")
        for key, seeds in [("seeds", self.seeds)] + [(f"methods.{m.name}.seeds", m.seeds) for m in self.methods]:
            if seeds is not None and (not seeds or not all(is_int(x) and x >= 0 for x in seeds)
                                      or len(set(seeds)) != len(seeds)):
                raise ValueError(f"{key}={list(seeds)!r}: expected a non-empty list of distinct integers >= 0")
        runs = [r.row.name for r in expand(self)]
        clash = sorted({n for n in runs if runs.count(n) > 1})
        if clash:
            raise ValueError(f"methods: the runs {clash} are named twice (a row named like another row's seed run)")
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
            if not is_int(v) or v <= 0:
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
        if not is_int(self.seed):
            raise ValueError(f"seed={self.seed!r}: expected an integer")


class Run(NamedTuple):
    """One run of a row: the row as run (named ``<row>-s<seed>`` when the row runs several seeds), the
    row's name in the table, and the seed of its calibration windows, data order and initialisations."""
    row: MethodCfg
    base: str
    seed: int


def expand(cfg: "ExperimentCfg") -> list[Run]:
    """The runs of ``cfg``'s rows: one per seed of a row (its ``seeds``, else the config's), or one with
    the config's ``seed`` (and the row's own name) when neither gives seeds."""
    out = []
    for m in cfg.methods:
        seeds = m.seeds if m.seeds is not None else cfg.seeds
        if seeds is None:
            out.append(Run(m, m.name, cfg.seed))
        else:
            out += [Run(dataclasses.replace(m, name=f"{m.name}-s{s}", seeds=None), m.name, int(s)) for s in seeds]
    return out


#: a results-directory component: letters, digits, ``.``, ``_``, ``-``; no leading dot
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _check_name(key: str, name) -> None:
    """``name`` becomes one directory under the results root: a single safe path component
    (no ``/``, ``..``, absolute paths or hidden names), so no config can write outside it."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"{key}={name!r}: expected a single file-name-safe path component "
                         f"(letters, digits, '.', '_', '-'; not starting with '.'), e.g. 'gptq_smollm2'")


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

