"""GPTQ speed, side by side: lowbit (JAX, jit) vs PyTorch GPTQ, per layer and for a whole model.

**Per layer** (``--shapes``): the same saved ``(W, H)`` through three implementations in one process,
interleaved repetition by repetition so machine noise hits all alike:

- ``lowbit``: :func:`lowbit.methods.gptq_core.quantize_weight`, timed up to the packed QuantizedTensor;
- ``torch_ref``: the IST-DASLab reference's ``fasterquant`` structure (gptq.py / quant.py of
  IST-DASLab/gptq, rewritten here): a quantizer object whose ``find_params`` runs at every group
  start on ``W``, per-column ``quantize`` of a ``(rows, 1)`` column, the losses kept, Python loops
  over the columns of each block of 128 and a lazy update per block;
- ``torch``: the same algorithm written tight (no losses, no quantizer object): a stricter baseline.

Reported: wall time (median of ``--repeats`` after one warm-up; lowbit's first call, which
compiles, separately), the speedups, the output error ``||(W - Q) X^T|| / ||W X^T||`` of each on
held-out inputs (a faster but wrong implementation cannot hide) and, with ``--memory``, the peak
memory of one call of each, measured in a fresh process (peak RSS minus the RSS before the call).

**Whole model** (``--model NAME``): lowbit's layer-sequential GPTQ (``lowbit.calib.driver``) vs
the reference's ``llama_sequential`` pipeline in PyTorch + transformers (a Catcher for the first
block's inputs, forward hooks accumulating ``H``, one window per forward as the reference, all
linears of a block from one capture, the block rerun on the quantized weights), on the same token
ids and the same float weights, each in its own process (time, and peak RSS above the loaded model);
both quantized models are evaluated as dequantized float weights by the same lowbit perplexity code
on the same evaluation windows.

    python experiments/bench_gptq.py --shapes 1024 4096 8192 4096x14336 14336x4096 --out results/bench_gptq
    python experiments/bench_gptq.py --model smollm2-135m --nsamples 128 --seqlen 512 --out results/bench_gptq_model
    git worktree add /tmp/before REV && python experiments/bench_gptq.py --shapes 4096 --baseline /tmp/before

``--baseline DIR`` times lowbit against the GPTQ of another lowbit checkout (before/after of a change).

Writes ``results.json`` and ``results.csv`` and prints a table. Needs torch (``pip install -e .[torch]``).
Run it on an otherwise idle machine: torch's OpenMP threads spin while waiting, and a busy machine
slows the PyTorch loops far more than jitted code (see ../shared/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

from lowbit.io.records import proc_status_mib, reset_peak_rss


def torch_gptq(W, H, bits: int, groupsize: int, blocksize: int = 128, percdamp: float = 0.01):
    """Straightforward PyTorch GPTQ (asymmetric min/max groups), returns the dequantized weight."""
    import torch

    W = W.clone().float()
    H = H.clone().float()
    cols = W.shape[1]
    maxq = 2**bits - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)

    def params(block):
        lo = torch.clamp(block.min(dim=1).values, max=0)
        hi = torch.clamp(block.max(dim=1).values, min=0)
        degenerate = (lo == 0) & (hi == 0)
        lo[degenerate], hi[degenerate] = -1, 1
        scale = (hi - lo) / maxq
        return scale, torch.round(-lo / scale)

    scale = zero = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % groupsize == 0:
                scale, zero = params(W1[:, i:i + groupsize])
            w = W1[:, i]
            q = (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero) * scale
            Q[:, i1 + i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


class _RefQuantizer:
    """The reference's per-channel asymmetric min/max quantizer object (quant.py's ``Quantizer``
    with ``perchannel=True, sym=False, mse=False``): ``find_params`` on a ``(rows, g)`` slice sets
    ``scale``/``zero`` of shape ``(rows, 1)``."""

    def __init__(self, bits: int):
        import torch

        self.maxq = torch.tensor(2**bits - 1)

    def find_params(self, x):
        import torch

        x = x.flatten(1)
        tmp = torch.zeros(x.shape[0], device=x.device)
        xmin = torch.minimum(x.min(1)[0], tmp)
        xmax = torch.maximum(x.max(1)[0], tmp)
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp] = -1
        xmax[tmp] = +1
        self.scale = ((xmax - xmin) / self.maxq).reshape(-1, 1)
        self.zero = torch.round(-xmin / self.scale.flatten()).reshape(-1, 1)

    def quantize(self, x):
        import torch

        q = torch.clamp(torch.round(x / self.scale) + self.zero, 0, self.maxq)
        return self.scale * (q - self.zero)


def torch_gptq_reference(W, H, bits: int, groupsize: int, blocksize: int = 128, percdamp: float = 0.01,
                         consume_h: bool = False):
    """The IST-DASLab reference's ``GPTQ.fasterquant`` structure (no act-order, dynamic groups):
    dead columns zeroed, the inverse Hessian's upper Cholesky factor from cholesky /
    cholesky_inverse / cholesky, and per block of ``blocksize`` columns a Python loop over the
    columns with the quantizer refit on ``W`` at every group start, the per-column losses kept, and
    one lazy update of the later columns. ``consume_h``: factor ``H`` in place (the reference
    consumes its accumulated Hessian); otherwise work on a copy. Returns ``(Q, losses)``."""
    import torch

    W = W.clone().float()
    H = H.float() if consume_h else H.clone().float()
    cols = W.shape[1]
    quantizer = _RefQuantizer(bits)
    quantizer.find_params(W)   # the reference fits the whole matrix first (refit at every group start)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Losses = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(cols)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if (i1 + i) % groupsize == 0:
                quantizer.find_params(W[:, (i1 + i):(i1 + i + groupsize)])
            q = quantizer.quantize(w.unsqueeze(1)).flatten()
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d ** 2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q, Losses


def parse_shape(text: str) -> tuple[int, int]:
    """``"4096"`` -> (4096, 4096); ``"4096x14336"`` -> (rows=out, cols=in) = (4096, 14336)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise SystemExit(f"--shapes {text!r}: expected N or ROWSxCOLS (out x in features), e.g. 4096x14336")
    return parts[0], parts[1]


