"""Training rows of ``lowbit run``: one row kind for LoRA fine-tuning (``finetune: true``, any method:
QLoRA on a quantized base) and for a method's own distillation (``distill: true``: the method's
``training`` hook, e.g. OneBit's), each with its training block (``finetune:`` / ``distill:``, both
:class:`~lowbit.runner.config.TrainingCfg`).

A stage (:class:`Stage`) says what the training loop (:func:`lowbit.train.train`) trains and how:
the params it starts from (LoRA adds adapters), the trainable leaves, the optimizer, the loss (with
the float model as teacher for distillation), and what the row's ``metrics.json`` records. The run
lives in ``.train-<row>-<hash>/`` with its orbax checkpoints until the row is committed, so an
interrupted training resumes.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from lowbit import methods
from lowbit.io.records import peak_rss_mb
from lowbit.pipeline import PURPOSE_DISTILL_DATA, PURPOSE_LORA_INIT, MethodCfg
from lowbit.runner.config import ExperimentCfg, TrainingCfg
from lowbit.runner.log import log
from lowbit.runner.resume import train_dir

__all__ = ["Stage", "stage_of", "train_row", "distill_data"]


class Stage(NamedTuple):
    """One training row's stage (see the module docstring)."""
    block: TrainingCfg             # the experiment's training block for this row kind
    start: Callable[[Any], Any]    # params -> the params training starts from
    trainable: str                 # regex of the trainable leaves
    optim: Any                     # lowbit.train.OptimCfg
    loss: Callable                 # the train-step loss
    count: Callable[[Any], int]    # params -> trained parameters
    count_key: str                 # the record's name for that count
    teacher: bool                  # the loss reads the float model (consts)
    what: str                      # for the log line


def stage_of(cfg: ExperimentCfg, m: MethodCfg, model_cfg, n_layers: int, seed: int | None = None) -> Stage:
    """The stage of a training row ``m`` (``m.training`` is ``"finetune"`` or ``"distill"``), for the run
    with ``seed`` (default: the config's)."""
    seed = cfg.seed if seed is None else seed
    from lowbit.train import causal_lm_loss, lora
    from lowbit.train.optim import OptimCfg

    tc = cfg.finetune if m.finetune else cfg.distill
    compute_cfg = model_cfg.replace(dtype=tc.compute_dtype) if hasattr(model_cfg, "replace") else model_cfg
    if m.finetune:
        ft = cfg.finetune
        key = jax.random.fold_in(jax.random.key(seed), PURPOSE_LORA_INIT)
        return Stage(ft, lambda p: lora.add_lora(p, rank=ft.rank, alpha=ft.alpha, dropout=ft.dropout,
                                                 targets=ft.targets, key=key),
                     lora.trainable_regex(),
                     OptimCfg(lr=ft.lr, warmup_steps=int(math.ceil(ft.warmup_ratio * ft.steps)), schedule="constant",
                              clip_norm=ft.clip_norm, b1=0.9, b2=0.999, weight_decay=0.0),
                     lora.lora_loss(causal_lm_loss(compute_cfg, True)), lora.count_trainable, "adapter_params",
                     False, "fine-tuned {n} adapter parameters")
    hooks = methods.get(m.method).training
    dc = cfg.distill
    return Stage(dc, lambda p: p, hooks.trainable(), hooks.optim(dc.lr, dc.warmup_steps),
                 hooks.loss(compute_cfg, model_cfg, dc.seqlen, n_layers, True), hooks.count, "trainable_params",
                 True, f"distilled {{n}} {m.method} parameters")


def _record(res, tc: TrainingCfg) -> dict:
    """What ``metrics.json`` keeps of a training run."""
    hist = res.history
    return {"steps": tc.steps, "tokens": tc.steps * tc.batch_size * tc.accum * tc.seqlen,
            "final_loss": hist[-1]["loss"] if hist else None,
            "tokens_per_s": (float(np.mean([r["tokens_per_s"] for r in hist[1:]])) if len(hist) > 1 else None),
            "compute_dtype": tc.compute_dtype,
            # XLA's accounting of the compiled train step (params + optimizer state + frozen base +
            # activations + gradients); the process's peak RSS also counts every earlier row's work
            "train_step_mb": res.step_memory["total"] / 2**20 if res.step_memory else None,
            "train_step_memory": res.step_memory, "peak_rss_mb": peak_rss_mb()}


