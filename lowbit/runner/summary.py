"""An experiment's summary, rebuilt from its finished rows: ``summary.{json,csv,md}``, the
figures (:mod:`lowbit.runner.plots`), the table printed at the end of ``lowbit run`` and the check
of the config's expectations.

A summary table only holds rows evaluated under the config's protocol (model, data, split, seqlen,
windows, BOS); other rows are named below the table. The reference row of the "Δ vs fp" columns is
the first row that does not quantize (``bits`` null in its ``metrics.json``).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os

import numpy as np
import yaml

from lowbit.faults import crash_point
from lowbit.io.records import write_json, write_text
from lowbit.runner.config import EvalCfg, ExperimentCfg, from_dict, to_dict
from lowbit.runner.log import log
from lowbit.runner.plots import plot_ppl_steps, plot_summary, plot_training

__all__ = ["write_summary", "check_expectations", "print_table", "train_curve"]


def train_curve(row_dir: str) -> list[tuple[int, float]]:
    """``(step, loss)`` of a row's ``train_metrics.csv`` (the training run's metrics.csv, read by
    :func:`lowbit.train.read_metrics`); empty when the row did not train."""
    path = os.path.join(row_dir, "train_metrics.csv")
    if not os.path.isfile(path):
        return []
    from lowbit.train.loop import read_metrics

    return [(r["step"], r["loss"]) for r in read_metrics(path)]


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v >= 1000 else f"{v:.2f}"


def _signed(v: float) -> str:
    """A difference with its sign: ``+10.60``, ``-0.59``, ``+0.00``."""
    return ("-" if v < 0 else "+") + _fmt(abs(v))


def _protocol(run_config: dict) -> dict:
    """What makes two rows' perplexities comparable: the model and the evaluation settings (not
    ``eval.batch_size``, which does not change the numbers); missing keys read as their defaults."""
    ev = to_dict(from_dict(EvalCfg, dict(run_config.get("eval") or {}), "eval"))
    ev.pop("batch_size", None)
    return {"model": run_config.get("model"), "eval": ev}


def _protocol_diff(a: dict, b: dict) -> str:
    diffs = [f"model {a['model']} vs {b['model']}"] if a["model"] != b["model"] else []
    diffs += [f"eval.{k} {a['eval'].get(k)!r} vs {b['eval'].get(k)!r}" for k in sorted(a["eval"])
              if a["eval"].get(k) != b["eval"].get(k)]
    return ", ".join(diffs)


def _rows_of(runs: list[dict]) -> list[dict]:
    """The table's rows: a run as it is, and the runs of a row with several seeds (``row`` in their
    metrics) as one entry of means, with ``n``, ``seeds``, ``runs`` and the per-dataset ``ppl_std``
    (sample standard deviation) and ``ppl_runs``."""
    out, groups = [], {}
    for r in runs:
        if "row" not in r:
            out.append(r)
            continue
        if r["row"] not in groups:
            groups[r["row"]] = []
            out.append(groups[r["row"]])
        groups[r["row"]].append(r)
    rows = []
    for item in out:
        if isinstance(item, dict):
            rows.append(item)
            continue
        item = sorted(item, key=lambda r: (r.get("seed") is None, r.get("seed")))
        first, n = item[0], len(item)
        mean = lambda xs: float(np.mean(xs))
        common = [d for d in first["ppl"] if all(d in r["ppl"] for r in item)]
        agg = {"name": first["row"], "method": first["method"], "bits": first["bits"], "group_size": first["group_size"],
               "n": n, "seeds": [r.get("seed") for r in item], "runs": [r["name"] for r in item],
               "linear_bits_per_param": mean([r["linear_bits_per_param"] for r in item]),
               "size_mb": mean([r["size_mb"] for r in item]),
               "quantize_s": mean([r["quantize_s"] or 0.0 for r in item]),
               "ppl": {d: mean([r["ppl"][d] for r in item]) for d in common},
               "ppl_std": {d: float(np.std([r["ppl"][d] for r in item], ddof=1)) if n > 1 else 0.0 for d in common},
               "ppl_runs": {d: [r["ppl"][d] for r in item] for d in common},
               "bpb": {d: mean([r["bpb"][d] for r in item]) for d in common if all(d in r["bpb"] for r in item)},
               "ppl_curve": None, "ppl_curve_teacher": None}
        rows.append(agg)
    return rows


def write_summary(exp_dir: str, cfg: ExperimentCfg | None = None) -> dict:
    """Rebuild ``summary.{json,csv,md}`` and ``ppl_vs_bits.png`` from the run directories present.

    With ``cfg``, rows evaluated under another protocol than ``cfg``'s (another model, eval data,
    split, seqlen, window count or BOS setting: e.g. left over from an earlier config) are left out
    of the table and of the "Δ vs fp" columns, and named in a note below it.
    """
    runs, excluded = [], []
    want = _protocol(to_dict(cfg)) if cfg is not None else None
    for mf in sorted(glob.glob(os.path.join(exp_dir, "*", "metrics.json"))):
        try:
            with open(mf) as f:
                m = json.load(f)
        except (OSError, ValueError) as e:
            log(f"warning: skipping {mf}: unreadable ({e})")
            continue
        if want is not None:
            rc = os.path.join(os.path.dirname(mf), "config.yaml")
            try:
                with open(rc) as f:
                    got = _protocol(yaml.safe_load(f) or {})
            except (OSError, ValueError, yaml.YAMLError):
                got = None
            if got != want:
                why = "no readable config.yaml" if got is None else _protocol_diff(got, want)
                excluded.append({"name": m.get("name", os.path.basename(os.path.dirname(mf))), "why": why})
                continue
        runs.append({"name": m["name"], "method": m["method"], "bits": m.get("bits"),
                     "group_size": m.get("group_size"), "linear_bits_per_param": m["size"]["linear_bits_per_param"],
                     "size_mb": m["size"]["size_mb"], "quantize_s": m["timings"].get("quantize_s"),
                     "ppl": {d: v["ppl"] for d, v in m["eval"].items()},
                     "bpb": {d: v["bits_per_byte"] for d, v in m["eval"].items() if "bits_per_byte" in v},
                     "ppl_curve": (m.get("distill") or {}).get("ppl_curve"),
                     "ppl_curve_teacher": (m.get("distill") or {}).get("ppl_curve_teacher"),
                     **({"row": m["row"], "seed": m.get("seed")} if m.get("row", m["name"]) != m["name"] else {})})
    seed_runs = runs
    runs = _rows_of(runs)
    if cfg is not None:  # table order = config order
        order = {mm.name: i for i, mm in enumerate(cfg.methods)}
        runs.sort(key=lambda r: order.get(r["name"], len(order)))
    datasets = sorted({d for r in runs for d in r["ppl"]})
    fp = next((r for r in runs if r["bits"] is None), None)   # the first row that does not quantize
    spread = any("n" in r for r in runs)
    header = ["method"] + (["n"] if spread else []) + ["bits", "group", "bits/param", "size MB"]
    header += [f"ppl {d}" for d in datasets]
    header += [f"Δ vs fp {d}" for d in datasets] if fp else []
    bpb_sets = [d for d in datasets if any(d in r["bpb"] for r in runs)]
    header += [f"bits/byte {d}" for d in bpb_sets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table = []
    for r in runs:
        row = [r["name"]] + ([r.get("n", 1)] if spread else [])
        row += [r["bits"] if r["bits"] is not None else "16", r["group_size"] or "-",
                f"{r['linear_bits_per_param']:.3f}", f"{r['size_mb']:.1f}"]
        row += [_fmt(r["ppl"].get(d)) + (f" ± {_fmt(r['ppl_std'][d])}" if d in r.get("ppl_std", {}) else "")
                for d in datasets]
        if fp:
            row += [_signed(r["ppl"][d] - fp["ppl"][d]) if d in r["ppl"] and d in fp["ppl"] else "-"
                    for d in datasets]
        row += [f"{r['bpb'][d]:.4f}" if d in r["bpb"] else "-" for d in bpb_sets]
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
        table.append(dict(zip(header, row)))
    md = "\n".join(lines) + "\n"
    if spread:
        md += ("\nA row run with several seeds (n) shows the mean over its runs ± their standard deviation "
               "(sample, n - 1); its Δ and bits per byte are of the means.\n")
    if excluded:
        md += ("\nNot in this table (evaluated under another protocol than this config's; rerun them "
               "with this config to include them): "
               + "; ".join(f"{e['name']} ({e['why']})" for e in excluded) + ".\n")
        log(f"left out of the table (another evaluation protocol): {', '.join(e['name'] for e in excluded)}")
    summary = {"experiment": os.path.basename(exp_dir), "datasets": datasets, "runs": runs}
    if spread:
        summary["seed_runs"] = seed_runs
    if excluded:
        summary["excluded"] = excluded
    crash_point("run.summary")
    write_json(os.path.join(exp_dir, "summary.json"), summary)
    write_text(os.path.join(exp_dir, "summary.md"), md)
    if table:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=header)
        w.writeheader()
        w.writerows(table)
        write_text(os.path.join(exp_dir, "summary.csv"), buf.getvalue())
        plot_summary(runs, datasets, os.path.join(exp_dir, "ppl_vs_bits.png"), os.path.basename(exp_dir))
    # training rows (fine-tuning, distillation): their training curves side by side
    curves = {r["name"]: train_curve(os.path.join(exp_dir, r["name"])) for r in seed_runs}
    if any(curves.values()):
        plot_training({k: v for k, v in curves.items() if v}, os.path.join(exp_dir, "train_loss.png"),
                       os.path.basename(exp_dir))
    ppl_curves = {r["name"]: r for r in seed_runs if r.get("ppl_curve")}
    if ppl_curves:
        plot_ppl_steps(ppl_curves, os.path.join(exp_dir, "ppl_vs_steps.png"), os.path.basename(exp_dir))
    summary["markdown"] = md
    return summary


def check_expectations(cfg: ExperimentCfg, summary: dict) -> list[dict]:
    """Compare each row's perplexities with the config's ``expect`` block; prints one line per
    expectation (``ok`` / ``DEPARTS``) and returns them. Rows evaluated under another protocol
    than the config's (e.g. a ``smoke`` variant) are not compared."""
    rows = (cfg.expect.rows or {}) if cfg.variant is None else {}
    out = []
    by_name = {r["name"]: r for r in summary["runs"]}
    for name in rows:
        tol = cfg.expect.tolerance_of(name)
        for ds, ppl in cfg.expect.expected(name).items():
            r = by_name.get(name, {})
            got = r.get("ppl", {}).get(ds)
            rel = None if got is None else got / ppl - 1
            ok = rel is not None and abs(rel) <= tol
            out.append({"name": name, "data": ds, "expected": ppl, "tolerance": tol, "got": got, "rel": rel, "ok": ok,
                        **({"n": r["n"], "std": r["ppl_std"].get(ds)} if "n" in r else {})})
            status = "ok" if ok else "DEPARTS"
            got_s = "missing" if got is None else f"{got:.3f} ({rel:+.2%})"
            if got is not None and "n" in r:
                got_s = f"mean {got:.3f} ± {r['ppl_std'].get(ds, 0.0):.3f} over {r['n']} seeds ({rel:+.2%})"
            log(f"expect {name} {ds}: {ppl:.3f} +-{tol:.{0 if tol * 100 == round(tol * 100) else 1}%}, got {got_s}: "
                f"{status}")
    if out and not all(e["ok"] for e in out):
        log(f"{sum(not e['ok'] for e in out)} of {len(out)} rows depart from the config's expectations")
    return out


def print_table(summary: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(summary["markdown"])
        return
    lines = [ln for ln in summary["markdown"].splitlines() if ln.strip()]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    t = Table(title=f"lowbit: {summary['experiment']}")
    for c in header:
        t.add_column(c, justify="left" if c == "method" else "right")
    for ln in lines[2:]:
        t.add_row(*[c.strip() for c in ln.strip("|").split("|")])
    Console().print(t)