def make_problem(rows: int, cols: int, path: str, tokens: int = 4096, seed: int = 0):
    """Correlated heavy-tailed inputs -> H = 2/N X^T X (cols x cols); W ~ N(0, 1) (rows x cols).
    Saved once, reused by every implementation (and by the memory subprocesses)."""
    if os.path.exists(path):
        d = np.load(path)
        return d["W"], d["H"], d["X"]
    rng = np.random.default_rng(seed)
    Z = rng.standard_t(3.0, size=(tokens, max(cols // 8, 1))).astype(np.float32)
    Xfull = Z @ rng.standard_normal((Z.shape[1], cols)).astype(np.float32)
    Xfull += 0.2 * rng.standard_normal((tokens, cols)).astype(np.float32)
    H = ((2.0 / tokens) * Xfull.T @ Xfull).astype(np.float32)
    X = Xfull[:1024]  # kept for the output-error check only
    W = rng.standard_normal((rows, cols)).astype(np.float32)
    tmp = path + ".tmp.npz"
    np.savez(tmp, W=W, H=H, X=X)
    os.replace(tmp, path)
    return W, H, X


def _rel_out_err(W, Q, X):
    return float(np.linalg.norm((W - Q) @ X.T) / np.linalg.norm(W @ X.T))


def _threads() -> int:
    """The CPUs this process may run on (physical + logical within its affinity mask)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _rss_mib() -> float:
    return proc_status_mib("VmRSS")


def _peak_rss_mib() -> float:
    """This process's peak RSS (``VmHWM``, reset by :func:`reset_peak_rss`)."""
    return proc_status_mib("VmHWM")


def _lowbit_spec(bits: int, group_size: int):
    """lowbit's quantizer matching the PyTorch ones: asymmetric min/max groups, float32 scales, and a
    shorter last group where the group size does not divide the columns (SmolLM2's 576 inputs)."""
    from lowbit import QuantSpec

    return QuantSpec(bits=bits, group_size=group_size, scale_dtype="float32", partial_groups=True)


def _check_group_size(g: int) -> int:
    if g <= 0 or 128 % g:
        raise SystemExit(f"--group-size {g}: expected a divisor of the block size 128 (e.g. 32, 64, 128): the "
                         "PyTorch implementations fit a group's parameters inside one block")
    return g


def _implementations(bits: int, group_size: int):
    """name -> fn(W_np, H_np) returning the dequantized weight (numpy), each timed to its result."""
    import jax
    import torch

    from lowbit import dequantize
    from lowbit.methods.gptq import quantize_weight

    spec = _lowbit_spec(bits, group_size)

    def run_lowbit(W, H):
        q = quantize_weight(W, H, spec).q
        jax.block_until_ready(q.data)   # timed up to the packed QuantizedTensor
        return q

    return {
        "lowbit": (run_lowbit, lambda q: np.asarray(dequantize(q))),
        "torch_ref": (lambda W, H: torch_gptq_reference(torch.from_numpy(W), torch.from_numpy(H), bits, group_size)[0],
                      lambda q: q.numpy()),
        "torch": (lambda W, H: torch_gptq(torch.from_numpy(W), torch.from_numpy(H), bits, group_size),
                  lambda q: q.numpy()),
    }


def one_call_memory(impl: str, problem: str, bits: int, group_size: int) -> dict:
    """Run ``impl`` once on the saved problem in this (fresh) process: peak RSS above the RSS after
    imports and loading, for the first call (lowbit compiles) and for a warm one (``--one``)."""
    import torch

    torch.set_num_threads(_threads())
    d = np.load(problem)
    W, H = d["W"], d["H"]
    fn, _ = _implementations(bits, group_size)[impl]
    reset_peak_rss()
    base = _rss_mib()
    fn(W, H)   # first call: lowbit compiles here
    first = _peak_rss_mib() - base
    out = {"impl": impl, "rss_before_mib": base, "first_call_peak_above_mib": first}
    if not reset_peak_rss():   # then a warm call
        return {**out, "peak_above_mib": first}
    base = _rss_mib()
    fn(W, H)
    return {**out, "peak_above_mib": _peak_rss_mib() - base}


def _interleaved(fns: dict, args: tuple, repeats: int) -> tuple[dict, dict]:
    """Time every ``fn(*args)`` ``repeats`` times, interleaved so machine noise hits every
    implementation alike, each call after a 0.5 s pause (so the previous implementation's spinning
    worker threads have gone to sleep). Returns ``(name -> seconds list, name -> last output)``."""
    times, outs = {k: [] for k in fns}, {}
    for _ in range(repeats):
        for k, fn in fns.items():
            time.sleep(0.5)
            t0 = time.perf_counter()
            outs[k] = fn(*args)
            times[k].append(time.perf_counter() - t0)
    return times, outs


def bench_layers(args) -> list[dict]:
    import subprocess

    import torch

    torch.set_num_threads(_threads())
    impls = _implementations(args.bits, args.group_size)
    rows = []
    for text in args.shapes:
        r_, c_ = parse_shape(text)
        problem = os.path.join(args.out, f"problem_{r_}x{c_}.npz")
        W, H, X = make_problem(r_, c_, problem)
        t0 = time.perf_counter()
        impls["lowbit"][0](W, H)
        first = time.perf_counter() - t0
        impls["torch_ref"][0](W[:64], H)   # warm-up (allocator, kernels)
        impls["torch"][0](W[:64], H)
        times, outs = _interleaved({k: fn for k, (fn, _) in impls.items()}, (W, H), args.repeats)
        row = dict(rows=r_, cols=c_, bits=args.bits, group_size=args.group_size, lowbit_first_call_s=first)
        for k, ts in times.items():
            row.update({f"{k}_s": statistics.median(ts), f"{k}_min_s": min(ts), f"{k}_max_s": max(ts)})
        row["speedup_vs_ref"] = row["torch_ref_s"] / row["lowbit_s"]
        row["speedup_vs_torch"] = row["torch_s"] / row["lowbit_s"]
        for k, (_, to_np) in impls.items():
            row[f"{k}_rel_out_err"] = _rel_out_err(W, to_np(outs[k]), X)
        if args.memory:
            for k in impls:
                res = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", k, "--problem", problem,
                                      "--bits", str(args.bits), "--group-size", str(args.group_size)],
                                     check=True, capture_output=True, text=True)
                m = json.loads(res.stdout.strip().splitlines()[-1])
                row[f"{k}_peak_mib"] = m["peak_above_mib"]
                if k == "lowbit":
                    row["lowbit_first_call_peak_mib"] = m["first_call_peak_above_mib"]
        rows.append(row)
        print(f"{r_}x{c_}: lowbit {row['lowbit_s']:.3f}s (first call {first:.2f}s) | reference {row['torch_ref_s']:.3f}s "
              f"({row['speedup_vs_ref']:.2f}x) | tight torch {row['torch_s']:.3f}s ({row['speedup_vs_torch']:.2f}x) | "
              f"rel. output error {row['lowbit_rel_out_err']:.4f} / {row['torch_ref_rel_out_err']:.4f} / "
              f"{row['torch_rel_out_err']:.4f}", flush=True)
    return rows


def _gptq_module_from(checkout: str):
    """The GPTQ core of another lowbit checkout (e.g. ``git worktree add /tmp/before REV``):
    ``lowbit/methods/gptq_core.py``, or ``gptq.py`` in checkouts from before the core had a module of its
    own; loaded as a separate module next to this one (its own helpers from this checkout's lowbit)."""
    import importlib.util

    from lowbit.methods import registry

    paths = [os.path.join(checkout, "lowbit", "methods", f) for f in ("gptq_core.py", "gptq.py")]
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path is None:
        raise SystemExit(f"--baseline {checkout}: no lowbit/methods/gptq_core.py or gptq.py there (expected a lowbit "
                         "checkout)")
    spec = importlib.util.spec_from_file_location("lowbit_baseline_gptq", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses look their module up there
    register = registry.register
    registry.register = lambda *a, **k: (lambda f: f)   # the baseline must not replace the registered "gptq"
    try:
        spec.loader.exec_module(mod)
    finally:
        registry.register = register
    return mod


def bench_baseline(args) -> list[dict]:
    """lowbit's GPTQ vs the same function from an earlier checkout (``--baseline DIR``), on the same
    saved problems, interleaved in one process: the before/after of a change to the core, with no
    PyTorch in the loop. Also the share of packed code words that are identical."""
    import jax

    from lowbit.methods.gptq import quantize_weight

    before = _gptq_module_from(args.baseline).quantize_weight
    spec = _lowbit_spec(args.bits, args.group_size)
    rows = []
    for text in args.shapes:
        r_, c_ = parse_shape(text)
        W, H, _ = make_problem(r_, c_, os.path.join(args.out, f"problem_{r_}x{c_}.npz"))
        fns = {name: (lambda W, H, f=f: jax.block_until_ready(f(W, H, spec).q))
               for name, f in (("baseline", before), ("lowbit", quantize_weight))}
        first = {}
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(W, H)
            first[k] = time.perf_counter() - t0
        times, outs = _interleaved(fns, (W, H), args.repeats)
        row = dict(rows=r_, cols=c_, bits=args.bits, group_size=args.group_size,
                   baseline_s=statistics.median(times["baseline"]), lowbit_s=statistics.median(times["lowbit"]),
                   baseline_first_call_s=first["baseline"], lowbit_first_call_s=first["lowbit"])
        row["speedup"] = row["baseline_s"] / row["lowbit_s"]
        row["packed_words_equal"] = float(np.mean(np.asarray(outs["lowbit"].data) == np.asarray(outs["baseline"].data)))
        rows.append(row)
        print(f"{r_}x{c_}: baseline {row['baseline_s']:.3f}s | lowbit {row['lowbit_s']:.3f}s ({row['speedup']:.2f}x) | "
              f"first calls {first['baseline']:.2f} / {first['lowbit']:.2f}s | packed words equal {row['packed_words_equal']:.4f}",
              flush=True)
    return rows


# ----------------------------------------------------------------------------- whole model


def _prepare_model(args) -> dict:
    """Load the model once with lowbit: calibration windows (token ids, as lowbit run would draw
    them, saved for both pipelines), evaluation windows, and an HF-layout float32 copy of the weights
    for the PyTorch pipeline. Returns the paths and the loaded ``params``, ``cfg`` and ``eval``
    windows (kept to evaluate both pipelines' results without loading the model again)."""
    from safetensors.numpy import save_file

    from lowbit import data
    from lowbit.core.transforms import flatten
    from lowbit.eval.likelihood import make_windows
    from lowbit.io.export import _hf_name, hf_config
    from lowbit.models.loaders import load_model
    from lowbit.pipeline import CalibCfg
    from lowbit.pipeline import calibration_data

    params, cfg, tok = load_model(args.model)
    calib = CalibCfg(data=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size)
    windows, _ = calibration_data(calib, params, cfg, tok, args.seed, progress=False)
    ev = make_windows(np.asarray(tok.encode(data.corpus_text(args.eval, "eval")), np.int32), args.eval_seqlen,
                      args.eval_windows)
    prep = os.path.join(args.out, "prep")
    hf = os.path.join(prep, "hf")
    os.makedirs(hf, exist_ok=True)
    tensors = {}
    for p, v in flatten(params).items():
        suffix = "bias" if p.endswith("_bias") else "weight"
        tensors[f"{_hf_name(p)}.{suffix}"] = np.ascontiguousarray(np.asarray(v, np.float32))
    save_file(tensors, os.path.join(hf, "model.safetensors"), metadata={"format": "pt"})
    conf = {**hf_config(cfg), "torch_dtype": "float32", "use_cache": False}
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump(conf, f, indent=2)
    np.save(os.path.join(prep, "calib.npy"), np.asarray(windows, np.int64))
    return {"hf": hf, "calib": os.path.join(prep, "calib.npy"), "params": params, "cfg": cfg, "eval": ev}


def torch_pipeline(hf_dir: str, calib_path: str, out_path: str, bits: int, group_size: int) -> dict:
    """The reference's ``llama_sequential`` (IST-DASLab/gptq llama.py), without true-sequential:
    capture block 0's inputs with a Catcher, then per block: hooks on every linear accumulate
    ``H`` (the reference's ``add_batch``: running mean of ``2 x x^T`` over sequences) while the
    block runs one window at a time, every linear is quantized by :func:`torch_gptq_reference`,
    and the block reruns on its quantized weights to give the next block's inputs. Saves the
    quantized linears (``out_path``, safetensors) and returns the timings."""
    import math

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(_threads())
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    load_s = time.perf_counter() - t0
    toks = torch.from_numpy(np.load(calib_path))
    reset_peak_rss()
    rss_before = _rss_mib()
    t_start = time.perf_counter()
    n, T = toks.shape
    layers = model.model.layers
    inps = torch.zeros((n, T, model.config.hidden_size), dtype=torch.float32)
    cache = {"i": 0, "kw": None}

    class Catcher(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.attention_type = getattr(module, "attention_type", "full_attention")

        def forward(self, inp, *args, **kwargs):
            inps[cache["i"]] = inp[0]
            cache["i"] += 1
            cache["kw"] = kwargs
            raise ValueError

    timings = {"capture_s": 0.0, "stats_s": 0.0, "gptq_s": 0.0, "rerun_s": 0.0}
    with torch.no_grad():
        t0 = time.perf_counter()
        layers[0] = Catcher(layers[0])
        for j in range(n):
            try:
                model(toks[j:j + 1])
            except ValueError:
                pass
        layers[0] = layers[0].module
        if cache["i"] != n:
            raise RuntimeError(f"captured {cache['i']} of {n} windows' block-0 inputs (the model raised before block 0?)")
        kw = {k: v for k, v in cache["kw"].items()
              if k not in ("cache", "past_key_values", "past_key_value", "use_cache")}
        timings["capture_s"] = time.perf_counter() - t0

        def run(layer, x):
            y = layer(x.unsqueeze(0), **kw)
            return (y[0] if isinstance(y, tuple) else y)[0]

        outs = torch.zeros_like(inps)
        quantized = {}
        for i, layer in enumerate(layers):
            linears = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
            stats = {name: [torch.zeros((m.in_features, m.in_features)), 0] for name, m in linears.items()}

            def hook(name):
                def add_batch(_, inp, out):
                    x = inp[0].data
                    s = stats[name]
                    tmp = x.shape[0] if x.dim() == 3 else 1
                    x = x.reshape(-1, x.shape[-1]).t().float()
                    s[0] *= s[1] / (s[1] + tmp)
                    s[1] += tmp
                    x = math.sqrt(2 / s[1]) * x
                    s[0] += x.matmul(x.t())
                return add_batch

            t0 = time.perf_counter()
            handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
            for j in range(n):
                outs[j] = run(layer, inps[j])
            for h in handles:
                h.remove()
            timings["stats_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            for name, m in linears.items():
                q, _ = torch_gptq_reference(m.weight.data, stats.pop(name)[0], bits, group_size, consume_h=True)
                m.weight.data = q.to(m.weight.dtype)
                quantized[f"layers/{i}/{name.replace('.', '/')}"] = q.contiguous()
            timings["gptq_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            for j in range(n):
                outs[j] = run(layer, inps[j])
            timings["rerun_s"] += time.perf_counter() - t0
            inps, outs = outs, inps
    total = time.perf_counter() - t_start
    peak = _peak_rss_mib() - rss_before
    save_file(quantized, out_path)
    return {"impl": "torch", "seconds": total, "load_s": load_s, **timings, "peak_above_mib": peak,
            "rss_before_mib": rss_before}


def lowbit_pipeline(model: str, calib_path: str, q_path: str, bits: int, group_size: int,
                    batch_size: int) -> dict:
    """lowbit's layer-sequential GPTQ on the same windows (all linears of a block from one capture,
    as the PyTorch pipeline; dead columns zeroed and float32 scales, as the reference), timed from
    the loaded model. Saves the dequantized linears (``q_path``) for the same evaluation as the
    PyTorch pipeline's."""
    import jax

    from safetensors.numpy import save_file

    from lowbit import dequantize
    from lowbit.calib.driver import default_recipe, quantize_model
    from lowbit.core.qtensor import QuantizedTensor
    from lowbit.core.transforms import flatten
    from lowbit.methods.gptq import gptq
    from lowbit.models.loaders import load_model

    t0 = time.perf_counter()
    params, cfg, _ = load_model(model)
    jax.block_until_ready(jax.tree.leaves(params))
    load_s = time.perf_counter() - t0
    windows = np.load(calib_path).astype(np.int32)
    reset_peak_rss()
    rss_before = _rss_mib()
    t_start = time.perf_counter()
    recipe = default_recipe(gptq(_lowbit_spec(bits, group_size), zero_dead=True))
    qp, rows = quantize_model(params, cfg, recipe, windows, batch_size=batch_size, true_sequential=False,
                              progress=False)
    jax.block_until_ready(jax.tree.leaves(qp))
    total = time.perf_counter() - t_start
    peak = _peak_rss_mib() - rss_before
    layer_s = [r["layer_seconds"] for r in rows if "layer_seconds" in r]
    flat = flatten(qp)
    save_file({p: np.ascontiguousarray(np.asarray(dequantize(v), np.float32)) for p, v in flat.items()
               if isinstance(v, QuantizedTensor)}, q_path)
    return {"impl": "lowbit", "seconds": total, "load_s": load_s, "first_layer_s": layer_s[0] if layer_s else None,
            "median_layer_s": statistics.median(layer_s) if layer_s else None, "peak_above_mib": peak,
            "rss_before_mib": rss_before}


def _quantized_model_ppl(params, cfg, q_path: str, ev: np.ndarray) -> float:
    """Perplexity of a pipeline's dequantized linears (``q_path``) in the float model ``params``, by
    lowbit's evaluation on windows ``ev``: both pipelines' results through the same code."""
    from safetensors.numpy import load_file

    from lowbit.core.transforms import flatten, unflatten
    from lowbit.eval.likelihood import perplexity

    q = load_file(q_path)
    flat = flatten(params)
    missing = sorted(set(p for p in flat if p.startswith("layers/") and p.endswith("_proj")) - set(q))
    if missing:
        raise RuntimeError(f"{q_path}: the pipeline did not quantize {missing[:4]}")
    params = unflatten(params, {**flat, **{p: np.asarray(v, np.float32) for p, v in q.items()}})
    return perplexity(params, cfg, ev, seqlen=ev.shape[1], batch_size=1, progress=False)["ppl"]


def bench_model(args) -> list[dict]:
    import subprocess

    prep = _prepare_model(args)
    me = os.path.abspath(__file__)
    common = ["--bits", str(args.bits), "--group-size", str(args.group_size)]
    res = {}
    q = {impl: os.path.join(args.out, "prep", f"{impl}_q.safetensors") for impl in ("lowbit", "torch")}
    for impl in ("lowbit", "torch"):   # each in a fresh process: its own peak RSS, no thread interference
        cmd = [sys.executable, me, "--pipeline", impl, "--model", args.model, "--hf", prep["hf"],
               "--calib-ids", prep["calib"], "--batch-size", str(args.batch_size),
               "--q-out", q[impl]] + common
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{impl}: {res[impl]['seconds']:.1f} s, peak RSS {res[impl]['peak_above_mib']:.0f} MiB above the model", flush=True)
    for impl in ("lowbit", "torch"):
        res[impl]["ppl"] = _quantized_model_ppl(prep["params"], prep["cfg"], q[impl], prep["eval"])
    n, T = np.load(prep["calib"]).shape
    ev = prep["eval"]
    row = dict(model=args.model, bits=args.bits, group_size=args.group_size, calib=f"{n}x{T}",
               eval=f"{args.eval} {ev.shape[0]}x{ev.shape[1]}",
               lowbit_s=res["lowbit"]["seconds"], torch_s=res["torch"]["seconds"],
               speedup=res["torch"]["seconds"] / res["lowbit"]["seconds"],
               lowbit_load_s=res["lowbit"]["load_s"], torch_load_s=res["torch"]["load_s"],
               lowbit_first_layer_s=res["lowbit"]["first_layer_s"], lowbit_median_layer_s=res["lowbit"]["median_layer_s"],
               torch_gptq_s=res["torch"]["gptq_s"], torch_forward_s=res["torch"]["stats_s"] + res["torch"]["rerun_s"]
               + res["torch"]["capture_s"],
               lowbit_peak_mib=res["lowbit"]["peak_above_mib"], torch_peak_mib=res["torch"]["peak_above_mib"],
               lowbit_ppl=res["lowbit"]["ppl"], torch_ppl=res["torch"]["ppl"],
               ppl_rel_diff=res["lowbit"]["ppl"] / res["torch"]["ppl"] - 1.0)
    return [row]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["1024", "4096"],
                    help="per-layer problems: N (square) or ROWSxCOLS (out x in features)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="square sizes (same as --shapes N ...)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                    help="per layer: also the peak memory of one call of each, in a fresh process")
    ap.add_argument("--model", default=None, help="whole-model mode: lowbit vs the PyTorch pipeline on this model")
    ap.add_argument("--calib", default="brown")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8, help="lowbit's calibration batch (windows per forward)")
    ap.add_argument("--eval", default="brown")
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", metavar="DIR",
                    help="per layer: lowbit vs the GPTQ of another lowbit checkout DIR (e.g. a git worktree of "
                         "an earlier commit), no PyTorch")
    ap.add_argument("--out", default="results/bench_gptq")
    # internal: one measurement in a fresh process
    ap.add_argument("--one", choices=["lowbit", "torch_ref", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--problem", help=argparse.SUPPRESS)
    ap.add_argument("--pipeline", choices=["lowbit", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--hf", help=argparse.SUPPRESS)
    ap.add_argument("--calib-ids", help=argparse.SUPPRESS)
    ap.add_argument("--q-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.one:
        print(json.dumps(one_call_memory(args.one, args.problem, args.bits, args.group_size)))
        return
    if args.pipeline == "torch":
        print(json.dumps(torch_pipeline(args.hf, args.calib_ids, args.q_out, args.bits, args.group_size)))
        return
    if args.pipeline == "lowbit":
        print(json.dumps(lowbit_pipeline(args.model, args.calib_ids, args.q_out, args.bits,
                                         args.group_size, args.batch_size)))
        return
    if args.sizes:
        args.shapes = [str(n) for n in args.sizes]
    _check_group_size(args.group_size)

    import jax
    import torch

    os.makedirs(args.out, exist_ok=True)
    rows = bench_model(args) if args.model else bench_baseline(args) if args.baseline else bench_layers(args)
    meta = dict(jax=jax.__version__, torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                cores=_threads(), torch_threads=torch.get_num_threads(), device=str(jax.devices()[0]),
                load=os.getloadavg()[0],
                command="python experiments/bench_gptq.py " + " ".join(sys.argv[1:] if argv is None else argv))
    for name, obj in (("results.json", {"meta": meta, "rows": rows}),):
        tmp = os.path.join(args.out, name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, os.path.join(args.out, name))
    tmp = os.path.join(args.out, "results.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, os.path.join(args.out, "results.csv"))
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
