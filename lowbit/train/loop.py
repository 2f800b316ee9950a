"""The training driver: :func:`train` runs a :class:`TrainCfg` over a model, with progress, a metrics
CSV, a loss plot and checkpoints from which a killed run resumes bit-identically.

::

    from lowbit.train import TrainCfg, OptimCfg, train, train_eval_tokens
    tr, ev = train_eval_tokens("brown", tokenizer)                # disjoint fixed splits
    cfg = TrainCfg(steps=200, batch_size=8, seqlen=256, accum=2, trainable=r"norm",
                   optim=OptimCfg(lr=1e-4, warmup_steps=20, schedule="cosine"), save_every=50)
    result = train(params, model_cfg, cfg, "runs/norms", train_tokens=tr, eval_tokens=ev)
    result.params, result.history                                 # float32 trainable leaves merged back

Run directory::

    RUN/config.json        the resolved run config (what the checkpoints' hash covers) + its hash
    RUN/metrics.csv        step, loss, lr, grad_norm, tokens_per_s, elapsed_s, eval_loss (written atomically)
    RUN/loss.png           loss curve (and eval loss) per optimizer step
    RUN/checkpoints/<step> orbax checkpoints (lowbit.train.ckpt), the newest ``keep``
    RUN/checkpoints-corrupt/  corrupt checkpoints set aside on resume

**Steps.** ``steps`` counts optimizer steps; each is the mean gradient of ``accum`` micro-batches
of ``batch_size`` windows of ``seqlen`` tokens. Micro-step ``s`` trains on
``TokenWindows.batch(s)`` (:mod:`lowbit.train.data`): the data position is that integer, so
resuming from optimizer step ``k`` replays exactly the batches from micro-step ``k * accum`` on.
A row of metrics.csv is one optimizer step: ``loss`` is the mean of its micro-batch losses,
``grad_norm`` the global norm of its accumulated gradient before clipping, ``lr`` the learning
rate that step used.

**Resume.** Calling :func:`train` again with the same arguments continues from the newest
checkpoint in ``RUN/checkpoints``: parameters, optimizer state, RNG key and step are restored, the
metrics rows after that step are dropped (they are recomputed), and the result is bit for bit the
one of an uninterrupted run (same machine and software). A corrupt newest checkpoint is set aside
with a warning and the previous one is used; a different configuration raises
:class:`~lowbit.train.ckpt.ConfigMismatchError` naming the fields. Fields that cannot change the
numbers (:data:`RESUME_NEUTRAL`: checkpoint / log / eval cadence) may change between runs.

On GPU, bit-identical also needs deterministic XLA kernels: the embedding gradient is a
scatter-add, whose default GPU implementation sums in a varying order; run with
``XLA_FLAGS=--xla_gpu_deterministic_ops=true`` (on CPU everything is deterministic).

**Failure.** A non-finite loss or gradient norm stops the run with :class:`NonFiniteLossError`
naming the step; nothing is saved after the last good checkpoint, so the run directory still holds
it (lower the learning rate, or switch to float32, and resume).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import time
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.core.checks import is_int
from lowbit import dist
from lowbit.faults import crash_point
from lowbit.io.records import write_json, write_text
from lowbit.plots import figure
from lowbit.progress import Bar
from lowbit.train.ckpt import TrainCheckpoints, tree_checksums
from lowbit.train.data import TokenWindows
from lowbit.train.losses import causal_lm_loss
from lowbit.train.optim import OptimCfg, build_optimizer
from lowbit.train.step import (COMPUTE_DTYPES, TrainState, flat_paths, init_state, make_eval_step, make_train_step,
                               partition_params)

__all__ = ["TrainCfg", "TrainResult", "NonFiniteLossError", "train", "step_memory", "RESUME_NEUTRAL", "METRICS_COLUMNS",
           "read_metrics", "RNG_PURPOSE"]

#: TrainCfg fields that may differ between a run and its resumption (they change no number).
RESUME_NEUTRAL = ("save_every", "keep", "log_every", "eval_every", "eval_batches")

METRICS_COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "eval_loss")

#: the train step's key is ``fold_in(jax.random.key(seed), RNG_PURPOSE)`` (one seed, one fold per
#: purpose; the data order uses ``numpy.random.default_rng(seed + epoch)``).
RNG_PURPOSE = 1


class NonFiniteLossError(FloatingPointError):
    """The loss (or the gradient norm) of a training step is NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class TrainCfg:
    """One training run (see the module docstring).

    Attributes:
      steps: optimizer steps (> 0).
      batch_size: windows per micro-batch (>= 1); seqlen: tokens per window (>= 2).
      accum: micro-batches per optimizer step (gradient accumulation, >= 1).
      optim: an :class:`~lowbit.train.optim.OptimCfg` (or a dict of its fields).
      compute_dtype: ``"float32"`` or ``"bfloat16"`` (activations and the cast of the trainable
        leaves inside the loss; masters and optimizer state stay float32).
      remat: :func:`jax.checkpoint` around every block.
      trainable: regex on parameter paths of the leaves that train (``".*"``: every float leaf).
      seed: data order and the step's RNG key.
      save_every: checkpoint every this many optimizer steps (0: only the final one); keep: how
        many checkpoints to keep (>= 1).
      log_every: rewrite metrics.csv every this many steps (it is also written at every checkpoint
        and at the end).
      eval_every: evaluate on the eval tokens every this many steps (0: only at the end);
        eval_batches: at most this many batches of eval windows (in order, from the first).
    """

    steps: int = 100
    batch_size: int = 8
    seqlen: int = 256
    accum: int = 1
    optim: OptimCfg = OptimCfg()
    compute_dtype: str = "float32"
    remat: bool = True
    trainable: str = ".*"
    seed: int = 0
    save_every: int = 100
    keep: int = 3
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 8

    def __post_init__(self):
        if isinstance(self.optim, dict):
            known = {f.name for f in dataclasses.fields(OptimCfg)}
            unknown = sorted(set(self.optim) - known)
            if unknown:
                raise ValueError(f"TrainCfg: optim: unknown keys {unknown} (known: {sorted(known)})")
            object.__setattr__(self, "optim", OptimCfg(**self.optim))
        problems = []
        for name, lo in (("steps", 1), ("batch_size", 1), ("seqlen", 2), ("accum", 1), ("seed", 0),
                         ("save_every", 0), ("keep", 1), ("log_every", 1), ("eval_every", 0), ("eval_batches", 1)):
            v = getattr(self, name)
            if not is_int(v) or v < lo:
                problems.append(f"{name}={v!r}: expected an int >= {lo}")
        if not isinstance(self.optim, OptimCfg):
            problems.append(f"optim={self.optim!r}: expected an OptimCfg or a dict of its fields")
        elif is_int(self.steps) and self.steps >= 1 and self.optim.warmup_steps > self.steps:
            problems.append(f"optim.warmup_steps={self.optim.warmup_steps} exceeds steps={self.steps}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            problems.append(f"compute_dtype={self.compute_dtype!r}: expected one of {COMPUTE_DTYPES}")
        if not isinstance(self.remat, bool):
            problems.append(f"remat={self.remat!r}: expected a bool")
        if not isinstance(self.trainable, str):
            problems.append(f"trainable={self.trainable!r}: expected a regex string")
        else:
            try:
                re.compile(self.trainable)
            except re.error as e:
                problems.append(f"trainable={self.trainable!r}: not a valid regular expression ({e})")
        if problems:
            raise ValueError("TrainCfg: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainCfg":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainCfg.from_dict: unknown keys {unknown} (known: {sorted(names)})")
        return cls(**d)

    def replace(self, **kw) -> "TrainCfg":
        return dataclasses.replace(self, **kw)


class TrainResult(NamedTuple):
    """``params``: the full params with the trained (float32) leaves; ``state``: the final
    :class:`~lowbit.train.step.TrainState`; ``history``: the metrics rows (dicts, one per optimizer
    step); ``step``: the last step; ``resumed_from``: the checkpoint step it resumed from (or None);
    ``step_memory``: XLA's memory accounting of the compiled train step, in bytes
    (:func:`step_memory`), or None when no step ran."""
    params: Any
    state: TrainState
    history: list
    step: int
    resumed_from: int | None
    run_dir: str
    step_memory: dict | None = None


def step_memory(compiled) -> dict:
    """The memory XLA assigned to a compiled program, in bytes: ``argument`` (inputs: trainable
    params, optimizer state, frozen base, batch), ``output``, ``alias`` (outputs sharing an input's
    buffer), ``temp`` (everything live only inside the step: activations kept for the backward
    pass, gradients, dequantized weights), ``total`` = argument + output + temp - alias (every
    buffer the step's allocation plan holds) and ``peak`` as the backend reports it (0 where it does
    not; XLA:CPU leaves the temporaries out of it, so compare ``total`` across runs). Exact and
    deterministic, unlike a process's resident size, which also counts the runtime, the compiler
    and earlier work."""
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    out["peak"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    return out


# ----------------------------------------------------------------------------- files

def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)          # shortest text that reads back as the same float
    return str(v)


def _write_metrics(path: str, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(METRICS_COLUMNS)
    for r in rows:
        w.writerow([_fmt(r.get(c)) for c in METRICS_COLUMNS])
    write_text(path, buf.getvalue())


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.csv (``step`` an int, the other columns floats or None)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        out.append({c: (int(r[c]) if c == "step" else (float(r[c]) if r.get(c) not in (None, "") else None))
                    for c in METRICS_COLUMNS})
    return out


def _plot(path: str, rows: list[dict], title: str) -> None:
    with figure(path, figsize=(6, 4), dpi=100, tight=False, bbox_inches="tight") as (fig, ax):
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
        ev = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
        if ev:
            ax.plot(*zip(*ev), "o-", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats / token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()


# ----------------------------------------------------------------------------- config

def _leaf_desc(x) -> str:
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


def _model_desc(model_cfg) -> Any:
    if hasattr(model_cfg, "to_dict"):
        return {"class": type(model_cfg).__name__, **model_cfg.to_dict()}
    if dataclasses.is_dataclass(model_cfg):
        return {"class": type(model_cfg).__name__, **dataclasses.asdict(model_cfg)}
    return repr(model_cfg)


def _loss_desc(loss_fn) -> Any:
    return getattr(loss_fn, "config", None) or {"name": getattr(loss_fn, "__qualname__", repr(loss_fn))}


def _run_config(cfg: TrainCfg, model_cfg, loss_fn, partition, params, data: TokenWindows) -> dict:
    flat = flat_paths(params)
    train = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_NEUTRAL}
    return {"train": train, "model": _model_desc(model_cfg), "loss": _loss_desc(loss_fn),
            "data": data.fingerprint(),
            "trainable": {p: _leaf_desc(flat[p]) for p in partition.trainable}}


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- the driver

def _as_windows(tokens, cfg: TrainCfg, what: str, batch_size: int | None = None) -> TokenWindows:
    if isinstance(tokens, TokenWindows):
        want = {"seqlen": cfg.seqlen, "batch_size": batch_size or cfg.batch_size, "seed": cfg.seed}
        if batch_size == 1:             # evaluation windows: only their length matters
            want = {"seqlen": cfg.seqlen}
        bad = [f"{k}={getattr(tokens, k)} (cfg: {v})" for k, v in want.items() if getattr(tokens, k) != v]
        if bad:
            raise ValueError(f"{what}: a TokenWindows that disagrees with the TrainCfg: {', '.join(bad)}")
        return tokens
    try:
        return TokenWindows(tokens, cfg.seqlen, batch_size or cfg.batch_size, seed=cfg.seed)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def train(params, model_cfg, cfg: TrainCfg, run_dir: str, *, train_tokens, eval_tokens=None,
          loss_fn: Callable | None = None, consts=None, eval_loss_fn: Callable | None = None,
          progress: bool = True) -> TrainResult:
    """Train the ``cfg.trainable`` leaves of ``params`` (a model of ``model_cfg``) on ``train_tokens``.

    Args:
      params: the full parameters (QuantizedTensor leaves allowed; they stay frozen). On resume
        pass the same params again: frozen leaves are taken from here (checked by checksum).
      model_cfg: the model's config; the default loss runs it with ``dtype=cfg.compute_dtype``.
      cfg: the :class:`TrainCfg`.
      run_dir: where metrics, plot, config and checkpoints go; an existing run is resumed.
      train_tokens / eval_tokens: 1-D token streams (or :class:`~lowbit.train.data.TokenWindows`)
        of two disjoint splits (:func:`lowbit.train.data.train_eval_tokens`); eval is optional.
      loss_fn: ``loss_fn(params, batch, rng, consts) -> (loss, aux)``; default
        :func:`~lowbit.train.losses.causal_lm_loss`. Its ``config`` attribute is part of the run
        config.
      consts: passed to ``loss_fn`` at every step (e.g. a teacher's params for distillation).
      eval_loss_fn: the loss of the ``eval_loss`` column (default ``loss_fn``); e.g. the plain
        next-token cross-entropy (:func:`~lowbit.train.losses.causal_lm_loss`) while training on a
        distillation loss, so that ``exp(eval_loss)`` is the perplexity of the model being trained.
        It gets the same ``consts``; it does not change the training, so it is not in the run config.
      progress: show the progress bar (loss, tokens/s, elapsed, ETA).

    Returns a :class:`TrainResult`. Raises :class:`NonFiniteLossError` on a NaN/inf loss,
    :class:`~lowbit.train.ckpt.ConfigMismatchError` when ``run_dir`` holds another run.
    """
    if not isinstance(cfg, TrainCfg):
        raise ValueError(f"cfg: expected a TrainCfg, got {type(cfg).__name__}")
    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    part = partition_params(params, cfg.trainable)
    if loss_fn is None:
        compute_cfg = model_cfg.replace(dtype=cfg.compute_dtype) if hasattr(model_cfg, "replace") else model_cfg
        loss_fn = causal_lm_loss(compute_cfg, cfg.remat)
    data = _as_windows(train_tokens, cfg, "train_tokens")
    eval_data = None
    if eval_tokens is not None:
        ev = _as_windows(eval_tokens, cfg, "eval_tokens", 1)        # in order; batch as large as it fits
        eval_data = TokenWindows(ev.windows, ev.seqlen, min(cfg.batch_size, ev.n_windows))
        shared = eval_data.shared_windows(data)
        if shared:
            raise ValueError(f"eval_tokens: {shared} of the {eval_data.n_windows} evaluation windows are also "
                             "training windows; evaluate on another split of the corpus "
                             "(lowbit.train.data.train_eval_tokens)")

    opt = build_optimizer(cfg.optim, cfg.steps, cfg.accum)
    schedule = cfg.optim.schedule_fn(cfg.steps)
    step_fn = make_train_step(loss_fn, opt, part, cfg.compute_dtype)
    eval_fn = (make_eval_step(eval_loss_fn or loss_fn, part, cfg.compute_dtype)
               if eval_data is not None else None)
    _, frozen = part.split(params)

    config = _run_config(cfg, model_cfg, loss_fn, part, params, data)
    config_hash = _config_hash(config)
    frozen_sums = tree_checksums(frozen)
    csv_path, plot_path = os.path.join(run_dir, "metrics.csv"), os.path.join(run_dir, "loss.png")
    rng0 = jax.random.fold_in(jax.random.key(cfg.seed), RNG_PURPOSE)

    with TrainCheckpoints(os.path.join(run_dir, "checkpoints"), keep=cfg.keep,
                          quarantine=os.path.join(run_dir, "checkpoints-corrupt")) as ckpts:
        fresh = init_state(part, params, opt, rng0)
        if jax.process_count() > 1:   # only process 0 writes checkpoints (TrainCheckpoints.save), so no step
            restored = None           # is held by every process: a multi-process job restarts its training
            if ckpts.discard_after(0):
                warnings.warn(f"{ckpts.directory}: not every process holds the checkpoints after step 0; "
                              "deleted them and resuming from step 0", RuntimeWarning, stacklevel=2)
        else:
            restored = ckpts.restore(fresh, config=config, frozen_checksums=frozen_sums)
        if restored is None:
            start, state, history, elapsed0 = 0, fresh, [], 0.0
        else:
            start, state = restored.step, restored.state
            elapsed0 = float(restored.meta.get("elapsed_s", 0.0))
            history = []
            if os.path.exists(csv_path):
                history = [r for r in read_metrics(csv_path) if r["step"] <= start]
            if [r["step"] for r in history] != list(range(1, start + 1)):
                warnings.warn(f"{csv_path}: the metrics of steps 1..{start} are incomplete; the history of this "
                              "run starts where the file's rows do", RuntimeWarning, stacklevel=2)
        # on a mesh (lowbit.dist.use_mesh) the state and frozen base are replicated and every
        # batch is split over the data axis: the step runs data-parallel, its loss mean all-reduced
        state, frozen = dist.replicate((state, frozen), dist.current_mesh())
        write_json(os.path.join(run_dir, "config.json"),
                   {"config": config, "config_hash": config_hash,
                    "resume_neutral": {k: getattr(cfg, k) for k in RESUME_NEUTRAL}})

        def evaluate(trainable) -> float:
            losses = [float(eval_fn(trainable, frozen, dist.place_batch(jnp.asarray(b)), consts)[0])
                      for b in eval_data.in_order(cfg.eval_batches)]
            return float(np.mean(losses))

        def meta(step: int, elapsed: float) -> dict:
            return {"config": config, "config_hash": config_hash, "frozen_checksums": frozen_sums,
                    "micro_step": step * cfg.accum, "elapsed_s": elapsed,
                    "tokens_seen": step * cfg.accum * data.tokens_per_batch}

        mem = None
        if start < cfg.steps:   # compile once, ahead of the loop, to read XLA's memory accounting
            step_fn = step_fn.lower(state, frozen, dist.place_batch(jnp.asarray(data.batch(start * cfg.accum))),
                                    consts).compile()
            mem = step_memory(step_fn)
        t_start = time.perf_counter()
        last_saved = start if restored is not None else None
        tokens_per_step = cfg.accum * data.tokens_per_batch
        with Bar(cfg.steps, "train", enabled=progress, unit="steps") as bar:
            bar.advance(start)
            for s in range(start, cfg.steps):
                step_no = s + 1
                t0 = time.perf_counter()
                losses = []
                for k in range(cfg.accum):
                    micro = s * cfg.accum + k
                    state, m = step_fn(state, frozen, dist.place_batch(jnp.asarray(data.batch(micro))), consts)
                    loss = float(m["loss"])
                    if not math.isfinite(loss):
                        _write_metrics(csv_path, history)
                        raise NonFiniteLossError(
                            f"loss is {loss} at step {step_no} (micro-batch {k + 1} of {cfg.accum}, data position "
                            f"{micro}): training stopped, nothing of this step was saved; "
                            + _last_good(last_saved, ckpts.directory)
                            + " (the same configuration would repeat this step: lower optim.lr, clip harder or "
                            "compute in float32, in a new run directory)")
                    losses.append(loss)
                grad_norm = float(m["grad_norm"])
                if not math.isfinite(grad_norm):
                    _write_metrics(csv_path, history)
                    raise NonFiniteLossError(
                        f"gradient norm is {grad_norm} at step {step_no} (loss {np.mean(losses)}): training stopped, "
                        "nothing of this step was saved; " + _last_good(last_saved, ckpts.directory))
                dt = time.perf_counter() - t0
                row = {"step": step_no, "loss": float(np.mean(losses)), "lr": float(schedule(s)),
                       "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / max(dt, 1e-9),
                       "elapsed_s": elapsed0 + time.perf_counter() - t_start, "eval_loss": None}
                if eval_fn is not None and ((cfg.eval_every and step_no % cfg.eval_every == 0)
                                            or step_no == cfg.steps):
                    row["eval_loss"] = evaluate(state.params)
                history.append(row)
                bar.advance(info=f"loss {row['loss']:.4f}  {row['tokens_per_s']:,.0f} tok/s")
                save = step_no == cfg.steps or (cfg.save_every and step_no % cfg.save_every == 0)
                if save or step_no % cfg.log_every == 0:
                    _write_metrics(csv_path, history)
                if save:
                    ckpts.save(step_no, state, meta(step_no, row["elapsed_s"]))
                    last_saved = step_no
                crash_point("train.step-done")
        _write_metrics(csv_path, history)
        if history:
            _plot(plot_path, history, os.path.basename(run_dir))
    return TrainResult(part.merge(state.params, frozen), state, history, cfg.steps,
                       restored.step if restored is not None else None, run_dir, mem)


def _last_good(step: int | None, directory: str) -> str:
    if step is None:
        return f"no checkpoint was written yet in {directory}"
    return f"the last good checkpoint is step {step} in {directory}"
