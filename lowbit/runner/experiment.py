"""Turn an experiment config (:mod:`lowbit.runner.config`) into results: ``lowbit run CONFIG``.

For each method (table row) of the config::

    load model (once) -> calibration windows (seeded, indices saved) -> recipe through the
    layer-sequential driver (:mod:`lowbit.calib.driver`) -> perplexity on every eval dataset

and write ``results/<experiment>[-<variant>]/<method>/``::

    config.yaml      the resolved config of this run (experiment fields + this method)
    metrics.json     perplexities, model size, timings, versions, device, git SHA, config hash
    layers.csv       per quantized weight: relative output error, bits/param, seconds, GPTQ loss
    layers.png       relative output error per layer and linear type
    calib_windows.json  the calibration sample (start index of every window in the token stream)

then ``summary.{json,csv,md}`` and ``ppl_vs_bits.png`` for the whole experiment (rebuilt from every
finished run directory, so a failed or partial re-run never loses earlier rows).

Seeds: one ``seed`` -> ``jax.random.key(seed)`` -> ``fold_in`` per purpose (1: calibration windows,
2: self-generated calibration), so re-running a config gives identical metrics. Each run directory
is written atomically; a run whose ``metrics.json`` carries the same config hash is reused unless
``force``. Rows whose evaluation protocol differs from the config's are left out of the summary.

Crash safety: quantization commits every finished layer (its parameters and its report rows, one
atomic directory with per-array checksums) under ``.partial-<method>-<hash>/layer_NNNN``; an
interrupted run resumes after its last complete layer, a damaged saved layer is discarded with a
warning and recomputed, ``force`` starts the row from scratch. One run at a time holds the
directory's ``.lock``; temporary files of killed runs are removed by the next run. Each write point
is a named :func:`lowbit.faults.crash_point` exercised by ``tests/test_fault_injection.py``.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
from typing import Any

import jax
import numpy as np
import yaml

from lowbit import dist
from lowbit import methods as method_registry
from lowbit.core.qtensor import QuantizedMatrix, QuantizedTensor, QuantSpec
from lowbit.core.transforms import Transform, flatten, identity, partition
from lowbit.faults import crash_point
from lowbit.io import checkpoint, remote
from lowbit.runner import lock
from lowbit.runner.config import (QUANT_HASH_DEFAULTS, CalibCfg, EvalCfg, ExperimentCfg, MethodCfg, config_hash,
                                  from_dict, to_dict)
from lowbit.runner.records import environment_info, layers_csv, peak_rss_mb, train_curve, write_json, write_text

__all__ = ["build_recipe", "calibration_data", "quantize", "run_experiment", "write_summary",
           "experiment_dir", "model_size", "check_expectations"]

PURPOSE_CALIB, PURPOSE_SELF_GENERATED, PURPOSE_LORA_INIT, PURPOSE_DISTILL_DATA = 1, 2, 3, 4


def build_recipe(m: MethodCfg, params=None) -> Transform | None:
    """The transform of a method row: the registered method on every ``*_proj`` linear whose path
    does not match ``m.skip`` (``None`` for rows that do not quantize, e.g. ``fp``); for a row with
    a ``recipe`` file, the recipe's spec on each linear it lists (:mod:`lowbit.alloc.recipe`; with
    ``params``, every path it names must be a matrix of that model)."""
    if not m.quantizes:
        return None
    if m.recipe is not None:
        from lowbit.alloc import load_recipe

        r = load_recipe(m.recipe)
        if r.method != m.method:
            raise ValueError(f"methods.{m.name}: method {m.method!r} but recipe {m.recipe} is for {r.method!r}")
        if params is not None:
            r.check(params)
        return partition([(m.skip, identity()), (".*", r.transform())])
    q = m.quant
    spec = QuantSpec(bits=q.bits, group_size=q.group_size, symmetric=q.symmetric, format=q.format,
                     clip=q.clip, double_quant=q.double_quant, partial_groups=q.partial_groups,
                     dq_map=q.dq_map, scale_dtype=q.scale_dtype)
    t = method_registry.build(m.method, spec, m.options)
    return None if t is None else partition([(m.skip, identity()), (r"_proj$", t)])


def calibration_data(calib: CalibCfg, params, mcfg, tok, seed: int, *, progress: bool = True):
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

    windows = self_generated_calibration(params, mcfg, calib.nsamples, calib.seqlen,
                                         jax.random.fold_in(key, PURPOSE_SELF_GENERATED),
                                         batch_size=calib.batch_size, progress=progress)
    return windows, {"source": "self", "seqlen": calib.seqlen, "tokens": windows.tolist()}


def quantize(params, mcfg, m: MethodCfg, windows, calib: CalibCfg, *, start_layer: int = 0,
             on_layer=None, progress: bool = True, recipe: Transform | None = None,
             reference=None, keep_latent: bool = False) -> tuple[dict, list[dict]]:
    """Quantize a loaded model with a method row on calibration ``windows``: the one pipeline
    behind ``lowbit run`` and ``lowbit quantize`` (returns params and per-weight report rows).
    ``reference``: the unquantized params, for resuming (``start_layer > 0``) a recipe whose blocks
    feed their float outputs on (AWQ + RTN). OneBit weights come back packed (1-bit codes + the
    two vectors in the row's ``scale_dtype``) unless ``keep_latent`` (their training form, for
    distillation)."""
    from lowbit.calib.driver import quantize_model

    recipe = build_recipe(m, params) if recipe is None else recipe  # the runner passes the one it built
    if recipe is None:
        return params, []

    def tagged(i, new_params, rows):  # every report row names the method that made it
        for r in rows:
            r["method"] = m.method
        if on_layer is not None:
            on_layer(i, new_params, rows)

    qparams, rows = quantize_model(params, mcfg, recipe, windows, batch_size=calib.batch_size,
                                   true_sequential=calib.true_sequential, skip_first=calib.skip_first,
                                   token_cap=calib.token_cap, start_layer=start_layer, reference=reference,
                                   on_layer=tagged, progress=progress)
    for r in rows:
        r["method"] = m.method
    if m.method == "onebit" and not keep_latent:
        from lowbit.methods import onebit

        qparams = onebit.pack(qparams, m.quant.scale_dtype)
    return qparams, rows


def model_size(params) -> dict:
    """Bytes of all parameters and mean bits/param of the quantized linears (tied embeddings once).
    Quantized linears: QuantizedTensors (codes, scales, zeros, ...) and method weight nodes
    (QuantizedMatrix: LLM.int8() Int8Weights, packed OneBit weights), every stored array counted."""
    flat = flatten(params)
    quantized = (QuantizedTensor, QuantizedMatrix)
    total_bits, q_bits, q_params = 0, 0, 0
    for leaf in flat.values():
        arrays = jax.tree_util.tree_leaves(leaf)
        bits = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize * 8 for a in arrays)
        total_bits += bits
        if isinstance(leaf, quantized):
            q_bits += bits
            q_params += leaf.shape[0] * leaf.shape[1]
    return {"size_mb": total_bits / 8 / 2**20, "linear_bits_per_param": q_bits / q_params if q_params else 16.0,
            "n_quantized": sum(isinstance(v, quantized) for v in flat.values())}


def experiment_dir(cfg: ExperimentCfg, results_dir: str) -> str:
    """``results_dir/<experiment>[-<variant>]``; never outside ``results_dir`` (the config checks
    that names are single safe path components; this checks the resolved path once more)."""
    name = cfg.experiment + (f"-{cfg.variant}" if cfg.variant else "")
    path = os.path.join(results_dir, name)
    root = os.path.realpath(results_dir)
    if os.path.dirname(os.path.realpath(path)) != root:
        raise ValueError(f"experiment {name!r}: resolves to {os.path.realpath(path)}, outside the results "
                         f"root {root}; expected a single directory name")
    return path


def _run_config(cfg: ExperimentCfg, m: MethodCfg) -> dict:
    """The config of one row (what its results depend on: not the other rows, not ``expect``)."""
    d = to_dict(cfg)
    row = to_dict(m)
    for k, default in QUANT_HASH_DEFAULTS.items():
        if row.get("quant", {}).get(k) == default:
            del row["quant"][k]
    for key in ("finetune", "distill"):  # rows that do not train depend on neither flag nor settings
        if not getattr(m, key):
            row.pop(key, None)
            d.pop(key, None)
    if "distill" in d:
        d["distill"].pop("save_model", None)   # where the model goes changes no number
    if m.recipe is None:
        row.pop("recipe", None)
    else:   # the row depends on the recipe's content, not on where the file is
        with open(m.recipe, "rb") as f:
            row["recipe"] = {"sha256": hashlib.sha256(f.read()).hexdigest()}
    d["methods"] = [row]
    d.pop("expect", None)
    d.pop("mesh", None)   # where it runs changes no number (to float tolerance): a resume may change it
    return d


def purpose_seed(key, purpose: int) -> int:
    """An int seed for one purpose (numpy samplers), derived from the experiment key by fold_in."""
    return int(jax.random.randint(jax.random.fold_in(key, purpose), (), 0, 2**31 - 1))


# ----------------------------------------------------------------------------- per-layer checkpoints


def _partial_dir(exp_dir: str, m: MethodCfg, h: str) -> str:
    return os.path.join(exp_dir, f".partial-{m.name}-{h}")


def _layer_dir(pdir: str, i: int) -> str:
    return os.path.join(pdir, f"layer_{i:04d}")


def _save_layer(pdir: str, i: int, layer, rows: list[dict]) -> None:
    """Commit one finished layer: its parameters and its report rows in ONE atomic directory (a
    kill at any point leaves the layer either complete or absent)."""
    checkpoint.save(_layer_dir(pdir, i), layer, extra={"rows": rows})
    crash_point("run.layer-committed")


def _load_partial(pdir: str, params, upto: int | None = None) -> tuple[dict, int, list[dict]]:
    """Plug the finished layers saved in ``pdir`` into ``params`` (at most ``upto`` of them).

    Returns (params, first missing layer, their report rows). A layer that fails to load (damaged
    file, checksum mismatch, written by an older lowbit) is discarded with a warning together with
    every later layer, and recomputed.
    """
    layers, rows = list(params["layers"]), []
    i = 0
    last = len(layers) if upto is None else min(upto, len(layers))
    while i < last and os.path.isdir(_layer_dir(pdir, i)):
        try:
            layer = checkpoint.restore(_layer_dir(pdir, i))
            layer_rows = checkpoint.read_extra(_layer_dir(pdir, i)).get("rows")
            if not isinstance(layer_rows, list):
                raise checkpoint.CheckpointError(f"checkpoint {_layer_dir(pdir, i)}: no report rows")
        except (checkpoint.CheckpointError, OSError, ValueError) as e:
            _log(f"warning: discarding saved layers {i}.. of {pdir}: {e}; recomputing them")
            for j in range(i, len(layers)):
                shutil.rmtree(_layer_dir(pdir, j), ignore_errors=True)
            break
        layers[i] = layer
        rows.extend(layer_rows)
        i += 1
    return {**params, "layers": layers}, i, rows


def _train_dir(exp_dir: str, m: MethodCfg, h: str) -> str:
    return os.path.join(exp_dir, f".train-{m.name}-{h}")


def _finetune(params, mcfg, cfg: ExperimentCfg, m: MethodCfg, h: str, exp_dir: str, train_tokens,
              progress: bool) -> tuple[dict, dict]:
    """Train LoRA adapters (``cfg.finetune``) on the row's model (quantized base: QLoRA). Resumable:
    the training run lives in ``.train-<row>-<hash>/`` with its orbax checkpoints until the row is
    committed. Returns the params with trained adapters and a record for ``metrics.json``."""
    from lowbit.train import TrainCfg, causal_lm_loss, lora, train
    from lowbit.train.optim import OptimCfg

    ft = cfg.finetune
    lparams = lora.add_lora(params, rank=ft.rank, alpha=ft.alpha, dropout=ft.dropout, targets=ft.targets,
                            key=jax.random.fold_in(jax.random.key(cfg.seed), PURPOSE_LORA_INIT))
    optim = OptimCfg(lr=ft.lr, warmup_steps=int(math.ceil(ft.warmup_ratio * ft.steps)), schedule="constant",
                     clip_norm=ft.clip_norm, b1=0.9, b2=0.999, weight_decay=0.0)
    tcfg = TrainCfg(steps=ft.steps, batch_size=ft.batch_size, seqlen=ft.seqlen, accum=ft.accum, optim=optim,
                    compute_dtype=ft.compute_dtype, trainable=lora.trainable_regex(), seed=cfg.seed,
                    save_every=ft.save_every)
    compute_cfg = mcfg.replace(dtype=ft.compute_dtype) if hasattr(mcfg, "replace") else mcfg
    res = train(lparams, mcfg, tcfg, _train_dir(exp_dir, m, h), train_tokens=train_tokens,
                loss_fn=lora.lora_loss(causal_lm_loss(compute_cfg, tcfg.remat)), progress=progress)
    record = {"adapter_params": lora.count_trainable(res.params), **_train_record(res, ft)}
    _log(f"{m.name}: fine-tuned {record['adapter_params']} adapter parameters for {ft.steps} steps "
         f"(final loss {record['final_loss']:.4f})")
    return res.params, record


def _train_record(res, tc) -> dict:
    """What ``metrics.json`` keeps of a training run (``tc``: the FinetuneCfg / DistillCfg)."""
    hist = res.history
    return {"steps": tc.steps, "tokens": tc.steps * tc.batch_size * tc.accum * tc.seqlen,
            "final_loss": hist[-1]["loss"] if hist else None,
            "tokens_per_s": (float(np.mean([r["tokens_per_s"] for r in hist[1:]])) if len(hist) > 1 else None),
            "compute_dtype": tc.compute_dtype,
            # XLA's accounting of the compiled train step (params + optimizer state + frozen base +
            # activations + gradients); the process's peak RSS also counts every earlier row's work
            "train_step_mb": res.step_memory["total"] / 2**20 if res.step_memory else None,
            "train_step_memory": res.step_memory, "peak_rss_mb": peak_rss_mb()}


def distill_data(dc, params, mcfg, tok, seed: int, *, progress: bool = True):
    """The distillation windows of ``dc`` (a DistillCfg) and a record that reproduces them:
    ``nsamples`` sequences sampled from the float model (``data: self``) or a corpus split's tokens."""
    from lowbit import data

    if dc.data == "self":
        from lowbit.eval.generate import self_generated_calibration

        windows = self_generated_calibration(params, mcfg, dc.nsamples, dc.seqlen,
                                             jax.random.fold_in(jax.random.key(seed), PURPOSE_DISTILL_DATA),
                                             progress=progress)
        return windows, {"source": "self", "nsamples": dc.nsamples, "seqlen": dc.seqlen,
                         "sha256": hashlib.sha256(np.ascontiguousarray(windows, np.int32).tobytes()).hexdigest()}
    tokens = np.asarray(tok.encode(data.corpus_text(dc.data, dc.split)), np.int32)
    return tokens, {"source": "corpus", "data": dc.data, "split": dc.split, "stream_tokens": int(len(tokens))}


