#!/usr/bin/env python3
"""Benchmark the packed low-bit Pallas matmul kernels (``kernels/``) on a GPU: device-side CUPTI
timing, weight copies beyond L2, baselines in the same run.

For each layer shape (K, N), batch M, bit width and group size it times, in the same process:
the kernel (``quant_matmul`` / ``onebit_matmul`` on GPU, ``quant_matmul_tpu`` on TPU), the bf16
baseline ``jnp.dot(x_bf16, w_bf16, preferred_element_type=f32)`` and the naive XLA path (unpack +
dequantize + dot from lowbit's own layout). Timing is on the device: CUPTI via
``jax.experimental.mosaic.gpu.profiler.measure`` when available (the sum of all kernels of one call,
including the split-K reduction), else host wall time of a jitted batch of calls (marked
``timer=host``). Every timed iteration runs the op once on each of ``copies`` distinct weight copies
(>= ~100 MB in total, so the 50 MB L2 never holds the weights); per-call time = iteration / copies.

Reported per row: median and spread (p10, p90) in microseconds, compile time (separately), max
error vs the float32 dequantized reference, speedup = t_bf16 / t_q, fraction of ideal
t_ideal / t_q with t_ideal = max(Bytes / BW, FLOPs / P) (BW 3.0 TB/s, P 790 TFLOP/s by default;
b_eff = b + 16/g (+16/g with zeros)). Writes ``results.json`` (rows + versions, device, command),
``results.csv``, ``speedup_vs_m.png``, ``frac_ideal_vs_m.png`` into ``--out`` and prints a short
table last. One failing config is recorded (``error`` column) and the run goes on; ``--budget-s``
caps the wall time (remaining configs are recorded as skipped).

Commands (from the repo root; lowbit need not be installed: see ``_bootstrap``)::

    python3 experiments/bench_kernels.py                       # full default set (~7 min on an H100)
    python3 experiments/bench_kernels.py --quick               # small subset (~2 min)
    python3 experiments/bench_kernels.py --interpret --quick   # CPU smoke test of the harness
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


if str(ROOT) not in sys.path:  # run from a checkout without an install: lowbit/kernels -> ../kernels
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lowbit.ops import kernel_format
from lowbit.core import numerics  # noqa: E402
from lowbit.kernels import compat  # noqa: E402
from lowbit.kernels import onebit_matmul as ob  # noqa: E402
from lowbit.kernels import quant_matmul as qm  # noqa: E402
from lowbit.kernels import quant_matmul_tpu as qt  # noqa: E402
from lowbit.core.pack import pack  # noqa: E402
from lowbit.core.qtensor import QuantizedTensor  # noqa: E402
from lowbit.core.quantizers import dequantize  # noqa: E402

LLAMA3_8B = {"8b.qkv": (4096, 6144), "8b.o": (4096, 4096), "8b.gate_up": (4096, 28672), "8b.down": (14336, 4096)}
LLAMA3_70B = {"70b.qkv": (8192, 10240), "70b.o": (8192, 8192), "70b.gate_up": (8192, 57344),
              "70b.down": (28672, 8192)}
SQUARES = {f"sq{s}": (s, s) for s in (4096, 8192, 16384, 32768)}
EXTRA = {"8b.up": (4096, 14336)}  # the 4096x14336 row measured for the naive-kernel baseline
ALL_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)


@dataclasses.dataclass(frozen=True)
class Case:
    sweep: str
    layer: str
    k: int
    n: int
    m: int
    bits: int
    group: int | None      # None: per output channel
    fmt: str = "int"       # int (asymmetric, with zeros) | nf4 | onebit
    autotune: bool = False
    naive: bool = True

    @property
    def wkey(self):
        return (self.k, self.n, self.bits, self.group, self.fmt)

    @property
    def label(self):
        g = "pc" if self.group is None else f"g{self.group}"
        return f"{self.fmt}-w{self.bits}-{g}"


def plan(args) -> list[Case]:
    """The ordered list of cases (priority order: the budget cuts the tail)."""
    cases: list[Case] = []
    if args.interpret:
        shapes = {"tiny.a": (512, 256), "tiny.b": (320, 200)}
        ms = (1, 7, 16)
        for layer, (k, n) in shapes.items():
            for m in ms:
                cases.append(Case("main", layer, k, n, m, 4, 64 if k % 64 == 0 else 32, autotune=args.autotune))
        for bits, fmt, g in ((1, "onebit", None), (2, "int", 32), (3, "int", 64), (8, "int", None), (4, "nf4", 64)):
            for m in (1, 16):
                cases.append(Case("bits", "tiny.a", 512, 256, m, bits, g, fmt))
        return _filter(cases, args)
    if args.quick:
        main = {"8b.up": EXTRA["8b.up"], "70b.o": LLAMA3_70B["70b.o"]}
        for layer, (k, n) in main.items():
            for m in (1, 16, 256):
                cases.append(Case("main", layer, k, n, m, 4, 128, autotune=args.autotune))
        for bits, fmt, g in ((1, "onebit", None), (2, "int", 128), (3, "int", 128), (8, "int", 128)):
            for m in (1, 16):
                cases.append(Case("bits", "70b.o", 8192, 8192, m, bits, g, fmt, naive=m == 1))
        cases.append(Case("format", "70b.o", 8192, 8192, 1, 4, 64, "nf4", naive=False))
        return _filter(cases, args)
    def main_sweep(shapes):
        for layer, (k, n) in shapes.items():
            for m in ALL_M:
                cases.append(Case("main", layer, k, n, m, 4, 128, autotune=args.autotune,
                                  naive=m in (1, 16, 256, 4096)))

    def bits_sweep(layers):
        for layer in layers:
            k, n = {**EXTRA, **LLAMA3_70B}[layer]
            for bits, fmt, g in ((1, "onebit", None), (2, "int", 128), (3, "int", 128), (8, "int", 128)):
                for m in (1, 16, 256, 4096):
                    cases.append(Case("bits", layer, k, n, m, bits, g, fmt, naive=m == 1))

    # priority order: the time budget cuts the tail
    main_sweep(LLAMA3_8B)
    bits_sweep(("8b.up", "70b.o"))
    main_sweep(LLAMA3_70B)
    for g in (32, 64, None):
        for m in (1, 16, 256):
            cases.append(Case("groups", "70b.o", 8192, 8192, m, 4, g, naive=False))
    for layer in ("8b.up", "70b.o"):
        k, n = {**EXTRA, **LLAMA3_70B}[layer]
        for m in (1, 16, 256):
            cases.append(Case("format", layer, k, n, m, 4, 64, "nf4", naive=False))
    bits_sweep(("70b.gate_up",))
    for layer, (k, n) in SQUARES.items():
        for m in (1, 16, 256):
            cases.append(Case("squares", layer, k, n, m, 4, 128, naive=False))
    return _filter(cases, args)


def _filter(cases, args):
    out = []
    for c in cases:
        if args.bits and c.bits not in args.bits:
            continue
        if args.m and c.m not in args.m:
            continue
        if args.sweeps and c.sweep not in args.sweeps:
            continue
        out.append(c)
    return out


# ----------------------------------------------------------------------------- operands

def random_qtensor(key, n: int, k: int, bits: int, group: int | None, fmt: str) -> QuantizedTensor:
    """A random QuantizedTensor in lowbit's layout (random codes; quantizing real weights is not
    needed to time a kernel, and OneBit's SVD would take minutes at 70B shapes)."""
    kc, ks, kz, kb = jax.random.split(key, 4)
    codes = jax.random.randint(kc, (n, k), 0, 2**bits, dtype=jnp.int32).astype(jnp.uint8)
    g = k if group is None else group
    n_groups = k // g
    scales = (jax.random.uniform(ks, (n, n_groups), jnp.float32, 0.5, 1.5) * 0.02).astype(jnp.float16)
    meta = dict(shape=(n, k), bits=bits, group_size=g)
    if fmt == "onebit":
        b = jax.random.uniform(kb, (k,), jnp.float32, 0.5, 1.5).astype(jnp.float16)
        return QuantizedTensor(data=pack(codes, 1), scales=scales, col_scale=b, format="onebit", **meta)
    if fmt == "nf4":
        return QuantizedTensor(data=pack(codes, bits), scales=scales, format="nf4", levels=numerics.NF4_LEVELS,
                               **meta)
    zeros = jax.random.randint(kz, (n, n_groups), 0, 2**bits, dtype=jnp.int32).astype(jnp.uint8)
    return QuantizedTensor(data=pack(codes, bits), scales=scales, zeros=pack(zeros, bits), format="int", **meta)


