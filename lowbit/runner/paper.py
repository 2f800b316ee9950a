"""Regenerate the tables and figures of ``paper/report.md`` from ``results/``: ``lowbit paper``.

The report is ordinary Markdown with generated blocks between markers; everything inside a block
is rewritten on every run, everything outside is prose::

    <!-- lowbit:table gptq_smollm2 -->          summary table of results/gptq_smollm2/
    <!-- /lowbit -->
    <!-- lowbit:figure gptq_smollm2 -->         its ppl_vs_bits.png, copied to paper/figures/
    <!-- /lowbit -->
    <!-- lowbit:provenance gptq_smollm2 -->     git SHA, versions, device, calibration, timings
    <!-- /lowbit -->
    <!-- lowbit:rows bench_gptq -->             the "rows" of results/bench_gptq/results.json
    <!-- /lowbit -->
    <!-- lowbit:training qlora_smollm2 -->      its fine-tuning rows (adapters, steps, loss, tokens/s,
    <!-- /lowbit -->                            memory) and their loss curves in one figure

Results are read from ``paper/results/`` by default: the small files behind every block
(``metrics.json``, ``summary.*``, per-layer CSVs, the resolved configs; no checkpoints) are
committed there, so ``lowbit paper`` on a fresh clone reproduces ``paper/report.md`` byte for byte
(a test checks it). Regenerate them with ``lowbit run CONFIG --results paper/results``.

A results root that does not exist is an error. A block whose results are missing keeps its
current content with a warning (a partial results folder never wipes the report); a block that
never had results says which command produces them.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys

from lowbit import methods

__all__ = ["render"]

_BLOCK = re.compile(r"(<!-- lowbit:(\w+) ([\w.\-/]+) -->\n)(.*?)(<!-- /lowbit -->)", re.S)


DEFAULT_RESULTS = "paper/results"


class _Missing(str):
    """The placeholder body of a block whose results are missing."""


def _missing(kind: str, name: str) -> str:
    first = name.split("/")[0]
    if (kind == "rows" or "/" in name) and not os.path.isfile(os.path.join("configs", f"{first}.yaml")):
        # an experiments/ script's results (rows, or a file it plots)
        how = f"`python experiments/{name.split('/')[0]}.py`"
    else:
        how = f"`lowbit run configs/{name.split('-')[0]}.yaml`"
    return _Missing(f"_No results for `{name}` yet: run {how}, then `lowbit paper`._\n")


def _table(results: str, name: str, **_) -> str:
    p = os.path.join(results, name, "summary.md")
    if not os.path.isfile(p):
        return _missing("table", name)
    with open(p) as f:
        return f.read()


def _figure(results: str, name: str, figures: str, report_dir: str) -> str:
    """An experiment's ``ppl_vs_bits.png``, or (``name`` = ``dir/file.png``) any plot under results/."""
    src = os.path.join(results, name) if "/" in name else os.path.join(results, name, "ppl_vs_bits.png")
    if not os.path.isfile(src):
        return _missing("figure", name)
    os.makedirs(figures, exist_ok=True)
    dst = os.path.join(figures, name.replace("/", "-") if "/" in name else f"{name}.png")
    shutil.copyfile(src, dst)
    alt = name if "/" in name else f"perplexity vs bits per parameter: {name}"
    return f"![{alt}]({os.path.relpath(dst, report_dir)})\n"


