"""Where the calibration Hessians of SmolLM2 get their energy: the attention-sink token.

Runs the floating-point model over calibration windows (the demo's: Brown calib split, seed 0) and,
for every layer, measures the inputs of two linears (``q_proj``: the attention RMSNorm output;
``down_proj``: the SwiGLU product) per token:

* ``max/median``: the largest per-token input norm over the median one;
* ``argmax pos``: the window position of that token (0 = the first token of the window);
* ``pos0 share``: the fraction of the Hessian trace ``sum_t ||x_t||^2`` (GPTQ's ``H = 2 X X^T`` up
  to scale) that comes from the tokens at position 0, one token in ``seqlen``.

A large share means the GPTQ objective of that layer is dominated by a handful of tokens whose
activations look nothing like the rest: the error correction then serves those tokens first.

    python experiments/activation_outliers.py --nsamples 8 --seqlen 512 --out results/activation_outliers

Writes ``results.json`` (rows + meta, for ``lowbit paper``), ``results.csv`` and ``outliers.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import numpy as np

LINEARS = ("self_attn/q_proj", "mlp/down_proj")


def measure(params, cfg, windows) -> list[dict]:
    import jax.numpy as jnp

    from lowbit.models import llama

    x = llama.embed(params, jnp.asarray(windows), cfg)
    rows = []
    for i, layer in enumerate(params["layers"]):
        x, inputs = llama.block_jit(layer, x, cfg, capture=True)
        row = {"layer": i}
        for path in LINEARS:
            sq = np.asarray(jnp.sum(jnp.square(inputs[path].astype(jnp.float32)), axis=-1))  # (B, T)
            norms = np.sqrt(sq)
            flat = norms.reshape(-1)
            short = path.split("/")[1].removesuffix("_proj")
            row[f"{short} max/median"] = float(flat.max() / np.median(flat))
            row[f"{short} argmax pos"] = int(np.unravel_index(flat.argmax(), norms.shape)[1])
            row[f"{short} pos0 share"] = float(sq[:, 0].sum() / sq.sum())
        rows.append(row)
        print(f"layer {i:2d}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if k != "layer"),
              file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="brown")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/activation_outliers")
    args = ap.parse_args(argv)

    from lowbit import data
    from lowbit.io.records import environment_info
    from lowbit.models.loaders import load_model
    from lowbit.io.checkpoint import atomic_directory

    params, cfg, tok = load_model(args.model)
    windows, starts = data.calibration_windows(tok.encode(data.corpus_text(args.data, "calib")),
                                               args.nsamples, args.seqlen, args.seed)
    rows = measure(params, cfg, windows)
    meta = {"model": args.model, "data": f"{args.data} calib", "windows": f"{args.nsamples} x {args.seqlen}",
            "seed": args.seed, "uniform pos0 share": f"{1 / args.seqlen:.2g}",
            "command": "python experiments/activation_outliers.py " + " ".join(argv or sys.argv[1:])}
    with atomic_directory(args.out) as tmp:
        with open(os.path.join(tmp, "results.json"), "w") as f:
            json.dump({"rows": rows, "meta": meta, "environment": environment_info()}, f, indent=1)
        with open(os.path.join(tmp, "results.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        _plot(rows, args.seqlen, os.path.join(tmp, "outliers.png"))
    print(f"wrote {args.out}/results.json, results.csv, outliers.png")
    return 0


def _plot(rows, seqlen: int, path: str) -> None:
    from lowbit.plots import figure

    layers = [r["layer"] for r in rows]
    with figure(path, figsize=(10, 3.6), ncols=2) as (fig, ax):
        for short in ("q", "down"):
            ax[0].plot(layers, [r[f"{short} pos0 share"] for r in rows], marker="o", ms=3, label=f"{short}_proj input")
            ax[1].semilogy(layers, [r[f"{short} max/median"] for r in rows], marker="o", ms=3, label=f"{short}_proj input")
        ax[0].axhline(1 / seqlen, color="gray", ls=":", label="uniform (1/seqlen)")
        ax[0].set(xlabel="layer", ylabel="share of Hessian trace", title="tokens at position 0")
        ax[1].set(xlabel="layer", ylabel="max / median token norm", title="largest token vs typical")
        for a in ax:
            a.legend(fontsize=8)
            a.grid(alpha=0.3)


if __name__ == "__main__":
    sys.exit(main())
