"""The runner's figures: per-layer errors of a row (``layers.png``), the experiment's perplexity
against bits per parameter (``ppl_vs_bits.png``), the training rows' loss curves
(``train_loss.png``) and the distilled rows' perplexity during training (``ppl_vs_steps.png``)."""

from __future__ import annotations

import re

import numpy as np

from lowbit.plots import figure

__all__ = ["plot_layers", "plot_summary", "plot_training", "plot_ppl_steps", "smooth"]


def plot_layers(rows: list[dict], path: str, title: str) -> None:
    """Relative output error of every quantized weight, per layer and linear kind."""
    with figure(path, figsize=(8, 4)) as (fig, ax):
        kinds = sorted({r["path"].split("/", 2)[-1] for r in rows if r["layer"] >= 0})
        for k in kinds:
            pts = sorted((r["layer"], r["rel_out_err"]) for r in rows if r["path"].endswith(k) and r["layer"] >= 0)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=k)
        ax.set_xlabel("layer")
        ax.set_ylabel("relative output error ||X(W-Q)^T|| / ||XW^T||")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize=7, ncol=2)


def plot_summary(runs: list[dict], datasets: list[str], path: str, title: str) -> None:
    """Perplexity against bits per parameter, one panel per dataset: the reference row (bits
    ``None``) as a dashed line, a recipe run at several sizes as a coloured curve, a recipe at one
    size as a grey-scale point; rows run with several seeds at their mean, with the standard
    deviation as an error bar."""
    with figure(path, figsize=(5.5 * len(datasets), 4), ncols=len(datasets), squeeze=False) as (fig, axes):
        for ax, ds in zip(axes[0], datasets):
            by_kind: dict[str, list] = {}  # one line per recipe: the row name without its "-w4g128" suffix
            for r in runs:
                if ds not in r["ppl"]:
                    continue
                if r["bits"] is None:   # a row that does not quantize: the reference
                    ax.axhline(r["ppl"][ds], ls="--", color="k", label=f"{r['name']} ({r['ppl'][ds]:.2f})")
                else:
                    m = re.match(r"(.+)-(w\d+(?:g\d+)?)$", r["name"])
                    kind, spec = (m.group(1), m.group(2)) if m else (r["name"], r["name"])
                    by_kind.setdefault(kind, []).append((r["linear_bits_per_param"], r["ppl"][ds], spec,
                                                         r.get("ppl_std", {}).get(ds, 0.0)))
            labelled = set()
            # a recipe run at several sizes is a curve (solid, a colour of its own); a recipe at one size
            # only is a point (grey-scale marker shapes, so that the curves keep the colours)
            curves = sorted(k for k, pts in by_kind.items() if len(pts) > 1)
            points = sorted(k for k, pts in by_kind.items() if len(pts) == 1)
            for kind in curves + points:
                pts = sorted(by_kind[kind])
                style = dict(marker="o") if kind in curves else dict(
                    marker="xs^vD<>ph*"[points.index(kind) % 10], ls="none",
                    color=str(0.1 + 0.5 * points.index(kind) / max(len(points), 1)))
                stds = [p[3] for p in pts]
                if any(stds):   # rows run with several seeds: their mean +- the standard deviation
                    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=stds, capsize=3, label=kind, **style)
                else:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=kind, **style)
                for x, y, spec, _ in pts:
                    if spec not in labelled:  # the bit/group setting, once per x position
                        labelled.add(spec)
                        ax.annotate(spec, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_yscale("log")
            ax.set_xlabel("bits per parameter (quantized linears, incl. scales/zeros)")
            ax.set_ylabel(f"perplexity ({ds})")
            ax.set_title(f"{title}: {ds}")
            ax.legend(fontsize=8)


def smooth(xs: list[float], k: int) -> list[float]:
    """Trailing mean over ``k`` points (the first points average what exists)."""
    c = np.cumsum(np.asarray(xs, dtype=np.float64))
    return [float((c[i] - (c[i - k] if i >= k else 0.0)) / min(i + 1, k)) for i in range(len(xs))]


def plot_training(curves: dict[str, list[tuple[int, float]]], path: str, title: str) -> None:
    """Every training row's loss in one figure: per step (faint) and an 8-step mean."""
    with figure(path, figsize=(8, 4)) as (fig, ax):
        for i, (name, curve) in enumerate(curves.items()):
            steps, losses = [s for s, _ in curve], [v for _, v in curve]
            ax.plot(steps, losses, color=f"C{i}", alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth(losses, 8), color=f"C{i}", label=name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (nats/token)")
        ax.set_title(f"{title}: training loss (faint: per step; solid: 8-step mean)")
        ax.legend(fontsize=8)


def plot_ppl_steps(runs: dict[str, dict], path: str, title: str) -> None:
    """Perplexity of each distilled row's model on its curve windows vs optimizer step (step 0: the
    start point), with the teacher on the same windows."""
    with figure(path, figsize=(7, 4)) as (fig, ax):
        for i, (name, r) in enumerate(runs.items()):
            steps, ppl = zip(*r["ppl_curve"])
            ax.plot(steps, ppl, "o-", color=f"C{i}", label=name)
            if r.get("ppl_curve_teacher"):
                ax.axhline(r["ppl_curve_teacher"], ls="--", color=f"C{i}", alpha=0.6,
                           label=f"teacher ({r['ppl_curve_teacher']:.2f})")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("perplexity (curve windows)")
        ax.set_title(f"{title}: perplexity during distillation")
        ax.legend(fontsize=8)
