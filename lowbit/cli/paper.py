"""``lowbit paper``: regenerate the generated tables and figures of ``paper/report.md`` from the
committed results (:mod:`lowbit.runner.paper`)."""

from __future__ import annotations

import argparse

from lowbit.cli.common import register


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