def copies_for(nbytes: int, args) -> int:
    if args.copies:
        return args.copies
    return int(min(args.max_copies, max(1, math.ceil(args.rotate_mb * 2**20 / max(nbytes, 1)))))


def _copy(tree):
    return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree)


def tree_nbytes(tree) -> int:
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------- timing

class Timer:
    """CUPTI timing (``profiler.measure``) when it works, else host wall time of jitted batches."""

    def __init__(self, force_host: bool):
        self.kind = "host"
        self._measure = None
        if not force_host and compat.default_backend() == "gpu":
            try:
                from jax.experimental.mosaic.gpu import profiler

                self._measure = profiler.measure
                self.kind = "cupti"
            except Exception as e:  # pragma: no cover
                print(f"[bench] CUPTI profiler unavailable ({e}); host timing", file=sys.stderr)

    def compile(self, fn, x, ws):
        """Jit + compile ``x, ws -> tuple(fn(x, w) for w in ws)``; returns (compiled, seconds)."""
        lowered = jax.jit(lambda x, ws: tuple(fn(x, w) for w in ws)).lower(x, ws)
        t0 = time.perf_counter()
        compiled = lowered.compile()
        return compiled, time.perf_counter() - t0

    def time_compiled(self, compiled, x, ws, reps: int) -> list[float]:
        """Per-call microseconds (one sample per iteration; an iteration calls fn on every copy)."""
        if self._measure is not None:
            try:
                _, times = self._measure(compiled, iterations=reps)(x, ws)
                if times is not None:
                    times = times if isinstance(times, list) else [times]
                    return [t * 1e3 / len(ws) for t in times]
            except Exception as e:  # pragma: no cover
                print(f"[bench] CUPTI measure failed ({type(e).__name__}: {e}); host timing from now on",
                      file=sys.stderr)
                self._measure, self.kind = None, "host"
        jax.block_until_ready(compiled(x, ws))
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(x, ws))
            out.append((time.perf_counter() - t0) * 1e6 / len(ws))
        return out

    def time_calls(self, fn, x, ws, reps: int) -> tuple[list[float], float]:
        compiled, secs = self.compile(fn, x, ws)
        return self.time_compiled(compiled, x, ws, reps), secs


