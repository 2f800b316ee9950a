"""``lowbit quantize``: quantize a model with a registered method (or a mixed-precision recipe)
into a lowbit checkpoint; :func:`calibrate_and_quantize` is the part ``lowbit merge --requantize``
shares."""

from __future__ import annotations

import argparse
import shutil
import sys
import time

from lowbit.cli.common import (calibration_args, checkpoint_out_args, device_args, devices, method_option_flags,
                               method_options, register)
from lowbit.io.records import environment_info, layers_csv

__all__ = ["cmd_quantize", "calibrate_and_quantize"]


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
    method_option_flags(p)
    p.add_argument("--no-true-sequential", action="store_true", help="calibrate a block's linears at once")
    p.add_argument("--skip", default=r"^(embed_tokens|lm_head)$", help="regex of weights kept dense")
    calibration_args(p, calib_default="brown", calib_help="calibration corpus (name or local text)")
    p.add_argument("--skip-first", type=int, default=0,
                   help="leave the first K positions of each window (attention sinks) out of the statistics")
    p.add_argument("--token-cap", type=float, default=None,
                   help="cap each token's input norm at this multiple of the median in the statistics")
    checkpoint_out_args(p)
    p.add_argument("--no-progress", action="store_true")
    device_args(p)


def calibrate_and_quantize(params, model_cfg, tok, row, calib, seed: int, *, progress: bool, source: str):
    """``(qparams, report rows, calib record)``: ``row`` (a :class:`lowbit.pipeline.MethodCfg`) on
    ``params`` through the layer-sequential pipeline with ``calib``'s windows (``calib`` None: a
    data-free method applied directly, no report rows). ``source`` names the model in errors."""
    from lowbit import pipeline
    from lowbit.core.config import to_dict
    from lowbit.core.transforms import quantize_params

    recipe = pipeline.build_recipe(row, params)
    if calib is None:
        return pipeline.finalize(row, quantize_params(params, recipe)), [], None
    if tok is None:
        raise ValueError(f"{source}: has no tokenizer; cannot tokenize the calibration text")
    windows, record = pipeline.calibration_data(calib, params, model_cfg, tok, seed, progress=progress)
    qparams, rows = pipeline.quantize(params, model_cfg, row, windows, calib, progress=progress, recipe=recipe)
    return qparams, rows, {**to_dict(calib), "seed": seed, **{k: v for k, v in record.items() if k == "starts"}}


def cmd_quantize(args: argparse.Namespace) -> int:
    with devices(args) as mesh:
        return _quantize(args, mesh)


def _quantize(args: argparse.Namespace, mesh) -> int:
    import jax

    from lowbit import dist, pipeline
    from lowbit.core.config import to_dict
    from lowbit.io.outputs import prepare_output_dir
    from lowbit.io.remote import Mirror, is_remote
    from lowbit.models.loaders import model_fingerprint, save_model
    from lowbit.pipeline import CalibCfg, MethodCfg, QuantCfg

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
    opts = recipe.options if recipe is not None else method_options(args, args.method)
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
    if dist.is_primary():
        prepare_output_dir(args.out, "checkpoint", args.overwrite)  # before loading anything
    if calib.source == "corpus":  # a wrong calibration path or split fails before the model load
        from lowbit import data

        data.corpus_text(calib.data, calib.split)
    params, cfg, tok = pipeline.load(args.model)
    if mesh is not None:
        params = dist.shard_params(params, mesh)
    t1 = time.perf_counter()
    qparams, rows, calib_record = calibrate_and_quantize(params, cfg, tok, method, calib, args.seed,
                                                         progress=not args.no_progress, source=f"model {args.model!r}")
    seconds = time.perf_counter() - t1
    fp = model_fingerprint(args.model)
    extra = {"quantize": {"argv": sys.argv[1:], "method": to_dict(method), "seconds": seconds,
                          "calib": calib_record, "source_model": {"name_or_path": args.model, "sha256": fp["sha256"]},
                          "size": pipeline.model_size(qparams), "env": environment_info()}}
    files = {"layers.csv": layers_csv(rows)} if rows else {}  # inside the atomic write, listed in the marker
    if jax.process_count() > 1:   # the whole model on every process (a collective), then process 0 writes it
        qparams = jax.tree.map(dist.to_host, qparams)
    if dist.is_primary():
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
