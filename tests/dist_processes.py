"""Checks run as process ``I`` of a two-process job on localhost (tests/test_distributed.py starts
both, one CPU device each):

- ``spread``: :func:`lowbit.dist.spread` deals GPTQ solves of different shapes over the processes,
  each process solves only its own, and every process ends with every result, bit for bit the
  one-process solve;
- ``checkpoint DIR``: a tree whose linears are split by rows over a ``model`` axis spanning both
  processes is saved collectively (each process writes its shards through orbax, per-shard
  checksums) and read back whole by each process alone, equal to the gathered arrays.

    python tests/dist_processes.py PORT I spread
    python tests/dist_processes.py PORT I checkpoint DIR
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from lowbit import QuantSpec, dist
from lowbit.methods import gptq


def check_spread(me: int) -> None:
    rng = np.random.default_rng(0)   # the same problems on both processes
    items = {}
    for k, (rows, cols) in enumerate([(48, 64), (32, 64), (64, 32), (16, 96), (40, 64)]):
        x = rng.standard_normal((256, cols)).astype(np.float32)
        items[f"w{k}"] = (rng.standard_normal((rows, cols)).astype(np.float32), (2 * x.T @ x / 256).astype(np.float32))
    spec = QuantSpec(bits=3, group_size=32)
    solved = []

    def fn(w, H):
        if not isinstance(w, jax.core.Tracer):
            solved.append(w.shape)
        return gptq.solve(w, H, spec, blocksize=16, damp=0.01, act_order=False, static_groups=False,
                              zero_dead=False)

    got = dist.spread(fn, items)
    mine = sorted(k for k, (w, _) in items.items() if w.shape in solved)
    assert sorted(got) == sorted(items), sorted(got)
    for k, (w, H) in items.items():   # every result equals this process's own solve, bit for bit
        ref = gptq.quantize_weight(w, H, spec, blocksize=16)
        for a, b in zip(jax.tree.leaves(got[k]), jax.tree.leaves(ref)):
            assert np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(np.asarray(a), np.asarray(b)), k
    print(json.dumps({"process": me, "solved": mine}), flush=True)


def check_checkpoint(me: int, directory: str) -> None:
    import json
    import os

    from lowbit import quantize
    from lowbit.io import checkpoint

    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    tree = {"layer": {"q_proj": quantize(w, QuantSpec(bits=4, group_size=32)),
                      "o_proj": rng.standard_normal((48, 64)).astype(np.float32)},
            "norm": rng.standard_normal(64).astype(np.float32)}
    mesh = dist.make_mesh("data=1,model=2")
    placed = dist.shard_params(tree, mesh)
    assert checkpoint.is_collective(placed), "expected arrays split over the two processes"
    path = os.path.join(directory, "ckpt")
    checkpoint.save(path, placed, extra={"by": "both"})
    back = checkpoint.restore(path)    # each process alone, whole arrays
    want = jax.tree.map(dist.to_host, placed)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(want)):
        assert np.asarray(a).dtype == b.dtype and np.array_equal(np.asarray(a), b)
    manifest = json.load(open(os.path.join(path, "manifest.json")))["tree"]
    data = manifest["__dict__"]["layer"]["__dict__"]["q_proj"]["__dict__"]["data"]
    assert len(data["shards"]) == 2 and "sha256" not in data, data
    print(json.dumps({"process": me, "ok": "checkpoint"}), flush=True)


if __name__ == "__main__":
    port, me, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.initialize(f"127.0.0.1:{port}", 2, me, timeout_s=60)
    if mode == "spread":
        check_spread(me)
    else:
        check_checkpoint(me, sys.argv[4])