def summarize(ts):
    a = np.asarray(ts, np.float64)
    return float(np.median(a)), float(np.percentile(a, 10)), float(np.percentile(a, 90))


# ----------------------------------------------------------------------------- ideal times

def b_eff(c: Case) -> float:
    if c.fmt == "onebit":
        return 1.0 + 16.0 * (c.k + c.n) / (c.k * c.n)
    g = c.k if c.group is None else c.group
    return c.bits + 16.0 / g * (2 if c.fmt == "int" else 1)


def ideal_us(c: Case, bits_per_weight: float, args) -> float:
    nbytes = c.k * c.n * bits_per_weight / 8 + 2 * c.m * c.k + 2 * c.m * c.n
    flops = 2.0 * c.m * c.n * c.k
    return max(nbytes / (args.bw_tbs * 1e12), flops / (args.peak_tflops * 1e12)) * 1e6


# ----------------------------------------------------------------------------- kernels

def kernel_fn(c: Case, kw, target: str, interpret: bool):
    """(call(x, kw, bs), candidates(m)) for this case."""
    if target == "tpu":
        def call(x, w, bs=None):
            return qt.quant_matmul_tpu(x, w, block_sizes=bs, interpret=interpret)
        return call, [None]
    mod = ob if c.fmt == "onebit" else qm
    fn = mod.onebit_matmul if c.fmt == "onebit" else qm.quant_matmul

    def call(x, w, bs=None):
        return fn(x, w, block_sizes=bs, interpret=interpret)

    return call, gpu_candidates(c.m, kw)


