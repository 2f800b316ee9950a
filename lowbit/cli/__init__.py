"""``lowbit`` command line: one sub-command per research task.

One module per sub-command (``lowbit/cli/<command>.py``), each registering itself in
:data:`COMMANDS` (name -> :class:`Command`: a function adding its arguments to an argparse sub-parser
and a function running it, which returns the exit code); what they share (calibration, output and
device flags, :func:`lowbit.cli.common.devices`) is :mod:`lowbit.cli.common`. To add one::

    # lowbit/cli/mycommand.py, imported below
    def _args(p): p.add_argument("--recipe", required=True)
    def cmd_mycommand(args) -> int: ...
    register("mycommand", "what it does", _args, cmd_mycommand)

``eval``, ``quantize``, ``allocate`` and ``run`` take ``--mesh`` / ``--distributed`` (the same flags
and setup: :func:`lowbit.cli.common.devices`).

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
    lowbit allocate --kind learned|hawq|higgs --bits 2,3,4,8 --budget-like 3 ... --out alloc.yaml
"""

from __future__ import annotations

import argparse
import os
import sys

from lowbit.cli.common import COMMANDS, Command, register
# the sub-command modules, each registering its command on import: --help lists them in this order
from lowbit.cli import evaluate, quantize, export, allocate, merge, run, paper  # isort: skip

COMMAND_MODULES = (evaluate, quantize, export, allocate, merge, run, paper)

__all__ = ["main", "register", "COMMANDS", "Command", "build_parser"]


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
