"""Time and memory of the learned bit allocation, by model size and candidate count.

Each configuration (model x candidate widths) runs in a **fresh process** (nothing compiled or
cached by another one) for ``--steps`` optimizer steps of :func:`lowbit.alloc.learned.allocate`
(KL cost from the float model, ``--nsamples`` windows of ``--seqlen`` tokens in batches of
``--batch``, budget: the bytes of uniform 3-bit weights at the candidates' group size). Per
configuration:

- ``params``: weights of the allocated linears; ``K``: candidates;
- ``cand MiB``: the K stacked float32 candidate weights the optimizer holds (``K x params x 4``),
  the term that grows with both the model and K;
- ``setup s``: from the call to the first step (candidate weights, byte tables, the cost's scale);
  ``step s``: median wall time of the steps after the first (compilation excluded);
- ``peak RSS MiB``: the process's resident-set high-water mark (model, teacher, candidates,
  compiled step).

    python experiments/bench_alloc.py --out results/bench_alloc
    python experiments/bench_alloc.py --models smollm2-135m --bits 2,4 2,3,4,8 1,2,3,4,5,6,7,8 --steps 4

Writes ``results.json`` (``meta`` + ``rows``, read by ``lowbit paper``), ``results.csv`` and prints
a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time


def _child(args) -> dict:
    import numpy as np

    from lowbit.alloc import learned, problem
    from lowbit.alloc.plan import uniform_bytes
    from lowbit.core.qtensor import QuantSpec
    from lowbit.core.transforms import flatten
    from lowbit.data import calibration_windows, corpus_text
    from lowbit.models.loaders import load_model
    from lowbit.io.records import peak_rss_mb

    params, cfg, tok = load_model(args.model)
    stream = tok.encode(corpus_text(args.data, "calib"))
    windows = np.asarray(calibration_windows(stream, args.nsamples, args.seqlen, seed=0)[0], np.int32)
    batches = [windows[i:i + args.batch] for i in range(0, len(windows), args.batch)]
    widths = tuple(int(b) for b in args.child_bits.split(","))
    cands = problem.int_candidates(widths, args.group_size)
    units = problem.linear_units(params)
    n = sum(int(np.prod(flatten(params)[u].shape)) for u in units)
    budget = uniform_bytes(params, QuantSpec(bits=3, group_size=args.group_size, partial_groups=True), units)
    t0 = time.perf_counter()
    res = learned.allocate(params, learned.kl_cost(cfg, params), cands, batches, budget_bytes=budget,
                           cfg=learned.AllocCfg(steps=args.steps), progress=False)
    total = time.perf_counter() - t0
    secs = [h["seconds"] for h in res.history]
    steps = [b - a for a, b in zip(secs, secs[1:])]
    return {"model": args.model, "params": n, "units": len(units), "K": len(cands), "bits": args.child_bits,
            "cand_mib": len(cands) * n * 4 / 2**20, "setup_s": total - secs[-1] + secs[0],
            "step_s": statistics.median(steps) if steps else float("nan"), "steps": args.steps,
            "tokens_per_step": args.batch * args.seqlen, "peak_rss_mib": peak_rss_mb()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--bits", nargs="+", default=["2,4", "2,3,4,8", "1,2,3,4,5,6,7,8"],
                   help="candidate width sets (one configuration each, on the first model; the others run the "
                        "middle set)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--data", default="brown", help="calibration text: a corpus name or a local text file (calib split)")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default="results/bench_alloc")
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--child-bits", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_out:
        row = _child(args)
        with open(args.child_out, "w") as f:
            json.dump(row, f)
        return 0

    configs = [(args.models[0], b) for b in args.bits]
    configs += [(m, args.bits[len(args.bits) // 2]) for m in args.models[1:]]
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for model, bits in configs:
        tmp = os.path.join(args.out, f".child-{os.getpid()}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--model", model, "--child-bits", bits, "--child-out", tmp,
               "--data", args.data, "--group-size", str(args.group_size), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
               "--batch", str(args.batch), "--steps", str(args.steps)]
        print(f"[bench_alloc] {model} bits {bits} ...", flush=True)
        r = subprocess.run(cmd)
        if r.returncode != 0:
            raise SystemExit(f"bench_alloc: {model} bits {bits} failed (exit {r.returncode})")
        with open(tmp) as f:
            rows.append(json.load(f))
        os.remove(tmp)
        print(f"[bench_alloc] {rows[-1]}", flush=True)

    from lowbit.io.records import environment_info, write_json

    meta = {"argv": sys.argv[1:], "environment": environment_info(),
            "what": "learned allocation: setup, step time and peak RSS by model size and candidate count"}
    write_json(os.path.join(args.out, "results.json"), {"meta": meta, "rows": rows})
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"{'model':<16}{'params':>12}{'K':>4}{'cand MiB':>10}{'setup s':>9}{'step s':>8}{'peak RSS MiB':>14}")
    for r in rows:
        print(f"{r['model']:<16}{r['params']:>12}{r['K']:>4}{r['cand_mib']:>10.0f}{r['setup_s']:>9.1f}"
              f"{r['step_s']:>8.2f}{r['peak_rss_mib']:>14.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