def _split(m, w, bm, bn):
    return qm.default_split_k(m, w, bm, bn)


def gpu_candidates(m: int, w) -> list:
    """The heuristic default first, then one alternative per M class (autotuning compiles both)."""
    B = qm.BlockSizes
    d = B.get_default(m, w)
    if m <= 2:    # FMA (GEMV) path vs tensor cores with 16 padded rows
        alt = B(block_m=16, block_n=128, split_k=_split(m, w, 16, 128))
    elif m <= 16:  # narrower N tiles: more programs, less split-K
        alt = B(block_m=16, block_n=64, split_k=_split(m, w, 16, 64), num_stages=4)
    elif m <= 128:
        bm = min(64, d.block_m)
        alt = B(block_m=bm, block_n=64, split_k=_split(m, w, bm, 64), num_stages=4)
    else:
        alt = B(block_m=128, block_n=256, split_k=1, num_warps=8, num_stages=3)
    return [d] if alt == d else [d, alt]


def m_class(m: int) -> str:
    return "fma" if m <= 2 else "small" if m <= 16 else "mid" if m <= 128 else "large"


# ----------------------------------------------------------------------------- run

def bs_str(bs) -> str:
    if bs is None:
        return "default"
    return ",".join(f"{f.name}={getattr(bs, f.name)}" for f in dataclasses.fields(bs))


def run(args):
    target = "tpu" if (args.target == "tpu" or (args.target == "auto" and compat.default_backend() == "tpu")) \
        else "gpu"
    interpret = args.interpret
    if not interpret and compat.default_backend() not in ("gpu", "tpu"):
        sys.exit("[bench] no GPU/TPU backend: use --interpret (CPU smoke test)")
    compat.silence_triton_deprecation()
    timer = Timer(force_host=args.host_timer or interpret)
    cases = plan(args)
    print(f"[bench] {len(cases)} cases, target={target}, interpret={interpret}, timer={timer.kind}, "
          f"device={jax.devices()[0].device_kind}, budget={args.budget_s}s", flush=True)
    rows = []
    t_start = time.perf_counter()
    key = jax.random.key(args.seed)
    bf16_cache: dict = {}
    winners: dict = {}
    cur_wkey, ops = None, None
    for i, c in enumerate(cases):
        row = dict(dataclasses.asdict(c), label=c.label + (f"-r{args.tile_rows}" if args.tile_rows != 16 else ""),
               b_eff=b_eff(c), tile_rows=args.tile_rows, timer=timer.kind, error="")
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            row["error"] = "skipped (budget)"
            rows.append(row)
            continue
        try:
            if c.wkey != cur_wkey:
                ops = None
                cur_wkey = None
                ops = build_operands(c, key, args, target)
                cur_wkey = c.wkey
            run_case(c, row, ops, args, target, interpret, timer, bf16_cache, winners)
        except Exception as e:  # one failing config must not kill the run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            if args.verbose:
                traceback.print_exc()
        rows.append(row)
        print(fmt_progress(i, len(cases), row, time.perf_counter() - t_start), flush=True)
    return rows, timer.kind, target


