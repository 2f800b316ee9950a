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

The pipeline itself (recipe, calibration windows, quantization, size) is :mod:`lowbit.pipeline`;
this module orchestrates: which rows are pending, loading what they need once, each row's
quantization (resumed per layer, :mod:`.resume`), training (:mod:`.train_rows`), evaluation and
atomic commit, then the summary (:mod:`.summary`, figures in :mod:`.plots`).

Seeds: one ``seed`` -> ``jax.random.key(seed)`` -> ``fold_in`` per purpose (:mod:`lowbit.pipeline`),
so re-running a config gives identical metrics. Each run directory is written atomically; a run
whose ``metrics.json`` carries the same config hash is reused unless ``force``. Rows whose
evaluation protocol differs from the config's are left out of the summary.

Crash safety: quantization commits every finished layer (its parameters and its report rows, one
atomic directory with per-array checksums) under ``.partial-<method>-<hash>/layer_NNNN``; an
interrupted run resumes after its last complete layer, a damaged saved layer is discarded with a
warning and recomputed, ``force`` starts the row from scratch. One run at a time holds the
directory's ``.lock``; temporary files of killed runs are removed by the next run. Each write point
is a named :func:`lowbit.faults.crash_point` exercised by ``tests/test_fault_injection.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, NamedTuple

import jax
import numpy as np
import yaml

from lowbit import dist, pipeline
from lowbit.faults import crash_point
from lowbit.io import checkpoint, remote
from lowbit.io.records import environment_info, layers_csv, peak_rss_mb, write_text
from lowbit.runner import lock
from lowbit.runner.config import HASH_NEUTRAL, ExperimentCfg, MethodCfg, Run, config_hash, expand, to_dict
from lowbit.runner.log import log
from lowbit.runner.plots import plot_layers
from lowbit.runner.resume import (clean_stray_temps, load_partial, partial_dir, save_layer, train_dir,
                                  up_to_date)
from lowbit.runner.summary import check_expectations, print_table, write_summary
from lowbit.runner.train_rows import distill_data, train_row

__all__ = ["run_experiment", "write_summary", "experiment_dir", "run_config", "check_expectations"]


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


def run_config(cfg: ExperimentCfg, m: MethodCfg, seed: int | None = None) -> dict:
    """The config of one run of row ``m`` (what its results depend on: not the other rows, not
    ``expect``; ``seed``: the run's, default the config's)."""
    d = to_dict(cfg)
    row = to_dict(m)
    neutral = {**HASH_NEUTRAL, m.method: getattr(type(m.options), "HASH_NEUTRAL", {})}
    for section, defaults in neutral.items():
        block = (row if section in ("quant", m.method) else d).get(section) or {}
        for k, default in defaults.items():
            if block.get(k) == default:
                del block[k]
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
    row.pop("seeds", None)   # a run has one seed: the experiment's ``seed`` below
    d.pop("seeds", None)
    if seed is not None:
        d["seed"] = seed
    d["methods"] = [row]
    d.pop("expect", None)
    d.pop("mesh", None)   # where it runs changes no number (to float tolerance): a resume may change it
    return d


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
        log(f"results: {mirror.url} (staged in {mirror.stage})")
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
                log(f"downloaded {len(got)} file(s) from {mirror.url}")
        clean_stray_temps(exp_dir)
        return _run_locked(cfg, exp_dir, force=force, progress=progress, stop_after_layer=stop_after_layer,
                           primary_exp_dir=primary_exp_dir,
                           sync=sync if mirror is not None and dist.is_primary() else None,
                           local_stage=mirror is not None)


class _Inputs(NamedTuple):
    """What the pending rows share, loaded once: the model, the evaluation windows, the calibration
    windows, the training data."""
    params: Any
    model_cfg: Any
    tok: Any
    fingerprint: dict
    evals: dict
    bos_id: int | None
    calib: dict            # seed -> (calibration windows, the record that reproduces them)
    train_tokens: Any
    distill: dict          # seed -> (distillation tokens, their record)
    curve_tokens: Any
    timings: dict


