"""``lowbit`` command line: one sub-command per research task.

Sub-commands live in :data:`COMMANDS` (name -> :class:`Command`): a function adding its arguments
to an argparse sub-parser and a function running it (returns the exit code). To add one::

    def _quantize_args(p): p.add_argument("--recipe", required=True)
    def cmd_quantize(args) -> int: ...
    register("quantize", "quantize a model with a recipe", _quantize_args, cmd_quantize)

Implemented::

    lowbit run CONFIG [--variant smoke] [--set key=value ...]      experiment -> results/ (lowbit.runner.experiment)
    lowbit quantize --model M --method METHOD --bits B --group-size G [--act-order ...] [--calib DATA
                    --nsamples N --seqlen L --seed S] --out DIR [--overwrite]  a lowbit checkpoint (orbax)
    lowbit export DIR [--format gptq|awq] --out HFDIR [--overwrite]  HF GPTQ (default) or AutoAWQ GEMM
                                                                     safetensors (lowbit.io.export)
    lowbit merge DIR --out DIR [--requantize METHOD --bits B --group-size G ...]  LoRA adapters folded into
                                                                     dequantized float weights (lowbit.train.lora)
    lowbit paper                                                     regenerate paper/report.md
    lowbit eval --model NAME_OR_PATH --data NAME_OR_FILE [--split eval] [--seqlen 2048]
                [--max-windows K] [--batch-size B] [--dtype float32] [--out FILE.json]

prints the perplexity (GPTQ protocol, :mod:`lowbit.eval.likelihood`) and writes a JSON record of everything
needed to reproduce it (model path + sha256, data name + split + sha256 of the evaluated text,
seqlen, windows, tokens, ppl, nll, versions, git SHA, device, timings, peak RSS).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import time
from typing import Callable

from lowbit.runner.records import environment_info, layers_csv, peak_rss_mb, sha256_text, write_json

__all__ = ["main", "register", "COMMANDS", "Command"]


@dataclasses.dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register(name: str, help: str, add_arguments, run) -> None:
    """Add a sub-command (see the module docstring)."""
    if name in COMMANDS:
        raise ValueError(f"sub-command {name!r} is already registered")
    COMMANDS[name] = Command(help, add_arguments, run)


# ----------------------------------------------------------------------------- shared helpers


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--batch-size 0`` is an argument error, not a crash later)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return v


# ----------------------------------------------------------------------------- eval

def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default), a .gguf file, an HF directory, a lowbit checkpoint "
                        "directory or a hub id")
    p.add_argument("--data", required=True, help="corpus name (brown, austen, wikitext2, ...) or a "
                                                 "local text file / directory (see lowbit.data.corpora)")
    p.add_argument("--split", default="eval", help="calib | eval | all (default: eval)")
    p.add_argument("--seqlen", type=positive_int, default=2048, help="window length in tokens (default 2048)")
    p.add_argument("--max-windows", type=positive_int, default=None, help="evaluate only the first K windows")
    p.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter / activation dtype (logits and log-softmax stay float32)")
    p.add_argument("--bos", action="store_true",
                   help="start every window with the BOS token (windows of seqlen-1 text tokens); needed by "
                        "models trained to always see BOS (Gemma). Default: the GPTQ protocol, no BOS")
    p.add_argument("--out", default=None, help="write the JSON record here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_eval(args: argparse.Namespace) -> int:
    from lowbit import data
    from lowbit.eval.likelihood import perplexity
    from lowbit.io.outputs import prepare_output_file
    from lowbit.models.loaders import load_model, model_fingerprint

    t0 = time.perf_counter()
    if args.out:  # before the evaluation: a record that cannot be written is found out now
        prepare_output_file(args.out)
    text = data.corpus_text(args.data, args.split)  # a wrong data path or split fails before the model load
    t_text = time.perf_counter() - t0
    fp = model_fingerprint(args.model)
    params, cfg, tok = load_model(args.model, dtype=args.dtype)
    if tok is None:
        raise ValueError(f"model {args.model!r} has no tokenizer (tokenizer.json); cannot tokenize text")
    if args.seqlen > cfg.max_position_embeddings:
        raise ValueError(f"--seqlen {args.seqlen} exceeds the model's context "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    t_load = time.perf_counter() - t0 - t_text
    t1 = time.perf_counter()
    tokens = tok.encode(text)
    t_tok = time.perf_counter() - t1
    if args.bos and tok.bos_id is None:
        raise ValueError(f"--bos: the tokenizer of {args.model!r} has no BOS token")
    bos_id = tok.bos_id if args.bos else None
    windows = data.eval_windows(tokens, args.seqlen - args.bos, args.max_windows)
    res = perplexity(params, cfg, windows, batch_size=args.batch_size, progress=not args.no_progress,
                     desc=f"{os.path.basename(str(args.model))} {args.data}/{args.split}",
                     token_bytes=tok.token_bytes(), bos_id=bos_id)
    record = {
        "command": "eval", "argv": sys.argv[1:],
        "model": {"name_or_path": args.model, "kind": fp["kind"], "path": fp["path"],
                  "sha256": fp["sha256"], "dtype": args.dtype, "config": cfg.to_dict()},
        "data": {"name_or_path": args.data, "split": args.split, "text_sha256": sha256_text(text),
                 "n_chars": len(text), "n_tokens_total": int(len(tokens)),
                 "tokens_sha256": hashlib.sha256(tokens.astype("<i4").tobytes()).hexdigest()},
        "protocol": {"name": "gptq", "bos": bool(args.bos), "seqlen": res["seqlen"], "n_windows": res["n_windows"],
                     "max_windows": args.max_windows, "batch_size": args.batch_size,
                     "predicted_per_window": res["seqlen"] - 1},
        "ppl": res["ppl"], "nll": res["nll"], "bits_per_byte": res["bits_per_byte"], "n_bytes": res["n_bytes"],
        "n_tokens": res["n_tokens"], "top1_acc": res["top1_acc"],
        "timing": {"load_s": t_load, "tokenize_s": t_tok, "eval_wall_s": res["wall_s"],
                   "first_batch_s": res["first_batch_s"], "tokens_per_s": res["tokens_per_s"],
                   "tokens_per_s_steady": res["tokens_per_s_steady"],
                   "total_wall_s": time.perf_counter() - t0},
        "peak_rss_mb": peak_rss_mb(),
        "env": environment_info(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"{args.model} on {args.data}/{args.split}: ppl {res['ppl']:.4f} (nll {res['nll']:.5f}, "
          f"{res['bits_per_byte']:.4f} bits/byte) over "
          f"{res['n_windows']} windows x {res['seqlen']} tokens ({res['n_tokens']} predicted); "
          f"{res['tokens_per_s']:.0f} tok/s, {res['wall_s']:.1f} s, peak RSS {record['peak_rss_mb']:.0f} MiB")
    if args.out:
        write_json(args.out, record)
        print(f"wrote {args.out}")
    return 0


register("eval", "perplexity of a model on a text corpus (GPTQ protocol)", _eval_args, cmd_eval)


# ----------------------------------------------------------------------------- quantize


def _method_option_flags(p: argparse.ArgumentParser) -> None:
    """One flag per field of every registered method's options dataclass (derived, not listed)."""
    import typing

    from lowbit import methods

    seen: dict[str, list[str]] = {}
    fields = {}
    for m in methods.METHODS.values():
        hints = typing.get_type_hints(m.options)
        for f in dataclasses.fields(m.options):
            seen.setdefault(f.name, []).append(m.name)
            fields[f.name] = (hints[f.name], f.default)
    for name, (tp, default) in fields.items():
        flag = "--" + name.replace("_", "-")
        owners = "/".join(seen[name])
        if tp is bool:   # --x / --no-x: either way, whatever the default
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{owners} option (default {default})")
        else:  # scalars by their type; anything else (tuples, unions) as a YAML value
            import yaml

            p.add_argument(flag, type=tp if tp in (int, float, str) else yaml.safe_load, default=None,
                           help=f"{owners} option (default {default})")


