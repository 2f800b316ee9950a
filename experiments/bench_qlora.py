"""QLoRA vs LoRA on the float base: memory and step time of one training step, side by side.

The same model, adapters (r 64, alpha 16, every linear of the blocks), optimizer (the QLoRA
paper's AdamW), batch and compute dtype; only the frozen base differs: float32 weights (LoRA) or a
packed 4-bit base with double-quantized absmax (QLoRA; NF4 by default, FP4 / int4 on request).
Every configuration runs in a **fresh process** (nothing compiled or cached by another one), and
the configurations alternate repetition by repetition. Per configuration:

- ``base MiB``: bytes of the frozen linear weights as they sit in memory during training (packed
  codes + absmax + nested constants for QLoRA), checked against ``lowbit.bits_per_param`` of the
  same tensors (``bits_per_param x params / 8`` must equal the bytes, else the run fails);
- ``step MiB (XLA)``: XLA's allocation plan of the compiled train step (inputs: the frozen base,
  float32 adapter masters, Adam moments, batch; outputs; temporaries: activations kept for the
  backward pass, gradients, dequantized weights): exact and deterministic;
- ``peak RSS MiB``: the process's resident-set high-water mark *during the training steps* (reset
  with ``/proc/self/clear_refs`` after setup, so loading the float checkpoint to quantize it does not
  count), and the RSS when training starts;
- ``step s``: median wall time of ``--steps`` steps after one warm-up step (compilation excluded),
  and tokens/s.

    python experiments/bench_qlora.py --out results/bench_qlora
    python experiments/bench_qlora.py --bases fp nf4 fp4 int4 --batch 4 --seqlen 256 --steps 5

Writes ``results.json`` (``meta`` + ``rows``, read by ``lowbit paper``), ``results.csv`` and prints
a table with the ratios QLoRA / LoRA.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import statistics
import subprocess
import sys
import time

from lowbit.io.records import proc_status_mib, reset_peak_rss

BASES = ("fp", "nf4", "fp4", "int4")


def _spec(base: str):
    """The base's spec: the QLoRA NF4 layout (blocks of 64, bitsandbytes double quantization, 4.127
    bits/param) with the 4-bit data type swapped for FP4 or symmetric int4."""
    import dataclasses

    from lowbit.core.qtensor import QuantSpec

    nf4 = QuantSpec.qlora_nf4()
    return dataclasses.replace(nf4, format={"nf4": "nf4", "fp4": "fp4", "int4": "int"}[base])


def worker(base: str, args) -> dict:
    """One configuration, in this (fresh) process."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lowbit.core.qtensor import QuantizedTensor
    from lowbit.core.quantizers import bits_per_param, quantize
    from lowbit.core.transforms import flatten, unflatten
    from lowbit.data import corpus_text
    from lowbit.models.loaders import load_model
    from lowbit.train import (add_lora, build_optimizer, causal_lm_loss, init_state, lora_loss,
                              make_train_step, partition_params, qlora_optim, step_memory, trainable_regex)
    from lowbit.train.lora import linear_paths

    params, mcfg, tok = load_model(args.model)
    flat = flatten(params)
    linears = linear_paths(params)
    if base != "fp":
        spec = _spec(base)
        flat = {k: (quantize(v, spec) if k in linears else v) for k, v in flat.items()}
    params = unflatten(params, flat)
    n_params = sum(int(np.prod(flat[k].shape)) for k in linears)
    base_bytes = sum(x.nbytes for k in linears for x in jax.tree.leaves(flat[k]))
    if base != "fp":
        bpp_bytes = sum(bits_per_param(flat[k]) * flat[k].shape[0] * flat[k].shape[1] for k in linears) / 8
        if abs(bpp_bytes - base_bytes) > 0.5:
            raise SystemExit(f"{base}: packed base holds {base_bytes} bytes, bits_per_param says {bpp_bytes}")
        assert all(isinstance(flat[k], QuantizedTensor) for k in linears)
    del flat
    gc.collect()

    lp = add_lora(params, rank=args.rank, alpha=16.0, dropout=0.1, key=jax.random.key(0))
    del params
    part = partition_params(lp, trainable_regex())
    opt = build_optimizer(qlora_optim(args.steps + 1), args.steps + 1)
    loss = lora_loss(causal_lm_loss(mcfg.replace(dtype=args.dtype)))
    step = make_train_step(loss, opt, part, args.dtype)
    state = init_state(part, lp, opt, jax.random.key(1))
    _, frozen = part.split(lp)
    del lp
    gc.collect()
    stream = np.asarray(tok.encode(corpus_text(args.data, "calib")[: 40 * args.batch * args.seqlen]), np.int32)
    need = (args.steps + 1) * args.batch * args.seqlen
    stream = np.resize(stream, need).reshape(args.steps + 1, args.batch, args.seqlen)

    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, jnp.asarray(stream[0])).compile()
    compile_s = time.perf_counter() - t0
    mem = step_memory(compiled)
    reset = reset_peak_rss()
    rss_start = proc_status_mib("VmRSS")
    times = []
    for i in range(args.steps + 1):
        t = time.perf_counter()
        state, m = compiled(state, frozen, jnp.asarray(stream[i]))
        m["loss"].block_until_ready()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times[1:])
    return {"base": "float32" if base == "fp" else f"{base} + DQ", "method": "LoRA" if base == "fp" else "QLoRA",
            "compute": args.dtype, "batch x seqlen": f"{args.batch} x {args.seqlen}",
            "base MiB": base_bytes / 2**20, "base bits/param": base_bytes * 8 / n_params,
            "adapter params": sum(int(x.size) for x in jax.tree.leaves(state.params)),
            "step MiB (XLA)": mem["total"] / 2**20, "inputs MiB": mem["argument"] / 2**20,
            "temp MiB": mem["temp"] / 2**20, "RSS at start MiB": rss_start,
            "peak RSS MiB": proc_status_mib("VmHWM") if reset else float("nan"),
            "step s": step_s, "tokens/s": args.batch * args.seqlen / step_s, "compile s": compile_s,
            "final loss": float(m["loss"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="austen", help="corpus of the training batches (its calib split)")
    ap.add_argument("--bases", nargs="+", default=["fp", "nf4"], choices=BASES,
                    help="frozen bases to compare; fp (LoRA on float32) is the baseline of the ratios")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--repeats", type=int, default=1, help="fresh processes per base, alternating")
    ap.add_argument("--out", default="results/bench_qlora")
    ap.add_argument("--worker", choices=BASES, help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for k in ("batch", "seqlen", "rank", "steps", "repeats"):
        if getattr(args, k) < 1:
            ap.error(f"--{k} must be >= 1, got {getattr(args, k)}")
    if args.worker:
        row = worker(args.worker, args)
        with open(args.json, "w") as f:
            json.dump(row, f)
        return 0

    os.makedirs(args.out, exist_ok=True)
    passthrough = ["--model", args.model, "--data", args.data, "--batch", str(args.batch), "--seqlen", str(args.seqlen),
                   "--rank", str(args.rank), "--dtype", args.dtype, "--steps", str(args.steps)]
    runs: dict[str, list[dict]] = {b: [] for b in args.bases}
    for r in range(args.repeats):
        for b in args.bases:
            path = os.path.join(args.out, f".worker-{b}-{r}.json")
            print(f"[bench_qlora] repeat {r + 1}/{args.repeats}: {b} base in a fresh process ...", flush=True)
            subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", b, "--json", path, *passthrough],
                           check=True)
            with open(path) as f:
                runs[b].append(json.load(f))
            os.remove(path)
    rows = []
    for b in args.bases:   # the median repetition by step time; memory is the same in every one
        rs = sorted(runs[b], key=lambda x: x["step s"])
        rows.append(dict(rs[len(rs) // 2]))
    ref = rows[0] if args.bases[0] == "fp" else None
    for row in rows:
        row["memory vs LoRA"] = row["step MiB (XLA)"] / ref["step MiB (XLA)"] if ref else None
        row["time vs LoRA"] = row["step s"] / ref["step s"] if ref else None
    import jax

    meta = {"jax": jax.__version__, "device": str(jax.devices()[0]), "cores": os.cpu_count(),
            "model": args.model, "rank": args.rank, "repeats": args.repeats, "timed steps": args.steps,
            "command": "python experiments/bench_qlora.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    tmp = os.path.join(args.out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    os.replace(tmp, os.path.join(args.out, "results.json"))
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for row in rows:
        print(f"{row['method']:6s} {row['base']:10s} base {row['base MiB']:7.1f} MiB ({row['base bits/param']:.3f} "
              f"bits/param) | step {row['step MiB (XLA)']:7.0f} MiB XLA, peak RSS {row['peak RSS MiB']:6.0f} MiB | "
              f"{row['step s']:.2f} s/step, {row['tokens/s']:.0f} tok/s"
              + (f" | memory x{row['memory vs LoRA']:.2f}, time x{row['time vs LoRA']:.2f}" if ref else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