def _pending(cfg: ExperimentCfg, exp_dir: str, force: bool) -> list[tuple[Run, str]]:
    """The runs to compute (not up to date, or ``force``), with their config hashes; in a multi-process
    job every process runs the rows that any process still lacks."""
    runs = expand(cfg)
    pending = []
    for r in runs:
        h = config_hash(run_config(cfg, r.row, r.seed))
        mf = os.path.join(exp_dir, r.row.name, "metrics.json")
        if not force and up_to_date(mf, h):
            log(f"{r.row.name}: up to date in {os.path.dirname(mf)} (use --force to recompute)")
            continue
        pending.append((r, h))
    if jax.process_count() > 1:
        todo = dist.agree_any([any(r is p for p, _ in pending) for r in runs])
        pending = [(r, config_hash(run_config(cfg, r.row, r.seed))) for r, t in zip(runs, todo) if t]
    return pending


def _inputs(cfg: ExperimentCfg, pending: list, progress: bool) -> _Inputs:
    """Load what the pending rows need, checking everything that can be checked before any work:
    texts first (a wrong data path or split fails before the slow model load), then the model, the
    sequence lengths against its context, the windows."""
    from lowbit import data
    from lowbit.models.loaders import model_fingerprint

    quantizing = any(r.row.quantizes for r, _ in pending)
    eval_texts = {d: data.corpus_text(d, cfg.eval.split) for d in cfg.eval.data}
    if quantizing and cfg.calib.source == "corpus":
        data.corpus_text(cfg.calib.data, cfg.calib.split)  # parsed and cached for calibration_data

    t0 = time.perf_counter()
    log(f"loading model {cfg.model}")
    params, model_cfg, tok = pipeline.load(cfg.model)
    if dist.current_mesh() is not None:   # linears by rows over `model`, the rest replicated
        params = dist.shard_params(params, dist.current_mesh())
    if tok is None:
        raise ValueError(f"model {cfg.model}: has no tokenizer; lowbit run needs one to tokenize the data")
    ctx = getattr(model_cfg, "max_position_embeddings", None)
    for key, n in (("eval.seqlen", cfg.eval.seqlen), ("calib.seqlen", cfg.calib.seqlen if quantizing else 0)):
        if ctx is not None and n > ctx:
            raise ValueError(f"{key}={n}: exceeds the context of {cfg.model} (max_position_embeddings={ctx})")
    fingerprint = model_fingerprint(cfg.model)
    timings = {"load_model_s": time.perf_counter() - t0}

    evals = {}
    bos_id = None
    if cfg.eval.bos:
        if tok.bos_id is None:
            raise ValueError(f"eval.bos=true but the tokenizer of {cfg.model} has no BOS token")
        bos_id = tok.bos_id
    for d, text in eval_texts.items():
        # with a BOS, windows hold seqlen - 1 text tokens (perplexity prepends the BOS)
        try:
            evals[d] = data.eval_windows(tok.encode(text), cfg.eval.seqlen - (bos_id is not None), cfg.eval.max_windows)
        except ValueError as e:
            raise ValueError(f"eval.data {d}/{cfg.eval.split}: {e}") from None
        log(f"eval data {d}/{cfg.eval.split}: {evals[d].shape[0]} windows of {cfg.eval.seqlen} tokens")

    t0 = time.perf_counter()
    calib = {seed: pipeline.calibration_data(cfg.calib, params, model_cfg, tok, seed, progress=progress)
             for seed in sorted({r.seed for r, _ in pending if r.row.quantizes})}
    timings["calib_data_s"] = time.perf_counter() - t0
    train_tokens = None
    if any(r.row.finetune for r, _ in pending):
        train_tokens = tok.encode(data.corpus_text(cfg.finetune.data, cfg.finetune.split))
        log(f"fine-tuning data {cfg.finetune.data}/{cfg.finetune.split}: {len(train_tokens)} tokens")
    distill, curve_tokens = {}, None
    for seed in sorted({r.seed for r, _ in pending if r.row.distill}):
        t0 = time.perf_counter()
        tokens, record = distill_data(cfg.distill, params, model_cfg, tok, seed, progress=progress)
        record["seconds"] = time.perf_counter() - t0
        distill[seed] = (tokens, record)
        log(f"distillation data ({record['source']}, seed {seed}): {np.asarray(tokens).size} tokens "
            f"in {record['seconds']:.0f} s")
    if distill:
        stream = np.asarray(tok.encode(eval_texts[cfg.eval.data[0]]), np.int32)
        need = cfg.distill.eval_windows * cfg.distill.seqlen
        if cfg.distill.eval_every and len(stream) < need:
            raise ValueError(f"distill.eval_windows={cfg.distill.eval_windows}: {cfg.eval.data[0]}/{cfg.eval.split} "
                             f"has {len(stream)} tokens, fewer than {need}")
        curve_tokens = stream[:need]   # the perplexity-vs-steps windows
    return _Inputs(params, model_cfg, tok, fingerprint, evals, bos_id, calib, train_tokens, distill, curve_tokens,
                   timings)