def _quantize_args(p: argparse.ArgumentParser) -> None:
    from lowbit import methods

    quantizing = [n for n, m in methods.METHODS.items() if m.quantizes]
    p.add_argument("--model", default="smollm2-135m", help="model to quantize (as for eval)")
    p.add_argument("--method", choices=quantizing, default=None,
                   help="; ".join(f"{n}: {methods.get(n).help}" for n in quantizing))
    p.add_argument("--bits", type=int, default=None, help="1..8")
    p.add_argument("--recipe", default=None,
                   help="a mixed-precision recipe file (lowbit.alloc.recipe: a spec per linear, and the method); "
                        "replaces --method / --bits / --group-size / --format and the method's option flags")
    p.add_argument("--group-size", type=int, default=128, help="columns per scale; 0 = per output channel")
    p.add_argument("--symmetric", action="store_true", help="absmax scales (no zero points)")
    p.add_argument("--format", default="int", help="int | nf4 | fp4 | sign (see lowbit.QuantSpec)")
    p.add_argument("--no-partial-groups", action="store_true",
                   help="refuse group sizes that do not divide in_features (default: shorter last group)")
    _method_option_flags(p)
    p.add_argument("--no-true-sequential", action="store_true", help="calibrate a block's linears at once")
    p.add_argument("--skip", default=r"^(embed_tokens|lm_head)$", help="regex of weights kept dense")
    _calibration_args(p, calib_default="brown", calib_help="calibration corpus (name or local text)")
    p.add_argument("--skip-first", type=int, default=0,
                   help="leave the first K positions of each window (attention sinks) out of the statistics")
    p.add_argument("--token-cap", type=float, default=None,
                   help="cap each token's input norm at this multiple of the median in the statistics")
    _checkpoint_out_args(p)
    p.add_argument("--no-progress", action="store_true")


