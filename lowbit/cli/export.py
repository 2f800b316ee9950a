"""``lowbit export``: a quantized lowbit checkpoint in the HF GPTQ or AutoAWQ GEMM layout
(:mod:`lowbit.io.export`)."""

from __future__ import annotations

import argparse

from lowbit.cli.common import register


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
    from lowbit import methods
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
    made_by = methods.METHODS.get(q.get("method", {}).get("method"))   # the method's own export fields
    extra = made_by.export(q) if made_by is not None and made_by.export is not None else {}
    checkpoint_format = args.checkpoint_format or "gptq"
    out = export_gptq(args.out, params, cfg, tok, checkpoint_format=checkpoint_format, extra_config=extra,
                      overwrite=args.overwrite)
    print(f"wrote {out} ({args.format}, checkpoint_format={checkpoint_format})")
    return 0


register("export", "export a quantized checkpoint to the HF GPTQ or AutoAWQ GEMM layout", _export_args, cmd_export)
