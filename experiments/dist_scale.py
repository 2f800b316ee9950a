"""Scale on paper: what layer-sequential GPTQ calibration costs per layer on a pod slice or a GPU node.

An estimate, not a measurement (no TPU or multi-GPU machine is reachable from here). For each model
shape (Llama-3-8B, Llama-3-70B) and system (TPU v5e-64, 8 x H100 SXM) it computes, per decoder layer
and for ``--nsamples x --seqlen`` calibration tokens on the data axis of ``lowbit.dist``:

- ``hessian_allreduce_mb``: the float32 Hessians all-reduced per layer (one per distinct linear input:
  q/k/v share one, o, gate/up share one, down), and the time of a ring all-reduce of them,
  ``2 (p - 1) / p * bytes / link bandwidth``;
- ``calib_mem_gib``: memory per device: this device's share of the block's input and output
  activations (float32) and of the widest captured input (down_proj's), the block's parameters
  (bfloat16, replicated), its Hessians (replicated) and one GPTQ solve's working set (W, H, R in float32);
- times per layer: the block forwards (``--passes`` full-block equivalents: the true-sequential
  captures plus the forward that feeds the next layer) and ``X^T X`` at ``--mfu`` of the bf16 / fp32
  peak, spread over all devices; the all-reduce; and the GPTQ solves, the block's 7 linears spread
  over the devices (``lowbit.dist.spread``), so the slowest single solve when there are >= 7 devices.
  A solve's time is its flops (``rows * cols^2`` lazy updates + ``cols^3 / 3`` Cholesky) at the
  fraction of the fp32 matmul peak that lowbit's GPTQ reaches on this CPU, measured here, in this run
  (``--measure``; a 4096x4096 solve against a 4096^3 matmul), or ``--solve-efficiency``.

Published peaks used (per chip / GPU): TPU v5e 197 TFLOP/s bf16, ~1/6 of it for fp32 matmuls
(bf16 multi-pass), 16 GiB HBM, 200 GB/s ICI (1,600 Gbit/s) per chip; H100 SXM 989 TFLOP/s bf16
dense, 67 TFLOP/s fp32, 80 GiB HBM, NVLink 450 GB/s per direction.

    python experiments/dist_scale.py --out paper/results/dist_scale
"""

from __future__ import annotations

import argparse
import json
import os
import time

MODELS = {   # hidden, ffn, layers, heads, kv heads, head dim
    "llama-3-8b": dict(d=4096, f=14336, layers=32, heads=32, kv=8, hd=128),
    "llama-3-70b": dict(d=8192, f=28672, layers=80, heads=64, kv=8, hd=128),
}

SYSTEMS = {   # devices, bf16 peak, fp32 matmul peak (FLOP/s), HBM bytes, link bytes/s per direction
    "tpu-v5e-64": dict(p=64, bf16=197e12, fp32=197e12 / 6, hbm=16 * 2**30, link=200e9),
    "8xh100-sxm": dict(p=8, bf16=989e12, fp32=67e12, hbm=80 * 2**30, link=450e9),
}


def linears(m: dict) -> dict[str, tuple[int, int]]:
    """``name -> (rows=out, cols=in)`` of one decoder block."""
    d, f, q, kv = m["d"], m["f"], m["heads"] * m["hd"], m["kv"] * m["hd"]
    return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
            "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}


def hessian_inputs(m: dict) -> list[int]:
    """The widths of the distinct linear inputs of a block (one Hessian each)."""
    return [m["d"], m["heads"] * m["hd"], m["d"], m["f"]]


def solve_flops(rows: int, cols: int) -> float:
    return 1.0 * rows * cols * cols + cols ** 3 / 3   # lazy updates: the triangle, 2 flops per multiply-add