def _distill(params, teacher, mcfg, cfg: ExperimentCfg, m: MethodCfg, h: str, exp_dir: str, train_tokens,
             curve_tokens, progress: bool) -> tuple[dict, dict]:
    """Train the row's OneBit weights by distillation from the float ``teacher`` (``cfg.distill``;
    the reference's loss and optimizer, :mod:`lowbit.methods.onebit`). Resumable like
    :func:`_finetune` (``.train-<row>-<hash>/``). Returns the trained params and a record."""
    from lowbit.eval.likelihood import perplexity
    from lowbit.methods import onebit
    from lowbit.models.protocol import family_of
    from lowbit.train import TrainCfg, causal_lm_loss, train

    dc = cfg.distill
    compute_cfg = mcfg.replace(dtype=dc.compute_dtype) if hasattr(mcfg, "replace") else mcfg
    n_layers = len(family_of(mcfg).layers(params))
    tcfg = TrainCfg(steps=dc.steps, batch_size=dc.batch_size, seqlen=dc.seqlen, accum=dc.accum,
                    optim=onebit.onebit_optim(dc.lr, dc.warmup_steps), compute_dtype=dc.compute_dtype,
                    trainable=onebit.trainable_regex(), seed=cfg.seed, save_every=dc.save_every,
                    eval_every=dc.eval_every, eval_batches=-(-dc.eval_windows // dc.batch_size))
    curve, teacher_ppl = None, None
    if dc.eval_every:   # the start point of the perplexity-vs-steps curve, and the teacher on the same windows
        w0 = curve_tokens.reshape(dc.eval_windows, dc.seqlen)
        curve = [(0, float(perplexity(onebit.pack(params, m.quant.scale_dtype), mcfg, w0, progress=False)["ppl"]))]
        teacher_ppl = float(perplexity(teacher, mcfg, w0, progress=False)["ppl"])
    res = train(params, mcfg, tcfg, _train_dir(exp_dir, m, h), train_tokens=train_tokens,
                eval_tokens=curve_tokens if dc.eval_every else None,
                loss_fn=onebit.onebit_kd_loss(compute_cfg, mcfg, dc.seqlen, n_layers, tcfg.remat),
                eval_loss_fn=causal_lm_loss(compute_cfg, tcfg.remat) if dc.eval_every else None,
                consts=teacher, progress=progress)
    if curve is not None:
        curve += [(r["step"], math.exp(r["eval_loss"])) for r in res.history if r.get("eval_loss") is not None]
    record = {"trainable_params": onebit.count_trainable(params), "data": dc.data, "lr": dc.lr,
              **_train_record(res, dc),
              "ppl_curve": curve, "ppl_curve_windows": dc.eval_windows if curve else None,
              "ppl_curve_teacher": teacher_ppl}
    _log(f"{m.name}: distilled {record['trainable_params']} OneBit parameters for {dc.steps} steps "
         f"(final loss {record['final_loss']:.4f})")
    return res.params, record


def _clean_stray_temps(exp_dir: str) -> None:
    """Remove the temporary files and directories that killed runs left behind (``.X.tmp-*``,
    ``X.tmp-*``); only called while holding the directory's lock, so none belongs to a live run."""
    pats = [os.path.join(exp_dir, p) for p in (".*.tmp-*", "*.tmp-*", ".partial-*/.*.tmp-*",
                                               ".partial-*/*.tmp-*", "*/.*.tmp-*", "*/*.tmp-*")]
    stray = sorted({p for pat in pats for p in glob.glob(pat)})
    for p in stray:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(p)
    if stray:
        _log(f"removed {len(stray)} temporary file(s) left by an interrupted run in {exp_dir}")


# ----------------------------------------------------------------------------- plots and tables


def _save_figure(fig, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def _plot_layers(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    kinds = sorted({r["path"].split("/", 2)[-1] for r in rows if r["layer"] >= 0})
    for k in kinds:
        pts = sorted((r["layer"], r["rel_out_err"]) for r in rows if r["path"].endswith(k) and r["layer"] >= 0)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=k)
    ax.set_xlabel("layer")
    ax.set_ylabel("relative output error ||X(W-Q)^T|| / ||XW^T||")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _plot_summary(runs: list[dict], datasets: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        by_kind: dict[str, list] = {}  # one line per recipe: the row name without its "-w4g128" suffix
        for r in runs:
            if ds not in r["ppl"]:
                continue
            if r["method"] == "fp":
                ax.axhline(r["ppl"][ds], ls="--", color="k", label=f"{r['name']} ({r['ppl'][ds]:.2f})")
            else:
                m = re.match(r"(.+)-(w\d+(?:g\d+)?)$", r["name"])
                kind, spec = (m.group(1), m.group(2)) if m else (r["name"], r["name"])
                by_kind.setdefault(kind, []).append((r["linear_bits_per_param"], r["ppl"][ds], spec))
        labelled = set()
        # a recipe run at several sizes is a curve (solid, a colour of its own); a recipe at one size
        # only is a point (grey-scale marker shapes, so that the curves keep the colours)
        curves = sorted(k for k, pts in by_kind.items() if len(pts) > 1)
        points = sorted(k for k, pts in by_kind.items() if len(pts) == 1)
        for kind in curves + points:
            pts = sorted(by_kind[kind])
            style = dict(marker="o") if kind in curves else dict(
                marker="xs^vD<>ph*"[points.index(kind) % 10], ls="none", color=str(0.1 + 0.5 * points.index(kind) /
                                                                            max(len(points), 1)))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=kind, **style)
            for x, y, spec in pts:
                if spec not in labelled:  # the bit/group setting, once per x position
                    labelled.add(spec)
                    ax.annotate(spec, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("bits per parameter (quantized linears, incl. scales/zeros)")
        ax.set_ylabel(f"perplexity ({ds})")
        ax.set_title(f"{title}: {ds}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _smooth(xs: list[float], k: int) -> list[float]:
    """Trailing mean over ``k`` points (the first points average what exists)."""
    c = np.cumsum(np.asarray(xs, dtype=np.float64))
    return [float((c[i] - (c[i - k] if i >= k else 0.0)) / min(i + 1, k)) for i in range(len(xs))]


def _plot_training(curves: dict[str, list[tuple[int, float]]], path: str, title: str) -> None:
    """Every fine-tuning row's training loss in one figure: per step (faint) and an 8-step mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (name, curve) in enumerate(curves.items()):
        steps, losses = [s for s, _ in curve], [v for _, v in curve]
        ax.plot(steps, losses, color=f"C{i}", alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smooth(losses, 8), color=f"C{i}", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(f"{title}: training loss (faint: per step; solid: 8-step mean)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _plot_ppl_steps(runs: dict[str, dict], path: str, title: str) -> None:
    """Perplexity of each distilled row's model on its curve windows vs optimizer step (step 0: the
    start point), with the teacher on the same windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, r) in enumerate(runs.items()):
        steps, ppl = zip(*r["ppl_curve"])
        ax.plot(steps, ppl, "o-", color=f"C{i}", label=name)
        if r.get("ppl_curve_teacher"):
            ax.axhline(r["ppl_curve_teacher"], ls="--", color=f"C{i}", alpha=0.6,
                       label=f"teacher ({r['ppl_curve_teacher']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("perplexity (curve windows)")
    ax.set_title(f"{title}: perplexity during distillation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v >= 1000 else f"{v:.2f}"


def _signed(v: float) -> str:
    """A difference with its sign: ``+10.60``, ``-0.59``, ``+0.00``."""
    return ("-" if v < 0 else "+") + _fmt(abs(v))


def _protocol(run_config: dict) -> dict:
    """What makes two rows' perplexities comparable: the model and the evaluation settings (not
    ``eval.batch_size``, which does not change the numbers); missing keys read as their defaults."""
    ev = to_dict(from_dict(EvalCfg, dict(run_config.get("eval") or {}), "eval"))
    ev.pop("batch_size", None)
    return {"model": run_config.get("model"), "eval": ev}


def _protocol_diff(a: dict, b: dict) -> str:
    diffs = [f"model {a['model']} vs {b['model']}"] if a["model"] != b["model"] else []
    diffs += [f"eval.{k} {a['eval'].get(k)!r} vs {b['eval'].get(k)!r}" for k in sorted(a["eval"])
              if a["eval"].get(k) != b["eval"].get(k)]
    return ", ".join(diffs)


def write_summary(exp_dir: str, cfg: ExperimentCfg | None = None) -> dict:
    """Rebuild ``summary.{json,csv,md}`` and ``ppl_vs_bits.png`` from the run directories present.

    With ``cfg``, rows evaluated under another protocol than ``cfg``'s (another model, eval data,
    split, seqlen, window count or BOS setting: e.g. left over from an earlier config) are left out
    of the table and of the "Δ vs fp" columns, and named in a note below it.
    """
    runs, excluded = [], []
    want = _protocol(to_dict(cfg)) if cfg is not None else None
    for mf in sorted(glob.glob(os.path.join(exp_dir, "*", "metrics.json"))):
        try:
            with open(mf) as f:
                m = json.load(f)
        except (OSError, ValueError) as e:
            _log(f"warning: skipping {mf}: unreadable ({e})")
            continue
        if want is not None:
            rc = os.path.join(os.path.dirname(mf), "config.yaml")
            try:
                with open(rc) as f:
                    got = _protocol(yaml.safe_load(f) or {})
            except (OSError, ValueError, yaml.YAMLError):
                got = None
            if got != want:
                why = "no readable config.yaml" if got is None else _protocol_diff(got, want)
                excluded.append({"name": m.get("name", os.path.basename(os.path.dirname(mf))), "why": why})
                continue
        runs.append({"name": m["name"], "method": m["method"], "bits": m.get("bits"),
                     "group_size": m.get("group_size"), "linear_bits_per_param": m["size"]["linear_bits_per_param"],
                     "size_mb": m["size"]["size_mb"], "quantize_s": m["timings"].get("quantize_s"),
                     "ppl": {d: v["ppl"] for d, v in m["eval"].items()},
                     "bpb": {d: v["bits_per_byte"] for d, v in m["eval"].items() if "bits_per_byte" in v},
                     "ppl_curve": (m.get("distill") or {}).get("ppl_curve"),
                     "ppl_curve_teacher": (m.get("distill") or {}).get("ppl_curve_teacher")})
    if cfg is not None:  # table order = config order
        order = {mm.name: i for i, mm in enumerate(cfg.methods)}
        runs.sort(key=lambda r: order.get(r["name"], len(order)))
    datasets = sorted({d for r in runs for d in r["ppl"]})
    fp = next((r for r in runs if r["method"] == "fp"), None)
    header = ["method", "bits", "group", "bits/param", "size MB"] + [f"ppl {d}" for d in datasets]
    header += [f"Δ vs fp {d}" for d in datasets] if fp else []
    bpb_sets = [d for d in datasets if any(d in r["bpb"] for r in runs)]
    header += [f"bits/byte {d}" for d in bpb_sets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table = []
    for r in runs:
        row = [r["name"], r["bits"] if r["method"] != "fp" else "16", r["group_size"] or "-",
               f"{r['linear_bits_per_param']:.3f}", f"{r['size_mb']:.1f}"]
        row += [_fmt(r["ppl"].get(d)) for d in datasets]
        if fp:
            row += [_signed(r["ppl"][d] - fp["ppl"][d]) if d in r["ppl"] and d in fp["ppl"] else "-"
                    for d in datasets]
        row += [f"{r['bpb'][d]:.4f}" if d in r["bpb"] else "-" for d in bpb_sets]
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
        table.append(dict(zip(header, row)))
    md = "\n".join(lines) + "\n"
    if excluded:
        md += ("\nNot in this table (evaluated under another protocol than this config's; rerun them "
               "with this config to include them): "
               + "; ".join(f"{e['name']} ({e['why']})" for e in excluded) + ".\n")
        _log(f"left out of the table (another evaluation protocol): {', '.join(e['name'] for e in excluded)}")
    summary = {"experiment": os.path.basename(exp_dir), "datasets": datasets, "runs": runs}
    if excluded:
        summary["excluded"] = excluded
    crash_point("run.summary")
    write_json(os.path.join(exp_dir, "summary.json"), summary)
    write_text(os.path.join(exp_dir, "summary.md"), md)
    if table:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=header)
        w.writeheader()
        w.writerows(table)
        write_text(os.path.join(exp_dir, "summary.csv"), buf.getvalue())
        _plot_summary(runs, datasets, os.path.join(exp_dir, "ppl_vs_bits.png"), os.path.basename(exp_dir))
    # training rows (fine-tuning, distillation): their training curves side by side
    curves = {r["name"]: train_curve(os.path.join(exp_dir, r["name"])) for r in runs}
    if any(curves.values()):
        _plot_training({k: v for k, v in curves.items() if v}, os.path.join(exp_dir, "train_loss.png"),
                       os.path.basename(exp_dir))
    ppl_curves = {r["name"]: r for r in runs if r.get("ppl_curve")}
    if ppl_curves:
        _plot_ppl_steps(ppl_curves, os.path.join(exp_dir, "ppl_vs_steps.png"), os.path.basename(exp_dir))
    summary["markdown"] = md
    return summary


# ----------------------------------------------------------------------------- the runner


def _log(msg: str) -> None:
    print(f"[lowbit] {msg}", flush=True)


def run_experiment(cfg: ExperimentCfg, *, results_dir: str = "results", force: bool = False,
                   progress: bool = True, stop_after_layer: int | None = None, mesh=None) -> dict:
    """Run every method of ``cfg``; returns the experiment summary (see the module docstring).

    Holds ``<experiment dir>/.lock`` for the whole run (a second run on the same directory stops
    at once). Everything that can be checked before the model is loaded is: the results directory
    is writable, the evaluation and calibration texts exist; the sequence lengths and window counts
    are checked right after the model is loaded, before anything is written. ``stop_after_layer``
    (testing the resume path) raises ``KeyboardInterrupt`` after that layer has been checkpointed.

    ``mesh`` (:func:`lowbit.dist.make_mesh`; default: ``cfg.mesh``, or every device on ``data``
    when there are several): calibration, evaluation and training run data-parallel over it, the
    linears split over its ``model`` axis. In a multi-process job (:func:`lowbit.dist.initialize`)
    every process runs this same function; only process 0 writes ``results_dir`` and the per-layer
    checkpoints, the others write their copies of the finished rows to a scratch directory
    (``$LOWBIT_WORKER_DIR``, default under the system's temp directory); a rerun resumes from process
    0's last saved layer where every process can read it, else the interrupted row restarts.

    ``results_dir`` may be a URL (``gs://bucket/path``, any fsspec URL): the run then works in a local
    stage that is downloaded first and uploaded after every committed layer, row and summary
    (:mod:`lowbit.io.remote`).
    """
    if mesh is None and (cfg.mesh is not None or jax.device_count() > 1):
        mesh = dist.make_mesh(cfg.mesh)
    worker_dir = os.path.join(os.environ.get("LOWBIT_WORKER_DIR", os.path.join(tempfile.gettempdir(),
                                                                              "lowbit-workers")),
                              f"p{jax.process_index()}")
    mirror = None
    if remote.is_remote(results_dir):   # run in a local stage, uploaded as it goes (lowbit.io.remote)
        url = results_dir.rstrip("/")
        stage = remote.default_stage(url)
        if not dist.is_primary():   # a private copy to read process 0's per-layer checkpoints from
            stage = os.path.join(worker_dir, "stage", os.path.basename(stage))
        name = os.path.basename(experiment_dir(cfg, stage))
        mirror = remote.Mirror(f"{url}/{name}", os.path.join(stage, name))
        results_dir = stage
        _log(f"results: {mirror.url} (staged in {mirror.stage})")
    primary_exp_dir = experiment_dir(cfg, results_dir)
    if not dist.is_primary():
        results_dir = worker_dir
    exp_dir = experiment_dir(cfg, results_dir)

    def sync():
        try:
            mirror.push()
        except Exception as e:
            raise RuntimeError(f"uploading {mirror.stage} to {mirror.url} failed ({type(e).__name__}: {e}); "
                               "what is done is kept in the stage: rerun the same command to upload and go on") from e
    with lock.hold(exp_dir, what="lowbit run"), dist.use_mesh(mesh):
        if mirror is not None:
            got = mirror.pull()
            if got:
                _log(f"downloaded {len(got)} file(s) from {mirror.url}")
        _clean_stray_temps(exp_dir)
        return _run_locked(cfg, exp_dir, force=force, progress=progress, stop_after_layer=stop_after_layer,
                           primary_exp_dir=primary_exp_dir,
                           sync=sync if mirror is not None and dist.is_primary() else None,
                           local_stage=mirror is not None)


def _up_to_date(mf: str, h: str) -> bool:
    try:
        with open(mf) as f:
            return json.load(f).get("config_hash") == h
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as e:
        _log(f"warning: {mf} is unreadable ({e}); recomputing that row")
        return False


def _run_locked(cfg: ExperimentCfg, exp_dir: str, *, force: bool, progress: bool,
                stop_after_layer: int | None, primary_exp_dir: str | None = None, sync=None,
                local_stage: bool = False) -> dict:
    from lowbit import data
    from lowbit.eval.likelihood import perplexity
    from lowbit.models.loaders import load_model, model_fingerprint

    pending = []
    for m in cfg.methods:
        h = config_hash(_run_config(cfg, m))
        mf = os.path.join(exp_dir, m.name, "metrics.json")
        if not force and _up_to_date(mf, h):
            _log(f"{m.name}: up to date in {os.path.dirname(mf)} (use --force to recompute)")
            continue
        pending.append((m, h))
    if jax.process_count() > 1:   # every process runs the rows that any process still lacks
        todo = dist.agree_any([any(m is p for p, _ in pending) for m in cfg.methods])
        pending = [(m, config_hash(_run_config(cfg, m))) for m, t in zip(cfg.methods, todo) if t]

    env = environment_info()
    if pending:
        # texts first: a wrong data path or split fails before the (slow) model load
        quantizing = any(m.quantizes for m, _ in pending)
        eval_texts = {d: data.corpus_text(d, cfg.eval.split) for d in cfg.eval.data}
        if quantizing and cfg.calib.source == "corpus":
            data.corpus_text(cfg.calib.data, cfg.calib.split)  # parsed and cached for calibration_data

        t0 = time.perf_counter()
        _log(f"loading model {cfg.model}")
        params, mcfg, tok = load_model(cfg.model)
        if dist.current_mesh() is not None:   # linears by rows over `model`, the rest replicated
            params = dist.shard_params(params, dist.current_mesh())
        if tok is None:
            raise ValueError(f"model {cfg.model}: has no tokenizer; lowbit run needs one to tokenize the data")
        ctx = getattr(mcfg, "max_position_embeddings", None)
        for key, n in (("eval.seqlen", cfg.eval.seqlen), ("calib.seqlen", cfg.calib.seqlen if quantizing else 0)):
            if ctx is not None and n > ctx:
                raise ValueError(f"{key}={n}: exceeds the context of {cfg.model} (max_position_embeddings={ctx})")
        fingerprint = model_fingerprint(cfg.model)
        load_s = time.perf_counter() - t0

        evals = {}
        bos_id = None
        if cfg.eval.bos:
            if tok.bos_id is None:
                raise ValueError(f"eval.bos=true but the tokenizer of {cfg.model} has no BOS token")
            bos_id = tok.bos_id
        for d, text in eval_texts.items():
            # with a BOS, windows hold seqlen - 1 text tokens (perplexity prepends the BOS)
            try:
                evals[d] = data.eval_windows(tok.encode(text), cfg.eval.seqlen - (bos_id is not None),
                                             cfg.eval.max_windows)
            except ValueError as e:
                raise ValueError(f"eval.data {d}/{cfg.eval.split}: {e}") from None
            _log(f"eval data {d}/{cfg.eval.split}: {evals[d].shape[0]} windows of {cfg.eval.seqlen} tokens")

        t0 = time.perf_counter()
        if quantizing:
            calib, calib_record = calibration_data(cfg.calib, params, mcfg, tok, cfg.seed, progress=progress)
        calib_s = time.perf_counter() - t0
        train_tokens = None
        if any(m.finetune for m, _ in pending):
            train_tokens = tok.encode(data.corpus_text(cfg.finetune.data, cfg.finetune.split))
            _log(f"fine-tuning data {cfg.finetune.data}/{cfg.finetune.split}: {len(train_tokens)} tokens")
        distill_tokens = curve_tokens = None
        if any(m.distill for m, _ in pending):
            t0 = time.perf_counter()
            distill_tokens, distill_record = distill_data(cfg.distill, params, mcfg, tok, cfg.seed, progress=progress)
            distill_record["seconds"] = time.perf_counter() - t0
            stream = np.asarray(tok.encode(eval_texts[cfg.eval.data[0]]), np.int32)
            need = cfg.distill.eval_windows * cfg.distill.seqlen
            if cfg.distill.eval_every and len(stream) < need:
                raise ValueError(f"distill.eval_windows={cfg.distill.eval_windows}: {cfg.eval.data[0]}/{cfg.eval.split} "
                                 f"has {len(stream)} tokens, fewer than {need}")
            curve_tokens = stream[:need]   # the perplexity-vs-steps windows
            _log(f"distillation data ({distill_record['source']}): {np.asarray(distill_tokens).size} tokens "
                 f"in {distill_record['seconds']:.0f} s")

    # every check passed: only now does the results directory change
    write_text(os.path.join(exp_dir, "config.yaml"), yaml.safe_dump(to_dict(cfg), sort_keys=False))

    for m, h in pending:
        _log(f"=== {m.name} ({m.method}) ===")
        run_cfg = _run_config(cfg, m)
        timings: dict[str, Any] = {"load_model_s": load_s, "calib_data_s": calib_s}
        rows: list[dict] = []
        recipe = build_recipe(m, params)
        t0 = time.perf_counter()
        if recipe is None:
            qparams = params
        else:
            # per-layer checkpoints: written by process 0 only, read by every process (from process
            # 0's results directory: where no other process sees it, agree_min restarts the row)
            pdir = _partial_dir(primary_exp_dir or exp_dir, m, h)
            if force and dist.is_primary():
                shutil.rmtree(pdir, ignore_errors=True)
            start_params, start, rows = _load_partial(pdir, params) if os.path.isdir(pdir) else (params, 0, [])
            common = dist.agree_min(start) if jax.process_count() > 1 else start
            if common < start:   # resume from the last layer that every process can read
                start_params, start, rows = _load_partial(pdir, params, upto=common)
            if start and dist.current_mesh() is not None:   # restored layers: back onto the mesh
                start_params = dist.shard_params(start_params, dist.current_mesh())
            if start:
                _log(f"{m.name}: resuming after layer {start - 1} from {pdir}")

            def on_layer(i, new_params, layer_rows, pdir=pdir):
                layer = new_params["layers"][i]
                if checkpoint.is_collective(layer) and local_stage:   # linears split over processes
                    layer = jax.tree.map(dist.to_host, layer)   # (each stage is one host's: gathered to each)
                if dist.is_primary() or checkpoint.is_collective(layer):   # every process writes its shards
                    _save_layer(pdir, i, layer, layer_rows)
                    if sync is not None:
                        sync()
                else:
                    crash_point("run.layer-committed")
                if stop_after_layer is not None and i >= stop_after_layer:
                    raise KeyboardInterrupt(f"stopped after layer {i} (stop_after_layer)")

            qparams, new_rows = quantize(start_params, mcfg, m, calib, cfg.calib, start_layer=start,
                                         on_layer=on_layer, progress=progress, recipe=recipe, reference=params,
                                         keep_latent=m.distill)
            rows = rows + new_rows
        timings["quantize_s"] = time.perf_counter() - t0
        train_record = None
        if m.finetune:
            t0 = time.perf_counter()
            qparams, train_record = _finetune(qparams, mcfg, cfg, m, h, exp_dir, train_tokens, progress)
            timings["finetune_s"] = time.perf_counter() - t0
        if m.distill:
            t0 = time.perf_counter()
            qparams, train_record = _distill(qparams, params, mcfg, cfg, m, h, exp_dir, distill_tokens, curve_tokens,
                                             progress)
            train_record["data_record"] = distill_record
            from lowbit.methods import onebit

            qparams = onebit.pack(qparams, m.quant.scale_dtype)  # evaluated (and sized) packed
            timings["distill_s"] = time.perf_counter() - t0

        results = {}
        for d, windows in evals.items():
            r = perplexity(qparams, mcfg, windows, batch_size=cfg.eval.batch_size, progress=progress,
                           desc=f"{m.name} {d}", token_bytes=tok.token_bytes(), bos_id=bos_id)
            results[d] = {k: r[k] for k in ("ppl", "nll", "bits_per_byte", "n_bytes", "n_tokens", "n_windows",
                                            "seqlen", "top1_acc", "tokens_per_s", "wall_s")}
            _log(f"{m.name} {d}: ppl {r['ppl']:.3f}, {r['bits_per_byte']:.4f} bits/byte ({r['n_windows']} windows, {r['tokens_per_s']:.0f} tok/s)")
        timings["eval_s"] = sum(v["wall_s"] for v in results.values())

        metrics = {"name": m.name, "method": m.method, "config_hash": h,
                   "bits": ("mixed" if m.recipe else m.quant.bits) if m.quantizes else None,
                   # llm_int8 ignores quant.group_size: one absmax per output row (per channel, None)
                   "group_size": (m.quant.group_size if m.quantizes and m.method != "llm_int8" and not m.recipe
                                  else None),
                   "eval": results, "size": model_size(qparams), "timings": timings,
                   "model": {"name": cfg.model, **{k: v for k, v in fingerprint.items() if k != "files"}},
                   "peak_rss_mb": peak_rss_mb(), "environment": env}
        if train_record is not None:
            metrics["distill" if m.distill else "finetune"] = train_record
        with checkpoint.atomic_directory(os.path.join(exp_dir, m.name)) as tmp:
            with open(os.path.join(tmp, "config.yaml"), "w") as f:
                yaml.safe_dump(run_cfg, f, sort_keys=False)
            with open(os.path.join(tmp, "metrics.json"), "w") as f:
                json.dump(metrics, f, indent=2)
            if recipe is not None:
                with open(os.path.join(tmp, "calib_windows.json"), "w") as f:
                    json.dump(calib_record, f)
            if m.recipe is not None:   # the row's allocation, as run, and its bits-per-linear heatmap
                from lowbit.alloc import load_recipe
                from lowbit.alloc.plan import plot_bits

                shutil.copyfile(m.recipe, os.path.join(tmp, "recipe.yaml"))
                plot_bits(load_recipe(m.recipe), os.path.join(tmp, "bits.png"),
                          f"{m.name}: {metrics['size']['linear_bits_per_param']:.3f} bits/param")
            if rows:
                with open(os.path.join(tmp, "layers.csv"), "w", newline="") as f:
                    f.write(layers_csv(rows))
                _plot_layers(rows, os.path.join(tmp, "layers.png"), m.name)
            if train_record is not None:  # the training curve and its per-step metrics
                for f in ("metrics.csv", "loss.png"):
                    shutil.copyfile(os.path.join(_train_dir(exp_dir, m, h), f),
                                    os.path.join(tmp, "train_" + f))
            if m.distill and cfg.distill.save_model:   # the packed distilled model, as a lowbit checkpoint
                from lowbit.models.loaders import save_model

                save_model(os.path.join(tmp, "model"), qparams, mcfg, tok,
                           extra={"lowbit_run": {"experiment": cfg.experiment, "row": m.name, "config_hash": h}})
            crash_point("run.row-written")
        crash_point("run.row-committed")
        if recipe is not None:
            shutil.rmtree(_partial_dir(exp_dir, m, h), ignore_errors=True)
        if m.finetune or m.distill:
            shutil.rmtree(_train_dir(exp_dir, m, h), ignore_errors=True)
        if sync is not None:
            sync()

    summary = write_summary(exp_dir, cfg)
    if sync is not None:
        sync()
    _print_table(summary)
    summary["expectations"] = check_expectations(cfg, summary)
    return summary


def check_expectations(cfg: ExperimentCfg, summary: dict) -> list[dict]:
    """Compare each row's perplexities with the config's ``expect`` block; prints one line per
    expectation (``ok`` / ``DEPARTS``) and returns them. Rows evaluated under another protocol
    than the config's (e.g. a ``smoke`` variant) are not compared."""
    rows = (cfg.expect.rows or {}) if cfg.variant is None else {}
    out = []
    by_name = {r["name"]: r for r in summary["runs"]}
    for name, want in rows.items():
        for ds, ppl in want.items():
            got = by_name.get(name, {}).get("ppl", {}).get(ds)
            rel = None if got is None else got / ppl - 1
            ok = rel is not None and abs(rel) <= cfg.expect.tolerance
            out.append({"name": name, "data": ds, "expected": ppl, "got": got, "rel": rel, "ok": ok})
            status = "ok" if ok else "DEPARTS"
            got_s = "missing" if got is None else f"{got:.3f} ({rel:+.2%})"
            _log(f"expect {name} {ds}: {ppl:.3f} +-{cfg.expect.tolerance:.0%}, got {got_s}: {status}")
    if out and not all(e["ok"] for e in out):
        _log(f"{sum(not e['ok'] for e in out)} of {len(out)} rows depart from the config's expectations")
    return out


def _print_table(summary: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(summary["markdown"])
        return
    lines = [ln for ln in summary["markdown"].splitlines() if ln.strip()]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    t = Table(title=f"lowbit: {summary['experiment']}")
    for c in header:
        t.add_column(c, justify="left" if c == "method" else "right")
    for ln in lines[2:]:
        t.add_row(*[c.strip() for c in ln.strip("|").split("|")])
    Console().print(t)

