"""``lowbit allocate``: learn how many bits each linear gets under a size budget
(:mod:`lowbit.alloc.learned`), or a HAWQ / HIGGS baseline (:mod:`lowbit.alloc.baselines`), into a
recipe file."""

from __future__ import annotations

import argparse
import sys

from lowbit.cli.common import calibration_args, device_args, devices, positive_int, register
from lowbit.io.records import write_json


def _allocate_args(p: argparse.ArgumentParser) -> None:
    from lowbit.alloc.plan import KINDS, ROUND_TO_NEAREST, candidate_methods

    p.add_argument("--model", default="smollm2-135m", help="model to allocate bits for (as for eval)")
    p.add_argument("--kind", choices=KINDS, default="learned",
                   help="learned: gradient descent on the cost under the budget (Lagrange multiplier); hawq: "
                        "Hessian traces x error + knapsack; higgs: noise sensitivity x error + DP")
    p.add_argument("--bits", default="2,3,4,8", help="candidate widths, comma-separated (int, asymmetric)")
    p.add_argument("--group-size", type=int, default=128, help="candidates' group size; 0 = per output channel")
    p.add_argument("--dense", action="store_true", help="also offer 'keep in 16 bit' as a candidate")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-bits", type=float, help="mean bits per parameter of the allocated linears")
    budget.add_argument("--budget-like", type=int, metavar="BITS",
                        help="the exact size of uniform BITS-bit weights at --group-size (e.g. 3: w3g128's bytes)")
    p.add_argument("--cost", choices=["kl", "ce"], default="kl",
                   help="kl: KL from the float model (default); ce: cross-entropy on the calibration text")
    p.add_argument("--steps", type=positive_int, default=100, help="optimizer steps (learned)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--hard", action="store_true", help="straight-through Gumbel samples instead of the soft mix")
    p.add_argument("--fill-batches", type=int, default=4, metavar="N",
                   help="learned: spend the bytes the discretization leaves unused on the upgrades the cost's gradient "
                        "(on N calibration batches) ranks best per byte; 0 leaves them unused")
    p.add_argument("--candidates", choices=candidate_methods(), default=ROUND_TO_NEAREST,
                   help="learned: candidate weights by round to nearest (default) or GPTQ at each width (one "
                        "calibration pass per width on the same windows)")
    p.add_argument("--block", type=positive_int, default=None, metavar="COLS",
                   help="learned: units are blocks of COLS input columns (a multiple of --group-size) instead of "
                        "whole linears; a linear whose blocks differ gets a width per column group")
    p.add_argument("--samples", type=positive_int, default=None,
                   help="hawq: Hutchinson probes (default 8); higgs: noise draws per linear (default 2)")
    p.add_argument("--method", default="gptq", help="the method the recipe quantizes with (default gptq)")
    p.add_argument("--run-dir", default=None,
                   help="learned: keep checkpoints here (rerunning the same command resumes from them); hawq / higgs: "
                        "keep the measured sensitivities here (a run with another budget on the same windows reuses them)")
    calibration_args(p, calib_default="brown", calib_help="calibration corpus for the cost (name or local text)")
    p.add_argument("--out", required=True, help="recipe file to write (YAML); also writes OUT.png (bits per "
                   "linear), OUT.json (record) and, for learned, OUT-history.png (cost, size, multiplier)")
    p.add_argument("--no-progress", action="store_true")
    device_args(p)


def cmd_allocate(args: argparse.Namespace) -> int:
    with devices(args) as mesh:
        return _allocate(args, mesh)


def _allocate(args: argparse.Namespace, mesh) -> int:
    from lowbit import dist, pipeline
    from lowbit.alloc import learned, problem, save_recipe
    from lowbit.alloc.plan import allocate_model, plot_bits, plot_history, uniform_bytes
    from lowbit.core.qtensor import QuantSpec
    from lowbit.io.records import peak_rss_mb

    try:
        widths = tuple(int(b) for b in args.bits.split(","))
    except ValueError:
        raise ValueError(f"--bits {args.bits!r}: expected comma-separated integers, e.g. 2,3,4,8") from None
    group = args.group_size or None
    cands = problem.int_candidates(widths, group) + ([None] if args.dense else [])
    params, cfg, tok = pipeline.load(args.model)
    if tok is None:
        raise ValueError(f"model {args.model!r} has no tokenizer; cannot tokenize the calibration text")
    if mesh is not None:   # calibration passes split over data (the candidates' GPTQ, the sensitivities' forwards)
        params = dist.shard_params(params, mesh)
    calib = pipeline.CalibCfg(data=args.calib, split=args.calib_split, nsamples=args.nsamples, seqlen=args.seqlen,
                              batch_size=args.batch_size)
    windows, record = pipeline.calibration_data(calib, params, cfg, tok, args.seed, progress=not args.no_progress)
    budget = {"budget_bits": args.budget_bits} if args.budget_bits is not None else {
        "budget_bytes": uniform_bytes(params, QuantSpec(bits=args.budget_like, group_size=group, partial_groups=True))}
    recipe, info = allocate_model(params, cfg, windows, kind=args.kind, candidates=cands, cost=args.cost,
                                  batch_size=args.batch_size, method=args.method, progress=not args.no_progress,
                                  cfg=learned.AllocCfg(steps=args.steps, lr=args.lr, hard=args.hard, seed=args.seed,
                                                       fill_batches=args.fill_batches),
                                  run_dir=args.run_dir, block=args.block, candidate_weights=args.candidates,
                                  samples=args.samples, **budget)
    info["calib"] = {k: v for k, v in record.items() if k != "tokens"}
    info["argv"] = sys.argv[1:]
    info["peak_rss_mb"] = peak_rss_mb()
    if not dist.is_primary():   # one allocation for the job: process 0 writes it
        return 0
    stem = args.out[:-5] if args.out.endswith(".yaml") else args.out
    save_recipe(recipe, args.out, comment=f"lowbit allocate {' '.join(sys.argv[2:])}\n{args.kind}: "
                f"{info['bits_per_param']:.4f} bits/param ({info['nbytes']} bytes, budget {info['budget']})")
    write_json(stem + ".json", info)
    plot_bits(recipe, stem + ".png", f"{args.kind} allocation, {info['bits_per_param']:.3f} bits/param")
    if info.get("history"):
        plot_history(info["history"], stem + "-history.png", f"lowbit allocate ({args.kind}, cost {args.cost})")
    print(f"{args.kind} allocation: {info['bits_per_param']:.4f} bits/param ({info['nbytes']} of {info['budget']} "
          f"budget bytes) in {info['seconds']:.1f} s; wrote {args.out}, {stem}.png, {stem}.json")
    return 0


register("allocate", "learn how many bits each linear gets under a size budget (or a HAWQ / HIGGS baseline)",
         _allocate_args, cmd_allocate)