def _calibration_args(p: argparse.ArgumentParser, *, calib_default, calib_help: str) -> None:
    """The calibration-data flags shared by ``quantize`` and ``merge --requantize``."""
    p.add_argument("--calib", default=calib_default, help=calib_help)
    p.add_argument("--calib-split", default="calib")
    p.add_argument("--nsamples", type=positive_int, default=128)
    p.add_argument("--seqlen", type=positive_int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=8, help="calibration windows per forward pass")


def _checkpoint_out_args(p: argparse.ArgumentParser) -> None:
    """``--out`` / ``--overwrite`` of the commands that write a lowbit checkpoint."""
    p.add_argument("--out", required=True,
                   help="output checkpoint directory (written atomically); an existing one is replaced only if "
                        "it is a lowbit checkpoint (never if it holds files lowbit did not write)")
    p.add_argument("--overwrite", action="store_true",
                   help="also replace another kind of lowbit output (e.g. an HF export) at --out")


def cmd_quantize(args: argparse.Namespace) -> int:
    import shutil

    from lowbit import methods
    from lowbit.io.outputs import prepare_output_dir
    from lowbit.io.remote import Mirror, is_remote
    from lowbit.models.loaders import load_model, model_fingerprint, save_model
    from lowbit.runner.config import CalibCfg, MethodCfg, QuantCfg, from_dict, to_dict
    from lowbit.runner.experiment import calibration_data, model_size, quantize

    t0 = time.perf_counter()
    recipe = None
    if args.recipe is not None:
        from lowbit.alloc import load_recipe

        recipe = load_recipe(args.recipe)
        if args.method not in (None, recipe.method):
            raise ValueError(f"--method {args.method}: the recipe {args.recipe} is for method {recipe.method!r}")
        args.method, args.bits = recipe.method, args.bits or 4   # the bits are the recipe's, per linear
    elif args.method is None or args.bits is None:
        raise ValueError("--method and --bits: required (or --recipe FILE)")
    opts_cls = methods.get(args.method).options
    opts = from_dict(opts_cls, {f.name: getattr(args, f.name) for f in dataclasses.fields(opts_cls)
                                if getattr(args, f.name, None) is not None}, args.method)
    if recipe is not None:
        opts = recipe.options
    method = MethodCfg(name=args.method, method=args.method, skip=args.skip, options=opts, recipe=args.recipe,
                       quant=QuantCfg(bits=args.bits, group_size=args.group_size or None, symmetric=args.symmetric,
                                      format=args.format, partial_groups=not args.no_partial_groups))
    calib = CalibCfg(data=args.calib, split=args.calib_split, nsamples=args.nsamples, seqlen=args.seqlen,
                     batch_size=args.batch_size, true_sequential=not args.no_true_sequential,
                     skip_first=args.skip_first, token_cap=args.token_cap)
    url, mirror = None, None
    if is_remote(args.out):   # written into a local stage, then uploaded (lowbit.io.remote)
        url, mirror = args.out, Mirror(args.out)
        if mirror.remote_files() and not args.overwrite:
            raise ValueError(f"--out {url}: already holds files; pass --overwrite to replace them")
        args.out = mirror.stage
        shutil.rmtree(mirror.stage, ignore_errors=True)
    prepare_output_dir(args.out, "checkpoint", args.overwrite)  # before loading anything
    if calib.source == "corpus":  # a wrong calibration path or split fails before the model load
        from lowbit import data

        data.corpus_text(calib.data, calib.split)
    params, cfg, tok = load_model(args.model)
    if tok is None:
        raise ValueError(f"model {args.model!r} has no tokenizer; cannot tokenize the calibration text")
    windows, calib_record = calibration_data(calib, params, cfg, tok, args.seed, progress=not args.no_progress)
    t1 = time.perf_counter()
    qparams, rows = quantize(params, cfg, method, windows, calib, progress=not args.no_progress)
    seconds = time.perf_counter() - t1
    fp = model_fingerprint(args.model)
    extra = {"quantize": {"argv": sys.argv[1:], "method": to_dict(method), "seconds": seconds,
                          "calib": {**to_dict(calib), "seed": args.seed,
                                    **{k: v for k, v in calib_record.items() if k == "starts"}},
                          "source_model": {"name_or_path": args.model, "sha256": fp["sha256"]},
                          "size": model_size(qparams), "env": environment_info()}}
    files = {"layers.csv": layers_csv(rows)} if rows else {}  # inside the atomic write, listed in the marker
    save_model(args.out, qparams, cfg, tok, extra=extra, extra_files=files, overwrite=args.overwrite)
    if mirror is not None:
        mirror.push()
        args.out = url
    size = extra["quantize"]["size"]
    what = f"recipe {args.recipe}" if recipe is not None else f"w{args.bits}g{args.group_size or 'channel'}"
    print(f"quantized {args.model} with {args.method} {what} in {seconds:.1f} s "
          f"({size['n_quantized']} weights, {size['linear_bits_per_param']:.3f} bits/param, {size['size_mb']:.1f} MB); "
          f"wrote {args.out} (total {time.perf_counter() - t0:.1f} s)")
    return 0