def measure_solve_efficiency(n: int = 4096) -> dict:
    """lowbit's GPTQ on an ``n x n`` problem vs this machine's float32 matmul rate, same process."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lowbit import QuantSpec
    from lowbit.methods.gptq import quantize_weight

    rng = np.random.default_rng(0)
    X = rng.standard_normal((2 * n, n)).astype(np.float32)
    H = jnp.asarray(2.0 * X.T @ X / X.shape[0])
    W = jnp.asarray(rng.standard_normal((n, n)).astype(np.float32))
    spec = QuantSpec(bits=4, group_size=128)
    mm = jax.jit(lambda a, b: a @ b)

    def best(fn, k=3):
        fn()
        ts = []
        for _ in range(k):
            time.sleep(0.3)
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts)

    t_mm = best(lambda: mm(W, W).block_until_ready())
    t_gptq = best(lambda: jax.block_until_ready(quantize_weight(W, H, spec).q.data))
    matmul_rate = 2.0 * n ** 3 / t_mm
    return {"n": n, "matmul_s": t_mm, "gptq_s": t_gptq, "matmul_flops_per_s": matmul_rate,
            "gptq_flops_per_s": solve_flops(n, n) / t_gptq, "efficiency": solve_flops(n, n) / t_gptq / matmul_rate}


def estimate(model: str, system: str, *, tokens: int, passes: float, mfu: float, solve_eff: float) -> dict:
    m, s = MODELS[model], SYSTEMS[system]
    p = s["p"]
    lin = linears(m)
    block_params = sum(r * c for r, c in lin.values())
    widths = hessian_inputs(m)
    h_bytes = 4.0 * sum(w * w for w in widths)
    allreduce_s = 2.0 * (p - 1) / p * h_bytes / s["link"]
    local_tokens = tokens / p
    act = 4.0 * local_tokens * (2 * m["d"] + m["f"])         # block input + output + widest capture
    biggest = max(lin.values(), key=lambda rc: rc[0] * rc[1] + 2 * rc[1] ** 2)
    solve_ws = 4.0 * (biggest[0] * biggest[1] + 2 * biggest[1] ** 2)
    mem = act + 2.0 * block_params + h_bytes + solve_ws
    fwd_s = passes * 2.0 * block_params * tokens / (p * s["bf16"] * mfu)
    xtx_s = 2.0 * tokens * sum(w * w for w in widths) / (p * s["fp32"] * mfu)
    times = sorted((solve_flops(r, c) / (s["fp32"] * solve_eff) for r, c in lin.values()), reverse=True)
    # 7 solves round-robin over p devices: the busiest device does ceil(7 / p) of them
    per_dev = -(-len(times) // p)
    solve_s = sum(times[:per_dev])
    layer_s = fwd_s + xtx_s + allreduce_s + solve_s
    parts = {"forward": fwd_s, "xtx": xtx_s, "allreduce": allreduce_s, "gptq_solves": solve_s}
    return {"model": model, "system": system, "devices": p, "calib_tokens": tokens,
            "hessian_allreduce_mb": h_bytes / 2**20, "allreduce_ms": 1e3 * allreduce_s,
            "calib_mem_gib": mem / 2**30, "hbm_gib": s["hbm"] / 2**30,
            "forward_ms": 1e3 * fwd_s, "xtx_ms": 1e3 * xtx_s, "gptq_solves_ms": 1e3 * solve_s,
            "layer_s": layer_s, "model_min": m["layers"] * layer_s / 60, "dominant": max(parts, key=parts.get)}


def plot(rows: list[dict], path: str) -> None:
    from lowbit.plots import figure

    with figure(path, figsize=(7, 3.6)) as (fig, ax):
        labels = [f"{r['model']}\n{r['system']}" for r in rows]
        bottom = [0.0] * len(rows)
        for key, name in (("forward_ms", "block forwards"), ("xtx_ms", "X^T X"), ("allreduce_ms", "Hessian all-reduce"),
                          ("gptq_solves_ms", "GPTQ solves")):
            vals = [r[key] / 1e3 for r in rows]
            ax.bar(labels, vals, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylabel("seconds per decoder layer (estimate)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.set_title("Layer-sequential GPTQ calibration, 128 x 2048 tokens (estimate)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--passes", type=float, default=3.0, help="full-block forward equivalents per layer")
    ap.add_argument("--mfu", type=float, default=0.4, help="fraction of peak reached by forwards and X^T X")
    ap.add_argument("--solve-efficiency", type=float, default=None,
                    help="fraction of the fp32 matmul peak a GPTQ solve reaches (default: measured here)")
    ap.add_argument("--measure-size", type=int, default=4096)
    ap.add_argument("--out", default="results/dist_scale")
    args = ap.parse_args(argv)
    measured = None
    eff = args.solve_efficiency
    if eff is None:
        measured = measure_solve_efficiency(args.measure_size)
        eff = measured["efficiency"]
        print(f"GPTQ {args.measure_size}^2 here: {measured['gptq_s']:.2f} s, {eff:.1%} of the float32 matmul rate "
              f"({measured['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s)")
    rows = [estimate(mdl, sysn, tokens=args.nsamples * args.seqlen, passes=args.passes, mfu=args.mfu, solve_eff=eff)
            for mdl in MODELS for sysn in SYSTEMS]
    os.makedirs(args.out, exist_ok=True)
    doc = {"estimate": True, "assumptions": {"nsamples": args.nsamples, "seqlen": args.seqlen, "passes": args.passes,
                                             "mfu": args.mfu, "solve_efficiency": eff, "systems": SYSTEMS,
                                             "models": MODELS},
           "measured_here": measured, "rows": rows}
    tmp = os.path.join(args.out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, os.path.join(args.out, "results.json"))
    plot(rows, os.path.join(args.out, "time.png"))
    for r in rows:
        print(f"{r['model']:12s} {r['system']:11s} H all-reduce {r['hessian_allreduce_mb']:7.0f} MB "
              f"({r['allreduce_ms']:6.1f} ms) | mem/device {r['calib_mem_gib']:5.1f} GiB of {r['hbm_gib']:.0f} | "
              f"layer {r['layer_s']:6.2f} s, model {r['model_min']:6.1f} min | dominant: {r['dominant']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