def build_operands(c: Case, key, args, target):
    key = jax.random.fold_in(key, hash(c.wkey) % (2**31))
    q = random_qtensor(key, c.n, c.k, c.bits, c.group, c.fmt)
    kw = kernel_format.to_kernel_layout(q, scale_dtype=jnp.float32 if target == "tpu" else None,
                                        tile_rows=args.tile_rows)
    kw = jax.block_until_ready(kw)
    n_kw = copies_for(tree_nbytes(kw), args)
    kws = [kw] + [_copy(kw) for _ in range(n_kw - 1)]
    return dict(q=q, kws=kws, qs=None)


def run_case(c: Case, row, ops, args, target, interpret, timer, bf16_cache, winners):
    kws = ops["kws"]
    kw = kws[0]
    x = (jax.random.normal(jax.random.key(c.m), (c.m, c.k), jnp.float32) + 0.1).astype(jnp.bfloat16)
    call, cands = kernel_fn(c, kw, target, interpret)
    reps = args.reps
    row["copies"] = len(kws)
    row["weight_mb"] = round(tree_nbytes(kw) / 2**20, 2)

    # -- kernel: autotune over a few configs (winner reused within the same M class), then time
    wkey = (c.wkey, m_class(c.m))
    compiled = {}
    if c.autotune and wkey not in winners and len(cands) > 1:
        best = None
        for bs in cands:
            try:
                comp, secs = timer.compile(lambda x, w, bs=bs: call(x, w, bs), x, kws)
                t = summarize(timer.time_compiled(comp, x, kws, args.tune_reps))[0]
                compiled[bs] = (comp, secs)
            except Exception as e:
                if args.verbose:
                    print(f"[bench]   candidate {bs_str(bs)} failed: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            if best is None or t < best[0]:
                best = (t, bs)
        if best is not None:
            winners[wkey] = best[1]
        row["tuned_over"] = len(cands)
    bs = winners.get(wkey, cands[0]) if c.autotune else cands[0]
    comp, secs = compiled.get(bs) or timer.compile(lambda x, w: call(x, w, bs), x, kws)
    row["block_sizes"] = bs_str(qm.resolve_block_sizes(c.m, kw, bs) if target == "gpu" else bs)
    row["compile_s"] = round(secs, 3)
    t_q = summarize(timer.time_compiled(comp, x, kws, reps))
    row["t_q_us"], row["t_q_p10_us"], row["t_q_p90_us"] = t_q

    # -- error vs the float32 dequantized reference
    y = comp(x, kws)[0].astype(jnp.float32)
    max_err, rel_err = _errors(y, x, ops["q"])
    row["max_abs_err"], row["rel_err"] = float(max_err), float(rel_err)
    del y

    # -- bf16 baseline (cached per shape and M)
    bkey = (c.k, c.n, c.m)
    if bkey not in bf16_cache:
        w_bf = jax.random.normal(jax.random.key(7), (c.k, c.n), jnp.float32).astype(jnp.bfloat16)
        ws = [w_bf] + [_copy(w_bf) for _ in range(copies_for(w_bf.size * 2, args) - 1)]
        t = summarize(timer.time_calls(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32), x, ws, reps)[0])
        bf16_cache[bkey] = t
        del ws, w_bf
    row["t_bf16_us"], row["t_bf16_p10_us"], row["t_bf16_p90_us"] = bf16_cache[bkey]

    # -- naive XLA: lowbit layout, unpack + dequantize (bf16) + dot
    if c.naive:
        q = ops["q"]
        qs = [q] + [_copy(q) for _ in range(copies_for(tree_nbytes(q), args) - 1)]
        t = summarize(timer.time_calls(
            lambda x, q: jnp.dot(x, dequantize(q, jnp.bfloat16).T, preferred_element_type=jnp.float32), x, qs, reps)[0])
        row["t_naive_us"] = t[0]
        del qs

    row["t_ideal_us"] = ideal_us(c, b_eff(c), args)
    row["t_ideal_bf16_us"] = ideal_us(c, 16.0, args)
    row["speedup"] = row["t_bf16_us"] / row["t_q_us"]
    row["frac_ideal"] = row["t_ideal_us"] / row["t_q_us"]
    row["ideal_speedup"] = row["t_bf16_us"] / row["t_ideal_us"] if row["t_ideal_us"] else None
    if c.naive:
        row["speedup_naive"] = row["t_bf16_us"] / row["t_naive_us"]