def _provenance(results: str, name: str, **_) -> str:
    metrics = sorted(glob.glob(os.path.join(results, name, "*", "metrics.json")))
    if not metrics:
        return _missing("provenance", name)
    runs = [json.load(open(m)) for m in metrics]
    env = runs[0]["environment"]
    shas = sorted({(r["environment"].get("git_sha") or "unknown")[:10]
                   + ("+dirty" if r["environment"].get("git_dirty") else "") for r in runs})
    cfg_path = os.path.join(results, name, "config.yaml")
    lines = [f"- lowbit commit(s): {', '.join(shas)}; jax {env['jax']}, jaxlib {env['jaxlib']}, "
             f"device {env['device_kind']} ({env['platform_backend']}, {env.get('cpu_count')} CPUs)"
             + (f"; CPU {env['cpu_model']} ({' '.join(env.get('isa') or []) or 'no ISA flags read'})"
                if env.get("cpu_model") else "")
             + (f"; XLA_FLAGS {env['xla_flags']}" if env.get("xla_flags") else "")]
    if os.path.isfile(cfg_path):
        import yaml

        cfg = yaml.safe_load(open(cfg_path))
        c, e = cfg["calib"], cfg["eval"]
        seeds = sorted({r["seed"] for r in runs if "seed" in r}) if any("seed" in r for r in runs) else [cfg["seed"]]
        lines.append(f"- model `{cfg['model']}`, {'seed' if len(seeds) == 1 else 'seeds'} "
                     f"{', '.join(map(str, seeds))}; calibration: {c['nsamples']} x {c['seqlen']} "
                     f"tokens from `{c['data']}` ({c['split']}, source {c['source']}); evaluation: "
                     f"{', '.join(e['data'])} ({e['split']}), seqlen {e['seqlen']}"
                     + (f", first {e['max_windows']} windows" if e.get("max_windows") else ", all windows")
                     + (", every window starts with BOS" if e.get("bos") else ""))
        lines.append(f"- reproduce: `lowbit run configs/{cfg['experiment']}.yaml"
                     + (f" --variant {cfg['variant']}`" if cfg.get("variant") else "`"))
    for r in runs:
        t = r["timings"]
        ev = ", ".join(f"{d} {v['n_windows']}x{v['seqlen']} at {v['tokens_per_s']:.0f} tok/s" for d, v in r["eval"].items())
        lines.append(f"- `{r['name']}`: quantize {t.get('quantize_s', 0):.1f} s; eval {ev}; "
                     f"peak RSS {r['peak_rss_mb']:.0f} MiB")
    return "\n".join(lines) + "\n"


def _rows(results: str, name: str, **_) -> str:
    p = os.path.join(results, name, "results.json")
    if not os.path.isfile(p):
        return _missing("rows", name)
    d = json.load(open(p))
    rows = d.get("rows", [])
    if not rows:
        return _missing("rows", name)
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    meta = d.get("meta", {})
    if meta:
        out.append("")
        out.append("_" + "; ".join(f"{k}: {v}" for k, v in meta.items()) + "_")
    return "\n".join(out) + "\n"


def _base_name(run_cfg: dict) -> str:
    """A row's base weights in words: ``float32`` or e.g. ``nf4 g64 + DQ (dynamic)``."""
    m = (run_cfg.get("methods") or [{}])[0]
    q = m.get("quant") or {}
    method = methods.METHODS.get(m.get("method"))
    if (method is not None and not method.quantizes) or not q:   # a row that keeps the float weights
        return "float32"
    fmt = q.get("format", "int")
    name = f"{fmt}{q.get('bits')}" if fmt == "int" else fmt
    name += f" g{q['group_size']}" if q.get("group_size") else ""
    if q.get("double_quant"):
        name += f" + DQ ({q.get('dq_map', 'int8')})"
    return name