def _quantize_row(cfg: ExperimentCfg, inp: _Inputs, m: MethodCfg, seed: int, recipe, *, pdir: str, force: bool,
                  progress: bool, stop_after_layer: int | None, sync, local_stage: bool):
    """Row ``m`` quantized, resumed from its per-layer checkpoints in ``pdir`` (written by process 0
    only, read by every process: where another process cannot read them, every process restarts
    from the last layer all of them hold). Returns ``(params, report rows)``."""
    if force and dist.is_primary():
        shutil.rmtree(pdir, ignore_errors=True)
    params = inp.params
    start_params, start, rows = load_partial(pdir, params) if os.path.isdir(pdir) else (params, 0, [])
    common = dist.agree_min(start) if jax.process_count() > 1 else start
    if common < start:   # resume from the last layer that every process can read
        start_params, start, rows = load_partial(pdir, params, upto=common)
    if start and dist.current_mesh() is not None:   # restored layers: back onto the mesh
        start_params = dist.shard_params(start_params, dist.current_mesh())
    if start:
        log(f"{m.name}: resuming after layer {start - 1} from {pdir}")

    def on_layer(i, new_params, layer_rows):
        layer = new_params["layers"][i]
        if checkpoint.is_collective(layer) and local_stage:   # linears split over processes
            layer = jax.tree.map(dist.to_host, layer)   # (each stage is one host's: gathered to each)
        if dist.is_primary() or checkpoint.is_collective(layer):   # every process writes its shards
            save_layer(pdir, i, layer, layer_rows)
            if sync is not None:
                sync()
        else:
            crash_point("run.layer-committed")
        if stop_after_layer is not None and i >= stop_after_layer:
            raise KeyboardInterrupt(f"stopped after layer {i} (stop_after_layer)")

    qparams, new_rows = pipeline.quantize(start_params, inp.model_cfg, m, inp.calib[seed][0], cfg.calib, start_layer=start,
                                          on_layer=on_layer, progress=progress, recipe=recipe, reference=params,
                                          keep_latent=m.training is not None)
    return qparams, rows + new_rows


def _evaluate(cfg: ExperimentCfg, inp: _Inputs, m: MethodCfg, qparams, progress: bool) -> dict:
    from lowbit.eval.likelihood import perplexity

    results = {}
    for d, windows in inp.evals.items():
        r = perplexity(qparams, inp.model_cfg, windows, batch_size=cfg.eval.batch_size, progress=progress,
                       desc=f"{m.name} {d}", token_bytes=inp.tok.token_bytes(), bos_id=inp.bos_id)
        results[d] = {k: r[k] for k in ("ppl", "nll", "bits_per_byte", "n_bytes", "n_tokens", "n_windows",
                                        "seqlen", "top1_acc", "tokens_per_s", "wall_s")}
        log(f"{m.name} {d}: ppl {r['ppl']:.3f}, {r['bits_per_byte']:.4f} bits/byte ({r['n_windows']} windows, "
            f"{r['tokens_per_s']:.0f} tok/s)")
    return results


