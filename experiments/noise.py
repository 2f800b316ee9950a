"""How far GPTQ's numbers move with the seed and with nothing but the float order (the README demo's
rows on SmolLM2-135M), and what that makes a fair tolerance.

Runs ``configs/noise_smollm2.yaml`` (each step resumable; finished rows are reused):

1. the seed runs: GPTQ w4g128 / w3g128 (act-order) with seeds 0..4, fp and RTN once;
2. the float runs: seed 0 with the calibration activations moved by one ulp (``calib.perturb`` 1..4,
   variants ``perturb1`` .. ``perturb4``), which with the unperturbed seed-0 run make 5 samples of
   float-order noise alone;
3. the device runs: seed 0 of GPTQ w3g128 on 8 (fake) devices, data-parallel (variant ``mesh8``, in a
   process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``), with the Hessians summed as
   one batch (the default) and window by window in a fixed order (``gptq.hessian: windows``; its
   one-device reference is the variant ``windows1``).

and writes ``OUT/results.json`` (one row per GPTQ row and kind of noise: n, mean, standard deviation,
relative spread, min / max; the device comparison) and ``OUT/noise.png`` (every run's perplexity).

    python experiments/noise.py --results paper/results --out paper/results/noise
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "noise_smollm2.yaml")
ROWS = ("gptq-w4g128", "gptq-w3g128")
DATASET = "brown"


def _run(results: str, variant: str | None = None, devices: int = 1) -> None:
    cmd = [sys.executable, "-m", "lowbit.cli", "run", CONFIG, "--results", results, "--no-progress"]
    if variant:
        cmd += ["--variant", variant]
    env = dict(os.environ)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        env["JAX_PLATFORMS"] = "cpu"
    print("+", " ".join(cmd[2:]), f"({devices} device(s))", flush=True)
    subprocess.run(cmd, env=env, check=True)


def _ppl(results: str, experiment: str, run: str) -> float:
    with open(os.path.join(results, experiment, run, "metrics.json")) as f:
        return float(json.load(f)["eval"][DATASET]["ppl"])


def _stats(values: list[float]) -> dict:
    v = np.asarray(values, np.float64)
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"n": len(v), "mean": float(v.mean()), "std": std, "rel_std": std / float(v.mean()),
            "min": float(v.min()), "max": float(v.max()), "spread": float((v.max() - v.min()) / v.mean())}


def collect(results: str) -> dict:
    rows, plot = [], {}
    for row in ROWS:
        seeds = [_ppl(results, "noise_smollm2", f"{row}-s{s}") for s in range(5)]
        floats = [seeds[0]] + [_ppl(results, f"noise_smollm2-perturb{k}", row) for k in range(1, 5)]
        plot[row] = {"seeds": seeds, "float": floats}
        for kind, vals in (("seeds 0-4", seeds), ("float order (seed 0, perturb 0-4)", floats)):
            rows.append({"row": row, "noise": kind, **_stats(vals)})
    one, eight = _ppl(results, "noise_smollm2", "gptq-w3g128-s0"), _ppl(results, "noise_smollm2-mesh8", "gptq-w3g128")
    w1 = _ppl(results, "noise_smollm2-windows1", "gptq-w3g128-windows")
    w8 = _ppl(results, "noise_smollm2-mesh8", "gptq-w3g128-windows")
    devices = [{"hessian": "batch", "one_device": one, "eight_devices": eight, "rel_diff": eight / one - 1},
               {"hessian": "windows", "one_device": w1, "eight_devices": w8, "rel_diff": w8 / w1 - 1}]
    return {"rows": rows, "devices": devices, "runs": plot,
            "meta": {"config": "configs/noise_smollm2.yaml", "dataset": DATASET,
                     "std": "sample standard deviation (n - 1)", "rel_std": "std / mean",
                     "spread": "(max - min) / mean"}}


def plot(res: dict, path: str) -> None:
    sys.path.insert(0, ROOT)
    from lowbit.plots import figure

    with figure(path, figsize=(8, 3.6), ncols=len(ROWS)) as (fig, axes):
        for ax, row in zip(np.atleast_1d(axes), ROWS):
            r = res["runs"][row]
            ax.plot([0] * len(r["seeds"]), r["seeds"], "o", color="C0", label="seeds 0-4")
            ax.plot([1] * len(r["float"]), r["float"], "s", color="C1", label="seed 0, float perturbations")
            if row == "gptq-w3g128":
                for i, d in enumerate(res["devices"]):
                    ax.plot([2 + i], [d["eight_devices"]], "^", color="C2" if i == 0 else "C3",
                            label=f"seed 0 on 8 devices ({d['hessian']} Hessian)")
            ax.set_xticks(range(4 if row == "gptq-w3g128" else 2),
                          ["seeds", "float", "8 dev.", "8 dev. (win.)"][:4 if row == "gptq-w3g128" else 2])
            ax.set_ylabel(f"perplexity ({DATASET})")
            ax.set_title(row, fontsize=9)
            ax.legend(fontsize=6)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="paper/results", help="lowbit run's results root")
    ap.add_argument("--out", default="paper/results/noise")
    ap.add_argument("--collect-only", action="store_true", help="only read the finished runs")
    args = ap.parse_args(argv)
    if not args.collect_only:
        _run(args.results)
        for k in range(1, 5):
            _run(args.results, f"perturb{k}")
        _run(args.results, "windows1")
        _run(args.results, "mesh8", devices=8)
    res = collect(args.results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    plot(res, os.path.join(args.out, "noise.png"))
    for r in res["rows"]:
        print(f"{r['row']:>12} {r['noise']:<36} n={r['n']} mean {r['mean']:.3f} std {r['std']:.3f} "
              f"({100 * r['rel_std']:.2f}%), range {100 * r['spread']:.2f}%")
    for d in res["devices"]:
        print(f"1 vs 8 devices, {d['hessian']} Hessian: {d['one_device']:.3f} vs {d['eight_devices']:.3f} "
              f"({100 * d['rel_diff']:+.3f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