register("quantize", "quantize a model with a registered method into a lowbit checkpoint", _quantize_args,
         cmd_quantize)


# ----------------------------------------------------------------------------- export


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a lowbit checkpoint directory (from lowbit quantize)")
    p.add_argument("--format", choices=["gptq", "awq"], default="gptq",
                   help="gptq (default): HF GPTQ, any int 2/3/4/8-bit quantization; awq: AutoAWQ GEMM "
                        "(quant_method awq, version gemm), needs 4-bit asymmetric group-wise weights "
                        "(--bits 4 --group-size G, not symmetric, no act-order)")
    p.add_argument("--checkpoint-format", choices=["gptq", "gptq_v2"], default=None,
                   help="--format gptq only: gptq (the default; v1: zero - 1 stored, what most engines read) "
                        "or gptq_v2")
    p.add_argument("--out", required=True,
                   help="output HF directory (written atomically); an existing one is replaced only if it is a "
                        "lowbit export of the same format (never if it holds files lowbit did not write)")
    p.add_argument("--overwrite", action="store_true",
                   help="also replace another kind of lowbit output (e.g. a lowbit checkpoint) at --out")


def cmd_export(args: argparse.Namespace) -> int:
    from lowbit.io import checkpoint
    from lowbit.io.export import KINDS, export_awq, export_gptq
    from lowbit.io.outputs import prepare_output_dir
    from lowbit.models.loaders import load_checkpoint

    if args.format != "gptq" and args.checkpoint_format is not None:
        raise ValueError(f"--checkpoint-format {args.checkpoint_format}: only for --format gptq "
                         f"(--format {args.format} has one layout)")
    prepare_output_dir(args.out, KINDS[args.format], args.overwrite)  # before loading anything
    params, cfg, tok = load_checkpoint(args.checkpoint)
    if args.format == "awq":
        out = export_awq(args.out, params, cfg, tok, overwrite=args.overwrite)
        print(f"wrote {out} (awq, version=gemm)")
        return 0
    q = checkpoint.read_extra(args.checkpoint).get("quantize", {})
    extra = {}
    if q.get("method", {}).get("method") == "gptq":
        g = q["method"].get("gptq", {})
        extra = {"damp_percent": g.get("damp", 0.01), "static_groups": g.get("static_groups", False),
                 "true_sequential": q.get("calib", {}).get("true_sequential", True)}
    checkpoint_format = args.checkpoint_format or "gptq"
    out = export_gptq(args.out, params, cfg, tok, checkpoint_format=checkpoint_format, extra_config=extra,
                      overwrite=args.overwrite)
    print(f"wrote {out} ({args.format}, checkpoint_format={checkpoint_format})")
    return 0