@jax.jit
def _errors(y, x, q):
    """Max |y - ref| and ||y - ref|| / ||ref|| against the float32 dequantized reference."""
    ref = jnp.dot(x.astype(jnp.float32), dequantize(q, jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
    return jnp.abs(y - ref).max(), jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)


def fmt_progress(i, n, r, elapsed):
    head = f"[{i + 1:3d}/{n}] {elapsed:6.0f}s {r['layer']:>11s} {r['k']}x{r['n']} M={r['m']:<5d} {r['label']:<16s}"
    if r.get("error"):
        return f"{head} ERROR {r['error']}"
    return (f"{head} q={r['t_q_us']:9.1f}us bf16={r['t_bf16_us']:9.1f}us x{r['speedup']:.2f} "
            f"ideal={r['frac_ideal']:.0%} err={r['rel_err']:.1e} compile={r['compile_s']:.1f}s [{r['block_sizes']}]")


# ----------------------------------------------------------------------------- outputs

def _jaxlib_version() -> str:
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:
        return ""


def environment(args, timer_kind, target):
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""

    dev = jax.devices()[0]
    return dict(command=" ".join([Path(sys.executable).name, *sys.argv]), argv=sys.argv, cwd=os.getcwd(),
                jax=jax.__version__, jaxlib=_jaxlib_version(), python=platform.python_version(),
                numpy=np.__version__, backend=jax.default_backend(), device=dev.device_kind,
                n_devices=jax.device_count(),
                git_sha=git("rev-parse", "HEAD"), git_dirty=bool(git("status", "--porcelain")),
                timer=timer_kind, target=target, interpret=args.interpret, bw_tbs=args.bw_tbs,
                peak_tflops=args.peak_tflops, rotate_mb=args.rotate_mb, reps=args.reps,
                time=time.strftime("%Y-%m-%d %H:%M:%S"))


def write_outputs(rows, env, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(dict(meta=env, rows=rows), indent=1, default=str))
    keys = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    try:
        plot(rows, out, env)
    except Exception as e:  # plotting must not lose the results
        print(f"[bench] plot failed: {type(e).__name__}: {e}", file=sys.stderr)


def plot(rows, out: Path, env):
    from lowbit.plots import figure

    ok = [r for r in rows if not r.get("error")]
    layers = []
    for r in ok:
        if r["layer"] not in layers:
            layers.append(r["layer"])
    if not layers:
        return
    for metric, fname, ylabel in (("speedup", "speedup_vs_m.png", "speedup t_bf16 / t_q"),
                                  ("frac_ideal", "frac_ideal_vs_m.png", "t_ideal / t_q")):
        ncol = min(4, len(layers))
        nrow = -(-len(layers) // ncol)
        with figure(str(out / fname), figsize=(4.2 * ncol, 3.4 * nrow), nrows=nrow, ncols=ncol, squeeze=False,
                    sharey=True) as (fig, axes):
            for ax, layer in zip(axes.flat, layers):
                sub = [r for r in ok if r["layer"] == layer]
                labels = sorted({r["label"] for r in sub}, key=lambda s: (int(s.split("-w")[1].split("-")[0]), s))
                for lab in labels:
                    pts = sorted((r["m"], r[metric]) for r in sub if r["label"] == lab)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=lab)
                ax.axhline(1.0, color="gray", lw=0.8, ls="--")
                ax.set_xscale("log", base=2)
                r0 = sub[0]
                ax.set_title(f"{layer} K={r0['k']} N={r0['n']}", fontsize=9)
                ax.set_xlabel("M")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=6)
            for ax in axes[:, 0]:
                ax.set_ylabel(ylabel)
            for ax in list(axes.flat)[len(layers):]:
                ax.axis("off")
            fig.suptitle(f"{env['device']} jax {env['jax']} timer={env['timer']}", fontsize=9)


