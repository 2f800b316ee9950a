"""experiments/bench_qlora.py on the tiny saved model: each base trains in its own process, the
packed base's bytes agree with ``bits_per_param``, and QLoRA's step needs less memory than LoRA's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_qlora_tiny(tiny_experiment, tmp_path):
    root, _ = tiny_experiment
    out = tmp_path / "bench"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "bench_qlora.py"), "--model", str(root / "model"),
           "--data", str(root / "corpus.txt"), "--bases", "fp", "nf4", "--batch", "2", "--seqlen", "16",
           "--rank", "4", "--steps", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=600)
    d = json.loads((out / "results.json").read_text())
    lora, qlora = d["rows"]
    assert (lora["method"], qlora["method"]) == ("LoRA", "QLoRA")
    # 4 + 0.127 on real layers; the tiny layers hold one partly filled double-quantization block each
    assert lora["base bits/param"] == 32.0 and 4.127 < qlora["base bits/param"] < 4.5
    assert qlora["base MiB"] < lora["base MiB"] / 7
    assert lora["adapter params"] == qlora["adapter params"] > 0
    assert qlora["memory vs LoRA"] < 1.0 and lora["memory vs LoRA"] == 1.0 and qlora["step s"] > 0
    assert sorted(os.listdir(out)) == ["results.csv", "results.json"]