def _commit_row(cfg: ExperimentCfg, inp: _Inputs, run: Run, h: str, exp_dir: str, metrics: dict, qparams,
                rows: list[dict], quantized: bool) -> None:
    """Write the row's directory atomically (config, metrics, calibration record, recipe and its
    heatmap, per-layer report and plot, training curve, the saved model)."""
    m = run.row
    with checkpoint.atomic_directory(os.path.join(exp_dir, m.name)) as tmp:
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            yaml.safe_dump(run_config(cfg, m, run.seed), f, sort_keys=False)
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        if quantized:
            with open(os.path.join(tmp, "calib_windows.json"), "w") as f:
                json.dump(inp.calib[run.seed][1], f)
        if m.recipe is not None:   # the row's allocation, as run, and its bits-per-linear heatmap
            from lowbit.alloc import load_recipe
            from lowbit.alloc.plan import plot_bits

            shutil.copyfile(m.recipe, os.path.join(tmp, "recipe.yaml"))
            plot_bits(load_recipe(m.recipe), os.path.join(tmp, "bits.png"),
                      f"{m.name}: {metrics['size']['linear_bits_per_param']:.3f} bits/param")
        if rows:
            with open(os.path.join(tmp, "layers.csv"), "w", newline="") as f:
                f.write(layers_csv(rows))
            plot_layers(rows, os.path.join(tmp, "layers.png"), m.name)
        if m.training is not None:  # the training curve and its per-step metrics
            for f in ("metrics.csv", "loss.png"):
                shutil.copyfile(os.path.join(train_dir(exp_dir, m, h), f), os.path.join(tmp, "train_" + f))
        if m.distill and cfg.distill.save_model:   # the distilled model as stored, as a lowbit checkpoint
            from lowbit.models.loaders import save_model

            save_model(os.path.join(tmp, "model"), qparams, inp.model_cfg, inp.tok,
                       extra={"lowbit_run": {"experiment": cfg.experiment, "row": m.name, "config_hash": h}})
        crash_point("run.row-written")
    crash_point("run.row-committed")


def _run_locked(cfg: ExperimentCfg, exp_dir: str, *, force: bool, progress: bool,
                stop_after_layer: int | None, primary_exp_dir: str | None = None, sync=None,
                local_stage: bool = False) -> dict:
    pending = _pending(cfg, exp_dir, force)
    env = environment_info()
    inp = _inputs(cfg, pending, progress) if pending else None

    # every check passed: only now does the results directory change
    write_text(os.path.join(exp_dir, "config.yaml"), yaml.safe_dump(to_dict(cfg), sort_keys=False))

    for run, h in pending:
        m = run.row
        log(f"=== {m.name} ({m.method}" + (f", seed {run.seed}" if m.name != run.base else "") + ") ===")
        timings: dict[str, Any] = dict(inp.timings)
        rows: list[dict] = []
        recipe = pipeline.build_recipe(m, inp.params)
        t0 = time.perf_counter()
        qparams = inp.params
        if recipe is not None:
            qparams, rows = _quantize_row(cfg, inp, m, run.seed, recipe, pdir=partial_dir(primary_exp_dir or exp_dir, m, h),
                                          force=force, progress=progress, stop_after_layer=stop_after_layer, sync=sync,
                                          local_stage=local_stage)
        timings["quantize_s"] = time.perf_counter() - t0
        train_record = None
        if m.training is not None:
            t0 = time.perf_counter()
            tokens = inp.train_tokens if m.finetune else inp.distill[run.seed][0]
            qparams, train_record = train_row(qparams, inp.params, inp.model_cfg, cfg, m, h, exp_dir, tokens,
                                              inp.curve_tokens, progress, seed=run.seed)
            if m.distill:
                train_record["data_record"] = inp.distill[run.seed][1]
            qparams = pipeline.finalize(m, qparams)   # evaluated (and sized) in the method's stored form
            timings[f"{m.training}_s"] = time.perf_counter() - t0

        results = _evaluate(cfg, inp, m, qparams, progress)
        timings["eval_s"] = sum(v["wall_s"] for v in results.values())
        metrics = {"name": m.name, "method": m.method, "config_hash": h, **pipeline.report_fields(m),
                   "eval": results, "size": pipeline.model_size(qparams), "timings": timings,
                   "model": {"name": cfg.model, **{k: v for k, v in inp.fingerprint.items() if k != "files"}},
                   "peak_rss_mb": peak_rss_mb(), "environment": env, "row": run.base, "seed": run.seed}
        if train_record is not None:
            metrics[m.training] = train_record
        _commit_row(cfg, inp, run, h, exp_dir, metrics, qparams, rows, quantized=recipe is not None)
        if recipe is not None:
            shutil.rmtree(partial_dir(exp_dir, m, h), ignore_errors=True)
        if m.training is not None:
            shutil.rmtree(train_dir(exp_dir, m, h), ignore_errors=True)
        if sync is not None:
            sync()

    summary = write_summary(exp_dir, cfg)
    if sync is not None:
        sync()
    print_table(summary)
    summary["expectations"] = check_expectations(cfg, summary)
    return summary
