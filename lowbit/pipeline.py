"""Quantize a model with a method: the library's pipeline, the one that ``lowbit run``, ``lowbit
quantize``, ``lowbit merge``, ``lowbit allocate`` and your own code call::

    from lowbit import pipeline

    params, model_cfg, tok = pipeline.load("smollm2-135m")              # GGUF, HF dir, checkpoint, hub id
    row = pipeline.MethodCfg(name="gptq-w4", method="gptq", quant=QuantCfg(bits=4, group_size=128))
    calib = pipeline.CalibCfg(data="brown", nsamples=128, seqlen=2048)
    windows, record = pipeline.calibration_data(calib, params, model_cfg, tok, seed=0)
    qparams, rows = pipeline.quantize(params, model_cfg, row, windows, calib)   # per-weight report rows
    pipeline.model_size(qparams)                   # {"size_mb", "linear_bits_per_param", "n_quantized"}

A *row* (:class:`MethodCfg`) is one registered method (:mod:`lowbit.methods`) with its options and
quantization spec on every ``*_proj`` linear not matched by ``skip``, or a mixed-precision recipe file
(:mod:`lowbit.alloc.recipe`); :func:`build_recipe` turns it into the
:class:`~lowbit.core.transforms.Transform` the layer-sequential driver (:mod:`lowbit.calib.driver`)
runs, :func:`quantize` runs it and applies the method's ``finalize`` hook (OneBit: packed weights).
What a row trains afterwards (LoRA fine-tuning, a method's distillation) is the runner's
(:mod:`lowbit.runner.train_rows`).

Seeds: one ``seed`` -> ``jax.random.key(seed)`` -> ``fold_in`` per purpose (:data:`PURPOSE_CALIB`:
calibration windows, :data:`PURPOSE_SELF_GENERATED`: self-generated calibration,
:data:`PURPOSE_LORA_INIT`, :data:`PURPOSE_DISTILL_DATA`), so a rerun gives identical windows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from lowbit import methods
from lowbit.core.config import QuantCfg, from_dict, from_fields, to_dict
from lowbit.core.nodes import is_opaque
from lowbit.core.transforms import Transform, flatten, identity, partition

__all__ = ["QuantCfg", "MethodCfg", "CalibCfg", "load", "build_recipe", "calibration_data", "quantize",
           "finalize", "model_size", "report_fields", "purpose_seed", "PURPOSE_CALIB", "PURPOSE_SELF_GENERATED",
           "PURPOSE_LORA_INIT", "PURPOSE_DISTILL_DATA"]

PURPOSE_CALIB, PURPOSE_SELF_GENERATED, PURPOSE_LORA_INIT, PURPOSE_DISTILL_DATA = 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class MethodCfg:
    """One row of the table: a registered ``method`` (``fp``, ``rtn``, ``gptq``, ...) with its
    ``options`` (an instance of the method's options dataclass; YAML key: the method's name) on
    every linear whose path does not match ``skip`` (regex, default: embeddings and lm_head stay dense).
    ``finetune``: LoRA adapters are then trained on the row's model (the experiment's ``finetune:``);
    ``distill``: the method's own training stage then trains its weights from the float model (the
    experiment's ``distill:``; methods with a ``training`` hook, e.g. ``onebit``)."""
    name: str
    method: str = "rtn"
    quant: QuantCfg = QuantCfg()
    options: Any = None
    skip: str = r"^(embed_tokens|lm_head)$"
    finetune: bool = False
    distill: bool = False
    recipe: str | None = None  # a mixed-precision recipe file (lowbit.alloc.recipe): per-linear specs, not ``quant``
    seeds: tuple[int, ...] | None = None  # lowbit run: the seeds this row runs (default: the experiment's)

    def __post_init__(self):
        m = methods.get(self.method)
        if self.options is None:
            object.__setattr__(self, "options", m.options())
        elif not isinstance(self.options, m.options):
            raise ValueError(f"methods.{self.name}.{self.method}: expected {m.options.__name__} options, "
                             f"got {type(self.options).__name__}")
        if self.distill and m.training is None:
            raise ValueError(f"methods.{self.name}.distill: method {self.method!r} has no training stage of its own "
                             f"(methods with one: {methods.with_names(lambda mm: mm.training is not None)})")
        if self.recipe is not None and not (isinstance(self.recipe, str) and self.recipe):
            raise ValueError(f"methods.{self.name}.recipe={self.recipe!r}: expected the path of a recipe file")
        if self.distill and self.finetune:
            raise ValueError(f"methods.{self.name}: distill and finetune are exclusive (one training per row)")

    @property
    def quantizes(self) -> bool:
        return methods.get(self.method).quantizes

    @property
    def training(self) -> str | None:
        """The row's training stage: ``"finetune"`` (LoRA), ``"distill"`` (the method's own), or None."""
        return "finetune" if self.finetune else "distill" if self.distill else None

    def spec(self):
        """The row's :class:`~lowbit.core.qtensor.QuantSpec` (its ``quant``)."""
        return self.quant.spec()

    # the YAML form: a method's options live under the key named after the method
    @classmethod
    def from_plain(cls, d: Any, where: str = "") -> "MethodCfg":
        where = where or "method"
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a mapping, got {d!r}")
        d = dict(d)
        name = d.get("method", "rtn")
        if not isinstance(name, str) or name not in methods.METHODS:
            raise ValueError(f"{where}.method={name!r}: expected one of {list(methods.METHODS)}")
        m = methods.get(name)
        opts = d.pop(name, None)
        others = [k for k in d if k in methods.METHODS]
        if others:
            raise ValueError(f"{where}.{others[0]}: options of method {others[0]!r} on a {name!r} row")
        row = from_fields(cls, {**d, "options": None}, where)
        return dataclasses.replace(row, options=from_dict(m.options, opts or {}, f"{where}.{name}"))

    def to_plain(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        opts = to_dict(self.options)
        if opts:
            d[self.method] = opts
        return d


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
    #: a float-level perturbation of the calibration activations, for measuring float-order noise: with
    #: k > 0, each entry of the embeddings that enter layer 0 moves by one ulp (up, down or not at all,
    #: drawn from seed k); 0: none
    perturb: int = 0


def load(name_or_path: str = "smollm2-135m", *, dtype="float32"):
    """``(params, model_cfg, tokenizer)`` of a model (:func:`lowbit.models.loaders.load_model`: the
    embedded default, a GGUF file, an HF directory, a lowbit checkpoint or a hub id)."""
    from lowbit.models.loaders import load_model

    return load_model(name_or_path, dtype=dtype)


def build_recipe(row: MethodCfg, params=None) -> Transform | None:
    """The transform of a row: the registered method on every ``*_proj`` linear whose path does not
    match ``row.skip`` (``None`` for rows that do not quantize, e.g. ``fp``); for a row with a
    ``recipe`` file, the recipe's spec on each linear it lists (:mod:`lowbit.alloc.recipe`; with
    ``params``, every path it names must be a matrix of that model)."""
    if not row.quantizes:
        return None
    if row.recipe is not None:
        from lowbit.alloc import load_recipe

        r = load_recipe(row.recipe)
        if r.method != row.method:
            raise ValueError(f"methods.{row.name}: method {row.method!r} but recipe {row.recipe} is for {r.method!r}")
        if params is not None:
            r.check(params)
        return partition([(row.skip, identity()), (".*", r.transform())])
    t = methods.build(row.method, row.spec(), row.options)
    return None if t is None else partition([(row.skip, identity()), (r"_proj$", t)])


def purpose_seed(key, purpose: int) -> int:
    """An int seed for one purpose (numpy samplers), derived from the experiment key by fold_in."""
    return int(jax.random.randint(jax.random.fold_in(key, purpose), (), 0, 2**31 - 1))


def calibration_data(calib: CalibCfg, params, model_cfg, tok, seed: int, *, progress: bool = True):
    """The calibration windows of ``calib`` and a record that reproduces them: random windows of
    a corpus split (their start indices) or sequences sampled from the model (the tokens)."""
    from lowbit import data

    key = jax.random.key(seed)
    if calib.source == "corpus":
        stream = tok.encode(data.corpus_text(calib.data, calib.split))
        windows, starts = data.calibration_windows(stream, calib.nsamples, calib.seqlen,
                                                   purpose_seed(key, PURPOSE_CALIB))
        return windows, {"source": "corpus", "data": calib.data, "split": calib.split,
                         "stream_tokens": int(len(stream)), "seqlen": calib.seqlen,
                         "starts": [int(s) for s in starts]}
    from lowbit.eval.generate import self_generated_calibration

    windows = self_generated_calibration(params, model_cfg, calib.nsamples, calib.seqlen,
                                         jax.random.fold_in(key, PURPOSE_SELF_GENERATED),
                                         batch_size=calib.batch_size, progress=progress)
    return windows, {"source": "self", "seqlen": calib.seqlen, "tokens": windows.tolist()}


def quantize(params, model_cfg, row: MethodCfg, windows, calib: CalibCfg, *, start_layer: int = 0,
             on_layer=None, progress: bool = True, recipe: Transform | None = None,
             reference=None, keep_latent: bool = False) -> tuple[dict, list[dict]]:
    """Quantize a loaded model with a row on calibration ``windows`` (returns params and per-weight
    report rows, each naming the method that made it). ``recipe``: the row's transform when the
    caller built it already (:func:`build_recipe`); ``start_layer`` / ``on_layer`` / ``reference``: the
    driver's resume and per-layer callback (:func:`lowbit.calib.driver.quantize_model`). The result is
    the method's stored form (its ``finalize`` hook: OneBit packs its weights) unless ``keep_latent``
    (the training form, for a training stage that follows)."""
    from lowbit.calib.driver import quantize_model

    recipe = build_recipe(row, params) if recipe is None else recipe
    if recipe is None:
        return params, []

    def tagged(i, new_params, rows):  # every report row names the method that made it
        for r in rows:
            r["method"] = row.method
        if on_layer is not None:
            on_layer(i, new_params, rows)

    qparams, rows = quantize_model(params, model_cfg, recipe, windows, batch_size=calib.batch_size,
                                   true_sequential=calib.true_sequential, skip_first=calib.skip_first,
                                   token_cap=calib.token_cap, perturb=calib.perturb, start_layer=start_layer,
                                   reference=reference, on_layer=tagged, progress=progress)
    for r in rows:
        r["method"] = row.method
    if not keep_latent:
        qparams = finalize(row, qparams)
    return qparams, rows


def finalize(row: MethodCfg, params):
    """``params`` as the row's method stores and evaluates them (its ``finalize`` hook, or as they are)."""
    return methods.get(row.method).finalized(params, row.spec())


def report_fields(row: MethodCfg) -> dict:
    """``{"bits", "group_size"}`` of a row, as ``metrics.json`` and the tables give them: the method's
    ``report`` hook; ``"mixed"`` bits for a recipe row; None for rows that do not quantize."""
    if row.recipe is not None and row.quantizes:
        return {"bits": "mixed", "group_size": None}
    return methods.get(row.method).report_fields(row.spec() if row.quantizes else None)


def model_size(params) -> dict:
    """Bytes of all parameters and mean bits/param of the quantized linears (tied embeddings once).
    Quantized linears: the opaque weight nodes (:mod:`lowbit.core.nodes`: QuantizedTensors, LLM.int8()
    Int8Weights, packed OneBit weights, ...; a LoRA adapter's base, not its adapters), every stored
    array counted."""
    flat = flatten(params)
    total_bits, q_bits, q_params = 0, 0, 0
    for leaf in flat.values():
        arrays = jax.tree_util.tree_leaves(leaf)
        bits = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize * 8 for a in arrays)
        total_bits += bits
        if is_opaque(leaf):
            q_bits += bits
            q_params += leaf.shape[0] * leaf.shape[1]
    return {"size_mb": total_bits / 8 / 2**20, "linear_bits_per_param": q_bits / q_params if q_params else 16.0,
            "n_quantized": sum(is_opaque(v) for v in flat.values())}
