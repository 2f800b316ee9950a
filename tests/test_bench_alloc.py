"""experiments/bench_alloc.py on the tiny saved model: each configuration runs in its own process and
reports setup / step time, the candidates' memory (K x params x 4 bytes) and peak RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_alloc_tiny(tiny_experiment, tmp_path):
    root, _ = tiny_experiment
    out = tmp_path / "bench"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "bench_alloc.py"), "--models", str(root / "model"),
           "--data", str(root / "corpus.txt"), "--bits", "2,4", "2,3,4,8", "--group-size", "32", "--nsamples", "2",
           "--seqlen", "16", "--batch", "2", "--steps", "3", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=600)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["K"] for r in rows] == [2, 4] and rows[0]["params"] == rows[1]["params"] > 0
    assert rows[1]["cand_mib"] == 2 * rows[0]["cand_mib"] == 4 * 4 * rows[0]["params"] / 2**20
    assert all(r["step_s"] > 0 and r["setup_s"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
    assert sorted(os.listdir(out)) == ["results.csv", "results.json"]