def train_row(params, teacher, model_cfg, cfg: ExperimentCfg, m: MethodCfg, h: str, exp_dir: str, train_tokens,
              curve_tokens=None, progress: bool = True, *, seed: int | None = None) -> tuple[dict, dict]:
    """Train row ``m`` from ``params`` (the row's quantized model, in its training form) on
    ``train_tokens``; ``teacher``: the float model (distillation's teacher, and the curve's
    reference). With ``eval_every`` in the training block, the perplexity of the model being trained
    on ``curve_tokens`` every that many steps (step 0: the start point, in the method's stored form).
    ``seed``: the run's (adapter initialisation and data order; default: the config's). Returns the
    trained params (training form) and the record for ``metrics.json``."""
    from lowbit.eval.likelihood import perplexity
    from lowbit.models.protocol import family_of
    from lowbit.pipeline import finalize
    from lowbit.train import causal_lm_loss, train

    seed = cfg.seed if seed is None else seed
    stage = stage_of(cfg, m, model_cfg, len(family_of(model_cfg).layers(params)), seed)
    tc = stage.block
    every = tc.eval_every if m.distill else 0
    extra = dict(eval_every=every, eval_batches=-(-tc.eval_windows // tc.batch_size)) if m.distill else {}
    tcfg = tc.train_cfg(stage.optim, stage.trainable, seed, **extra)
    start = stage.start(params)
    curve, teacher_ppl = None, None
    if every:   # the start point of the perplexity-vs-steps curve, and the teacher on the same windows
        w0 = curve_tokens.reshape(tc.eval_windows, tc.seqlen)
        curve = [(0, float(perplexity(finalize(m, start), model_cfg, w0, progress=False)["ppl"]))]
        teacher_ppl = float(perplexity(teacher, model_cfg, w0, progress=False)["ppl"])
    compute_cfg = model_cfg.replace(dtype=tc.compute_dtype) if hasattr(model_cfg, "replace") else model_cfg
    res = train(start, model_cfg, tcfg, train_dir(exp_dir, m, h), train_tokens=train_tokens,
                eval_tokens=curve_tokens if every else None, loss_fn=stage.loss,
                eval_loss_fn=causal_lm_loss(compute_cfg, tcfg.remat) if every else None,
                consts=teacher if stage.teacher else None, progress=progress)
    record = {stage.count_key: stage.count(res.params if m.finetune else params)}
    if m.distill:
        record.update(data=tc.data, lr=tc.lr)
    record.update(_record(res, tc))
    if m.distill:
        if curve is not None:
            curve += [(r["step"], math.exp(r["eval_loss"])) for r in res.history if r.get("eval_loss") is not None]
        record.update(ppl_curve=curve, ppl_curve_windows=tc.eval_windows if curve else None,
                      ppl_curve_teacher=teacher_ppl)
    log(f"{m.name}: {stage.what.format(n=record[stage.count_key])} for {tc.steps} steps "
        f"(final loss {record['final_loss']:.4f})")
    return res.params, record


def distill_data(dc, params, model_cfg, tok, seed: int, *, progress: bool = True):
    """The distillation windows of ``dc`` (a DistillCfg) and a record that reproduces them:
    ``nsamples`` sequences sampled from the float model (``data: self``) or a corpus split's tokens."""
    from lowbit import data

    if dc.data == "self":
        from lowbit.eval.generate import self_generated_calibration

        windows = self_generated_calibration(params, model_cfg, dc.nsamples, dc.seqlen,
                                             jax.random.fold_in(jax.random.key(seed), PURPOSE_DISTILL_DATA),
                                             progress=progress)
        return windows, {"source": "self", "nsamples": dc.nsamples, "seqlen": dc.seqlen,
                         "sha256": hashlib.sha256(np.ascontiguousarray(windows, np.int32).tobytes()).hexdigest()}
    tokens = np.asarray(tok.encode(data.corpus_text(dc.data, dc.split)), np.int32)
    return tokens, {"source": "corpus", "data": dc.data, "split": dc.split, "stream_tokens": int(len(tokens))}
