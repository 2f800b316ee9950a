"""GPTQ speed, side by side on the same saved (W, H): lowbit (JAX, jit) vs a straightforward PyTorch GPTQ.

The PyTorch baseline below is the textbook algorithm written the usual way (the structure of the
reference implementation: Python loop over the columns of each block, in-place rank-1 updates, a
lazy matmul per block, float32, same dampening and the same asymmetric min/max group quantizer).
Both run in one process on the same CPU, interleaved repetition by repetition, on the same ``(W, H)`` saved to ``--out/problem_<n>.npz``,
and we report wall time (median of ``--repeats`` after one warm-up; lowbit's first call, which
includes compilation, is reported separately) and the output error ``||(W - Q) X^T|| / ||W X^T||``
of each, so a faster but wrong implementation cannot hide.

    python experiments/bench_gptq.py --sizes 1024 4096 --out results/bench_gptq

Writes ``results.json``, ``results.csv`` and prints a table. Needs torch (``pip install -e .[torch]``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time

import numpy as np


def torch_gptq(W, H, bits: int, groupsize: int, blocksize: int = 128, percdamp: float = 0.01):
    """Straightforward PyTorch GPTQ (asymmetric min/max groups), returns the dequantized weight."""
    import torch

    W = W.clone().float()
    H = H.clone().float()
    cols = W.shape[1]
    maxq = 2**bits - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)

    def params(block):
        lo = torch.clamp(block.min(dim=1).values, max=0)
        hi = torch.clamp(block.max(dim=1).values, min=0)
        degenerate = (lo == 0) & (hi == 0)
        lo[degenerate], hi[degenerate] = -1, 1
        scale = (hi - lo) / maxq
        return scale, torch.round(-lo / scale)

    scale = zero = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % groupsize == 0:
                scale, zero = params(W1[:, i:i + groupsize])
            w = W1[:, i]
            q = (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero) * scale
            Q[:, i1 + i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


def make_problem(n: int, path: str, tokens: int = 4096, seed: int = 0):
    """Correlated heavy-tailed inputs -> H = 2/N X^T X; W ~ N(0, 1). Saved once, reused by both."""
    if os.path.exists(path):
        d = np.load(path)
        return d["W"], d["H"], d["X"]
    rng = np.random.default_rng(seed)
    Z = rng.standard_t(3.0, size=(tokens, n // 8)).astype(np.float32)
    Xfull = Z @ rng.standard_normal((n // 8, n)).astype(np.float32)
    Xfull += 0.2 * rng.standard_normal((tokens, n)).astype(np.float32)
    H = ((2.0 / tokens) * Xfull.T @ Xfull).astype(np.float32)
    X = Xfull[:1024]  # kept for the output-error check only
    W = rng.standard_normal((n, n)).astype(np.float32)
    np.savez(path, W=W, H=H, X=X)
    return W, H, X


def _rel_out_err(W, Q, X):
    return float(np.linalg.norm((W - Q) @ X.T) / np.linalg.norm(W @ X.T))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results/bench_gptq")
    args = ap.parse_args(argv)

    import jax
    import torch

    from lowbit import QuantSpec, dequantize
    from lowbit.methods.gptq import quantize_weight

    os.makedirs(args.out, exist_ok=True)
    spec = QuantSpec(bits=args.bits, group_size=args.group_size)
    rows = []
    for n in args.sizes:
        W, H, X = make_problem(n, os.path.join(args.out, f"problem_{n}.npz"))

        def run_lowbit():  # timed up to the packed QuantizedTensor (torch's loop stops at a float Q)
            r = quantize_weight(W, H, spec)
            jax.block_until_ready(r.q.data)
            return r.q

        t0 = time.perf_counter()
        run_lowbit()
        first = time.perf_counter() - t0
        Wt, Ht = torch.from_numpy(W), torch.from_numpy(H)
        torch_gptq(Wt[:64], Ht, args.bits, args.group_size)  # warm-up (allocator, kernels)
        tl, tt = [], []
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            t0 = time.perf_counter()
            q = run_lowbit()
            tl.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            Qt = torch_gptq(Wt, Ht, args.bits, args.group_size).numpy()
            tt.append(time.perf_counter() - t0)

        Ql = np.asarray(dequantize(q))
        row = dict(n=n, bits=args.bits, group_size=args.group_size,
                   lowbit_s=statistics.median(tl), lowbit_min_s=min(tl), lowbit_max_s=max(tl),
                   lowbit_first_call_s=first, torch_s=statistics.median(tt), torch_min_s=min(tt),
                   torch_max_s=max(tt), speedup=statistics.median(tt) / statistics.median(tl),
                   lowbit_rel_out_err=_rel_out_err(W, Ql, X), torch_rel_out_err=_rel_out_err(W, Qt, X))
        rows.append(row)
        print(f"n={n}: lowbit {row['lowbit_s']:.3f}s (first call {first:.2f}s) | torch {row['torch_s']:.3f}s | "
              f"speedup {row['speedup']:.2f}x | rel. output error lowbit {row['lowbit_rel_out_err']:.4f} "
              f"torch {row['torch_rel_out_err']:.4f}", flush=True)

    meta = dict(jax=jax.__version__, torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                cores=os.cpu_count(), torch_threads=torch.get_num_threads(), device=str(jax.devices()[0]),
                command="python experiments/bench_gptq.py " + " ".join(sys.argv[1:] if argv is None else argv))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("\n| n | lowbit s | torch s | speedup | lowbit err | torch err |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['lowbit_s']:.3f} | {r['torch_s']:.3f} | {r['speedup']:.2f}x | "
              f"{r['lowbit_rel_out_err']:.4f} | {r['torch_rel_out_err']:.4f} |")


if __name__ == "__main__":
    main()