register("export", "export a quantized checkpoint to the HF GPTQ or AutoAWQ GEMM layout", _export_args, cmd_export)


# ----------------------------------------------------------------------------- allocate


def _allocate_args(p: argparse.ArgumentParser) -> None:
    from lowbit.alloc.plan import KINDS

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
    p.add_argument("--candidates", choices=["rtn", "gptq"], default="rtn",
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
    _calibration_args(p, calib_default="brown", calib_help="calibration corpus for the cost (name or local text)")
    p.add_argument("--out", required=True, help="recipe file to write (YAML); also writes OUT.png (bits per "
                   "linear), OUT.json (record) and, for learned, OUT-history.png (cost, size, multiplier)")
    p.add_argument("--no-progress", action="store_true")


def cmd_allocate(args: argparse.Namespace) -> int:
    from lowbit.runner.records import peak_rss_mb
    from lowbit.alloc import learned, save_recipe
    from lowbit.alloc.plan import allocate_model, plot_bits, plot_history, uniform_bytes
    from lowbit.core.qtensor import QuantSpec
    from lowbit.models.loaders import load_model
    from lowbit.runner.config import CalibCfg
    from lowbit.runner.experiment import calibration_data

    try:
        widths = tuple(int(b) for b in args.bits.split(","))
    except ValueError:
        raise ValueError(f"--bits {args.bits!r}: expected comma-separated integers, e.g. 2,3,4,8") from None
    group = args.group_size or None
    cands = learned.int_candidates(widths, group) + ([None] if args.dense else [])
    params, cfg, tok = load_model(args.model)
    if tok is None:
        raise ValueError(f"model {args.model!r} has no tokenizer; cannot tokenize the calibration text")
    calib = CalibCfg(data=args.calib, split=args.calib_split, nsamples=args.nsamples, seqlen=args.seqlen,
                     batch_size=args.batch_size)
    windows, record = calibration_data(calib, params, cfg, tok, args.seed, progress=not args.no_progress)
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


# ----------------------------------------------------------------------------- merge (LoRA)

_MERGE_HELP = """\
Fold the LoRA adapters of a checkpoint (lowbit.train.lora) into dense float32 weights:
W' = dequantize(base) + (alpha / r) * B @ A, the same function the adapted model computed.

Why not merge into the 4-bit base: the adapter was trained against the *dequantized* base, whose
every weight sits exactly on a point of the 4-bit grid. Re-quantizing W' with the base's format
rounds each weight to the nearest grid point, and wherever the adapter's update is smaller than half
a grid step (NF4, blocks of 64: levels 0.08-0.3 x the block's absmax apart; a fine-tune typically moves a
weight by far less) that is the code it already had: the update is erased and the
"merged" 4-bit model is the base model again. Keep the merged float model (the default), or
re-quantize it knowingly with --requantize (e.g. a finer format or GPTQ with calibration data) and
measure what is left with `lowbit eval`. (Merging into the original 16-bit weights instead of the
dequantized ones is the other trap: the adapter then corrects a base it never saw.)

--requantize with a data-free method (rtn) needs nothing else; methods that collect statistics
(gptq) need --calib DATA (the calibration options are those of `lowbit quantize`)."""


def _merge_args(p: argparse.ArgumentParser) -> None:
    from lowbit import methods

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = _MERGE_HELP
    quantizing = [n for n, m in methods.METHODS.items() if m.quantizes]
    p.add_argument("checkpoint", help="a lowbit checkpoint with LoRA adapters (lowbit.train.lora.save_lora_model)")
    _checkpoint_out_args(p)
    p.add_argument("--requantize", choices=quantizing, default=None, metavar="METHOD",
                   help="re-quantize the merged float model with this registered method ("
                        + ", ".join(quantizing) + "); default: keep the merged float32 weights. "
                        "Read the description above first")
    p.add_argument("--bits", type=int, default=4, help="with --requantize: 1..8 (default 4)")
    p.add_argument("--group-size", type=int, default=64,
                   help="with --requantize: columns per scale (default 64, QLoRA's block); 0 = per output channel")
    p.add_argument("--symmetric", action="store_true", help="with --requantize: absmax scales (no zero points)")
    p.add_argument("--format", default="int", help="with --requantize: int | nf4 | fp4 | sign (see lowbit.QuantSpec)")
    p.add_argument("--skip", default=r"^(embed_tokens|lm_head)$",
                   help="with --requantize: regex of weights kept dense")
    _calibration_args(p, calib_default=None, calib_help="with --requantize of a method that needs data: "
                                                        "calibration corpus (name or local text)")
    p.add_argument("--no-progress", action="store_true")


def cmd_merge(args: argparse.Namespace) -> int:
    import re

    import jax

    from lowbit.core.qtensor import QuantizedTensor
    from lowbit.core.transforms import flatten, needs_data, quantize_params
    from lowbit.io.outputs import prepare_output_dir
    from lowbit.models.loaders import model_fingerprint, save_model
    from lowbit.runner.config import CalibCfg, MethodCfg, QuantCfg, to_dict
    from lowbit.runner.experiment import build_recipe, calibration_data, model_size, quantize
    from lowbit.train.lora import count_trainable, load_lora_model, lora_paths, merge_lora

    t0 = time.perf_counter()
    quant = None
    if args.requantize is not None:  # a bad spec (e.g. --bits 9) fails here, before any loading
        quant = QuantCfg(bits=args.bits, group_size=args.group_size or None, symmetric=args.symmetric,
                         format=args.format)
        build_recipe(MethodCfg(name=args.requantize, method=args.requantize, quant=quant, skip=args.skip))
    prepare_output_dir(args.out, "checkpoint", args.overwrite)  # before loading anything
    params, cfg, tok = load_lora_model(args.checkpoint)
    adapted = lora_paths(params)
    if not adapted:
        raise ValueError(f"{args.checkpoint}: holds no LoRA adapters (nothing to merge)")
    n_adapter = count_trainable(params)
    merged = merge_lora(params)
    source = {"path": os.path.abspath(args.checkpoint), "sha256": model_fingerprint(args.checkpoint)["sha256"]}
    info = {"source": source, "merged_paths": adapted, "adapter_params": n_adapter, "dtype": "float32",
            "argv": sys.argv[1:]}
    extra = {"merge": info}
    rows: list = []
    if quant is not None:
        # linears that were already quantized (not adapted) stay as they are
        already = [p for p, v in flatten(merged).items() if isinstance(v, QuantizedTensor)]
        skip = "|".join([f"(?:{args.skip})"] + [f"^{re.escape(p)}$" for p in already]) if already else args.skip
        method = MethodCfg(name=args.requantize, method=args.requantize, quant=quant, skip=skip)
        recipe = build_recipe(method)
        if needs_data(jax.eval_shape(recipe.init, flatten(merged))):
            if args.calib is None:
                raise ValueError(f"--requantize {args.requantize} collects statistics on calibration data: pass "
                                 "--calib DATA (or use a data-free method such as rtn)")
            if tok is None:
                raise ValueError(f"{args.checkpoint}: has no tokenizer; cannot tokenize the calibration text")
            calib = CalibCfg(data=args.calib, split=args.calib_split, nsamples=args.nsamples, seqlen=args.seqlen,
                             batch_size=args.batch_size)
            windows, record = calibration_data(calib, merged, cfg, tok, args.seed, progress=not args.no_progress)
            merged, rows = quantize(merged, cfg, method, windows, calib, progress=not args.no_progress, recipe=recipe)
            info["calib"] = {**to_dict(calib), "seed": args.seed, **{k: v for k, v in record.items() if k == "starts"}}
        else:
            merged = quantize_params(merged, recipe)
        info["requantize"] = to_dict(method)
        extra["quantize"] = {"argv": sys.argv[1:], "method": to_dict(method), "size": model_size(merged),
                             "source_model": info["source"]}
    files = {"layers.csv": layers_csv(rows)} if rows else {}
    save_model(args.out, merged, cfg, tok, extra=extra, extra_files=files, overwrite=args.overwrite)
    what = ("float32" if quant is None else
            f"re-quantized with {args.requantize} w{args.bits}g{args.group_size or 'channel'} {args.format}")
    print(f"merged {len(adapted)} LoRA adapters ({n_adapter:,} parameters) of {args.checkpoint} into dequantized "
          f"float weights, {what}; wrote {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


register("merge", "fold LoRA adapters into dequantized float weights (optionally re-quantize)", _merge_args,
         cmd_merge)


# ----------------------------------------------------------------------------- run / paper


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment config (configs/*.yaml)")
    p.add_argument("--variant", default=None, help="a named variant of the config (e.g. smoke)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (dotted path, YAML value); repeatable")
    p.add_argument("--results", default="results",
                   help="results root (default results/); a URL such as gs://bucket/path runs in a local stage "
                        "($LOWBIT_STAGE_DIR) uploaded after every layer and row (fsspec; pip install gcsfs for gs://)")
    p.add_argument("--force", action="store_true", help="recompute runs that are up to date")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("devices and processes (lowbit.dist)")
    g.add_argument("--mesh", default=None, metavar="AXIS=N[,AXIS=N]",
                   help="device mesh, e.g. data=8 or data=4,model=2 (default: the config's mesh, else every device "
                        "on data)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process job (jax.distributed.initialize): auto-detected on TPU VMs / SLURM, "
                        "or given by --coordinator, --num-processes, --process-id")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address (with --distributed)")
    g.add_argument("--num-processes", type=positive_int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g.add_argument("--init-timeout", type=positive_int, default=120, metavar="S",
                   help="seconds to wait for every process to join (default 120)")


def cmd_run(args: argparse.Namespace) -> int:
    import dataclasses

    from lowbit import dist
    from lowbit.runner.config import load_config
    from lowbit.runner.experiment import experiment_dir, run_experiment

    if (args.coordinator or args.num_processes or args.process_id is not None) and not args.distributed:
        raise ValueError("--coordinator / --num-processes / --process-id: only with --distributed")
    cfg = load_config(args.config, variant=args.variant, overrides=args.overrides)
    if args.mesh is not None:
        cfg = dataclasses.replace(cfg, mesh=dist.parse_mesh(args.mesh))
    if args.distributed:
        dist.initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.init_timeout)
    try:
        run_experiment(cfg, results_dir=args.results, force=args.force, progress=not args.no_progress)
    except (RuntimeError, OSError) as e:
        import jax

        if jax.process_count() == 1:
            raise
        raise RuntimeError(f"process {jax.process_index()} of {jax.process_count()} failed ({type(e).__name__}: "
                           f"{str(e).strip()[:400]}); if another process died, rerun the same command on every "
                           "process: finished rows are kept and the interrupted quantization resumes from process 0's "
                           "last saved layer where every process can read it") from None
    if not dist.is_primary():
        return 0
    from lowbit.io.remote import is_remote

    where = (f"{args.results.rstrip('/')}/{os.path.basename(experiment_dir(cfg, '.'))}" if is_remote(args.results)
             else experiment_dir(cfg, args.results))
    print(f"results in {where} (table: summary.md, plot: ppl_vs_bits.png)")
    return 0


register("run", "run an experiment config: calibrate, quantize, evaluate, table + plot", _run_args, cmd_run)


def _paper_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report", default="paper/report.md")
    p.add_argument("--results", default="paper/results",
                   help="results root (default paper/results, the committed results behind the report)")


def cmd_paper(args: argparse.Namespace) -> int:
    from lowbit.runner.paper import render

    blocks = render(args.report, results=args.results)
    kept = [b for b, k in blocks.items() if k.endswith("(kept)")]
    print(f"regenerated {len(blocks) - len(kept)} blocks of {args.report} from {args.results}/"
          + (f"; kept {len(kept)} without results: {', '.join(kept)}" if kept else ""))
    return 0


register("paper", "regenerate the report's tables and figures from results/", _paper_args, cmd_paper)


# ----------------------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="lowbit: LLM quantization research suite")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, c in COMMANDS.items():
        sp = sub.add_parser(name, help=c.help, description=c.help)
        c.add_arguments(sp)
        sp.set_defaults(_run=c.run)
    return parser


def main(argv=None) -> int:
    """Run ``lowbit COMMAND ...``; returns the exit code (errors print one line, exit code 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        hint = "; rerun the same command to resume" if args.command == "run" else ""
        print(f"\nlowbit {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, FloatingPointError, OverflowError) as e:
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        msg = str(e).strip() or type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{e.filename}: {msg}"
        print(f"lowbit {args.command}: error: {msg} (LOWBIT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
