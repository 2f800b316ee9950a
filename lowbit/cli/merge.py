"""``lowbit merge``: LoRA adapters folded into dequantized float weights (:mod:`lowbit.train.lora`),
optionally re-quantized with a registered method (the same pipeline as ``lowbit quantize``)."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from lowbit.cli.common import calibration_args, checkpoint_out_args, register
from lowbit.io.records import layers_csv


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
    checkpoint_out_args(p)
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
    calibration_args(p, calib_default=None, calib_help="with --requantize of a method that needs data: "
                                                        "calibration corpus (name or local text)")
    p.add_argument("--no-progress", action="store_true")


def cmd_merge(args: argparse.Namespace) -> int:
    from lowbit import methods, pipeline
    from lowbit.cli.quantize import calibrate_and_quantize
    from lowbit.core.config import to_dict
    from lowbit.core.qtensor import QuantizedTensor
    from lowbit.core.transforms import flatten
    from lowbit.io.outputs import prepare_output_dir
    from lowbit.models.loaders import model_fingerprint, save_model
    from lowbit.pipeline import CalibCfg, MethodCfg, QuantCfg
    from lowbit.train.lora import count_trainable, load_lora_model, lora_paths, merge_lora

    t0 = time.perf_counter()
    quant = None
    if args.requantize is not None:  # a bad spec (e.g. --bits 9) fails here, before any loading
        quant = QuantCfg(bits=args.bits, group_size=args.group_size or None, symmetric=args.symmetric,
                         format=args.format)
        pipeline.build_recipe(MethodCfg(name=args.requantize, method=args.requantize, quant=quant, skip=args.skip))
        if not methods.get(args.requantize).data_free and args.calib is None:
            raise ValueError(f"--requantize {args.requantize} collects statistics on calibration data: pass "
                             "--calib DATA (or use a data-free method such as rtn)")
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
        calib = None if methods.get(args.requantize).data_free else CalibCfg(
            data=args.calib, split=args.calib_split, nsamples=args.nsamples, seqlen=args.seqlen,
            batch_size=args.batch_size)
        merged, rows, calib_record = calibrate_and_quantize(merged, cfg, tok, method, calib, args.seed,
                                                            progress=not args.no_progress, source=args.checkpoint)
        if calib_record is not None:
            info["calib"] = calib_record
        info["requantize"] = to_dict(method)
        extra["quantize"] = {"argv": sys.argv[1:], "method": to_dict(method), "size": pipeline.model_size(merged),
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