def _training(results: str, name: str, figures: str, report_dir: str) -> str:
    """The training rows of experiment ``name`` (LoRA / QLoRA fine-tuning, OneBit distillation): a
    table (trained parameters, data, loss, speed, memory) and the runner's figure of every row's
    training loss (``train_loss.png``)."""
    import yaml

    from lowbit.runner.summary import train_curve

    rows = []
    for mf in glob.glob(os.path.join(results, name, "*", "metrics.json")):
        with open(mf) as f:
            m = json.load(f)
        kind = next((k for k in ("finetune", "distill") if k in m), None)
        if kind is None:
            continue
        row_dir = os.path.dirname(mf)
        with open(os.path.join(row_dir, "config.yaml")) as f:
            run_cfg = yaml.safe_load(f) or {}
        rows.append((m, run_cfg, train_curve(row_dir), kind))
    if not rows:
        return _missing("training", name)
    order = {}
    exp_cfg = os.path.join(results, name, "config.yaml")
    if os.path.isfile(exp_cfg):
        with open(exp_cfg) as f:
            order = {mm["name"]: i for i, mm in enumerate((yaml.safe_load(f) or {}).get("methods", []))}
    rows.sort(key=lambda r: (order.get(r[0]["name"], len(order)), r[0]["name"]))
    head = ["row", "base", "trained params", "steps x batch x seqlen", "tokens", "loss first 8 → last 8 steps",
            "tokens/s", "train step MiB (XLA)", "process peak RSS MiB"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    for m, run_cfg, curve, kind in rows:
        ft, fcfg = m[kind], run_cfg.get(kind, {})
        losses = [v for _, v in curve]
        mem = ft.get("train_step_mb")
        trained = ft.get("adapter_params", ft.get("trainable_params"))
        out.append("| " + " | ".join([
            m["name"], _base_name(run_cfg), f"{trained:,}",
            f"{ft['steps']} x {fcfg.get('batch_size', '?')} x {fcfg.get('seqlen', '?')}", f"{ft['tokens']:,}",
            f"{mean(losses[:8]):.3f} → {mean(losses[-8:]):.3f}" if losses else "-",
            f"{ft['tokens_per_s']:.0f}" if ft.get("tokens_per_s") else "-",
            f"{mem:,.0f}" if mem else "-", f"{ft['peak_rss_mb']:,.0f}"]) + " |")
    notes = []
    for kind in dict.fromkeys(r[3] for r in rows):
        f0 = next(r[1] for r in rows if r[3] == kind).get(kind, {})
        if kind == "finetune":
            notes.append(f"LoRA adapters r {f0.get('rank')}, alpha {f0.get('alpha')}, dropout {f0.get('dropout')}; "
                         f"AdamW lr {f0.get('lr')} (warmup {f0.get('warmup_ratio')}), clip {f0.get('clip_norm')}; "
                         f"compute {f0.get('compute_dtype')}; data `{f0.get('data')}` ({f0.get('split')}).")
        else:
            data = ("self-generated by the float model, " f"{f0.get('nsamples')} sequences" if f0.get("data") == "self"
                    else f"`{f0.get('data')}` ({f0.get('split')})")
            notes.append(f"OneBit distillation from the float model (trained: latent weights and the two value "
                         f"vectors): AdamW lr {f0.get('lr')}, {f0.get('warmup_steps')} warmup steps then cosine, "
                         f"betas (0.9, 0.98), weight decay 0.01, clip 1.0; compute {f0.get('compute_dtype')}; "
                         f"data {data}.")
    out.append("")
    out.append("_" + " ".join(notes) + " Train step MiB: XLA's allocation plan of the compiled step (inputs incl. "
               "the frozen weights, outputs, temporaries). Process peak RSS: the whole run's process up to that "
               "row (it includes earlier rows)._")
    src = os.path.join(results, name, "train_loss.png")   # written by the runner's write_summary
    if os.path.isfile(src):
        os.makedirs(figures, exist_ok=True)
        dst = os.path.join(figures, f"{name}-train_loss.png")
        shutil.copyfile(src, dst)
        out.append("")
        out.append(f"![training loss: {name}]({os.path.relpath(dst, report_dir)})")
    return "\n".join(out) + "\n"


_KINDS = {"table": _table, "figure": _figure, "provenance": _provenance, "rows": _rows, "training": _training}


def render(report: str = "paper/report.md", results: str = DEFAULT_RESULTS, figures: str | None = None) -> dict:
    """Rewrite every generated block of ``report`` in place; returns ``{name: kind}`` of the blocks
    (``kind`` suffixed ``" (kept)"`` where missing results left a block's content as it was)."""
    if not os.path.isfile(report):
        raise FileNotFoundError(f"report {report}: no such file")
    if not os.path.isdir(results):
        raise FileNotFoundError(f"results {results}: no such directory (lowbit run CONFIG --results {results})")
    report_dir = os.path.dirname(os.path.abspath(report))
    figures = figures or os.path.join(report_dir, "figures")
    with open(report) as f:
        text = f.read()
    done = {}

    def sub(m):
        kind, name = m.group(2), m.group(3)
        if kind not in _KINDS:
            raise ValueError(f"{report}: unknown block kind {kind!r} (expected one of {sorted(_KINDS)})")
        body = _KINDS[kind](results=results, name=name, figures=figures, report_dir=report_dir)
        old = m.group(4)
        if isinstance(body, _Missing) and old.strip() and not old.startswith("_No results for"):
            print(f"lowbit paper: warning: no results for {kind} {name!r} under {results}/; "
                  "kept the block as it was", file=sys.stderr)
            done[f"{kind}:{name}"] = kind + " (kept)"
            return m.group(0)
        done[f"{kind}:{name}"] = kind
        return m.group(1) + body + m.group(5)

    new = _BLOCK.sub(sub, text)
    tmp = f"{report}.tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, report)
    return done