def print_table(rows):
    ok = [r for r in rows if not r.get("error")]
    bad = [r for r in rows if r.get("error")]
    hdr = f"{'layer':>11s} {'KxN':>11s} {'M':>5s} {'config':<16s} {'t_q us':>9s} {'bf16 us':>9s} {'speedup':>7s} " \
          f"{'naive':>6s} {'ideal%':>6s} {'rel err':>8s}"
    print("\n" + hdr)
    print("-" * len(hdr))
    for r in ok:
        naive = f"{r['speedup_naive']:.2f}" if r.get("speedup_naive") else "-"
        print(f"{r['layer']:>11s} {str(r['k']) + 'x' + str(r['n']):>11s} {r['m']:5d} {r['label']:<16s} "
              f"{r['t_q_us']:9.1f} {r['t_bf16_us']:9.1f} {r['speedup']:7.2f} {naive:>6s} "
              f"{100 * r['frac_ideal']:5.0f}% {r['rel_err']:8.1e}")
    if bad:
        print(f"\n{len(bad)} configs failed or were skipped, e.g.: "
              + "; ".join(f"{r['layer']} M={r['m']} {r['label']}: {r['error'][:80]}" for r in bad[:3]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/bench_kernels", help="output directory")
    p.add_argument("--quick", action="store_true", help="a small subset (~2 min on an H100)")
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode on CPU, tiny shapes (smoke test)")
    p.add_argument("--target", choices=("auto", "gpu", "tpu"), default="auto", help="which kernels to time")
    p.add_argument("--bits", type=lambda s: [int(v) for v in s.split(",")], default=None, help="e.g. 2,4")
    p.add_argument("--m", type=lambda s: [int(v) for v in s.split(",")], default=None, help="e.g. 1,16,256")
    p.add_argument("--sweeps", type=lambda s: s.split(","), default=None,
                   help="subset of main,bits,groups,format,squares")
    p.add_argument("--no-autotune", dest="autotune", action="store_false", help="heuristic block sizes only")
    p.add_argument("--reps", type=int, default=None, help="timed iterations per config (default 20, 3 interpret)")
    p.add_argument("--tune-reps", type=int, default=5)
    p.add_argument("--copies", type=int, default=0, help="weight copies (default: enough for --rotate-mb)")
    p.add_argument("--rotate-mb", type=float, default=128.0, help="bytes of distinct weights per iteration")
    p.add_argument("--max-copies", type=int, default=64)
    p.add_argument("--budget-s", type=float, default=None, help="wall-time cap (default 420, quick 180)")
    p.add_argument("--bw-tbs", type=float, default=3.0, help="memory bandwidth for t_ideal (TB/s)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 peak for t_ideal (TFLOP/s)")
    p.add_argument("--tile-rows", type=int, default=16,
                   help="kernel layout rows per word tile (16; 32/64 give larger dot pieces for large M)")
    p.add_argument("--host-timer", action="store_true", help="skip CUPTI")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 3 if args.interpret else 20
    if args.budget_s is None:
        args.budget_s = 120.0 if args.interpret else (180.0 if args.quick else 420.0)
    if args.interpret:
        args.copies = args.copies or 2
        args.tune_reps = min(args.tune_reps, 2)
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    rows, timer_kind, target = run(args)
    env = environment(args, timer_kind, target)
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    write_outputs(rows, env, out)
    print_table(rows)
    print(f"\n[bench] {len(rows)} rows, {env['wall_s']}s -> {out}/results.json, results.csv, speedup_vs_m.png")
    return rows


if __name__ == "__main__":
    main()
