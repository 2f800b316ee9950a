"""experiments/bench_gptq.py: the per-layer comparison (lowbit vs the reference-structured and the
tight PyTorch GPTQ, with per-call memory from fresh processes) and the whole-model comparison
(lowbit's driver vs the reference's llama_sequential pipeline in transformers) on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "experiments", "bench_gptq.py")


def _load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gptq", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reference_structured_torch_gptq_matches_lowbit():
    """The reference-structured PyTorch GPTQ and lowbit's GPTQ quantize the same problem to the same
    grid points (group size = block size: the reference's quantizer refit on W is then exact)."""
    torch = pytest.importorskip("torch")
    from lowbit import QuantSpec, dequantize
    from lowbit.methods.gptq import quantize_weight

    bench = _load_bench()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((512, 256)).astype(np.float32) @ rng.standard_normal((256, 256)).astype(np.float32)
    H = (2.0 / 512 * X.T @ X).astype(np.float32)
    W = rng.standard_normal((48, 256)).astype(np.float32)
    q_ref, losses = bench.torch_gptq_reference(torch.from_numpy(W), torch.from_numpy(H), 4, 128)
    res = quantize_weight(W, H, QuantSpec(bits=4, group_size=128, scale_dtype="float32"))
    q = np.asarray(dequantize(res.q))
    assert np.mean(np.isclose(q, q_ref.numpy(), atol=1e-4)) > 0.99
    np.testing.assert_allclose(float(losses.sum()), float(res.losses.sum()), rtol=1e-2)
    assert bench.parse_shape("4096x14336") == (4096, 14336) and bench.parse_shape("8") == (8, 8)
    with pytest.raises(SystemExit, match="ROWSxCOLS"):
        bench.parse_shape("4096x")
    for bad in (-1, 0, 96, 256):
        with pytest.raises(SystemExit, match="divisor of the block size"):
            bench._check_group_size(bad)


def test_bench_layers_writes_times_errors_and_memory(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "b"
    subprocess.run([sys.executable, BENCH, "--shapes", "32x128", "--group-size", "32", "--repeats", "2",
                    "--out", str(out)], check=True, cwd=ROOT, timeout=600)
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert (row["rows"], row["cols"]) == (32, 128)
    for k in ("lowbit", "torch_ref", "torch"):
        assert row[f"{k}_s"] > 0 and row[f"{k}_peak_mib"] >= 0
    # lowbit and the tight version fit each group on the corrected weights; the reference refits
    # groups that start inside a block on the not-yet-corrected ones (a small, known difference)
    assert row["lowbit_rel_out_err"] == pytest.approx(row["torch_rel_out_err"], rel=0.02)
    assert row["torch_ref_rel_out_err"] == pytest.approx(row["torch_rel_out_err"], rel=0.1)
    assert row["lowbit_first_call_peak_mib"] > 0
    assert (out / "results.csv").read_text().startswith("rows,cols,")


def test_bench_whole_model_pipelines_agree(tiny_experiment, tmp_path):
    pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    root, _ = tiny_experiment
    out = tmp_path / "m"
    subprocess.run([sys.executable, BENCH, "--model", str(root / "model"), "--calib", str(root / "corpus.txt"),
                    "--eval", str(root / "corpus.txt"), "--nsamples", "4", "--seqlen", "32", "--eval-seqlen", "32",
                    "--eval-windows", "4", "--batch-size", "2", "--bits", "3", "--group-size", "64",
                    "--out", str(out)], check=True, cwd=ROOT, timeout=600)
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["calib"] == "4x32" and row["lowbit_s"] > 0 and row["torch_s"] > 0
    assert row["lowbit_peak_mib"] >= 0 and row["torch_peak_mib"] >= 0
    # Same windows, weights and algorithm. Block 0's inputs are the same embeddings, so its linears
    # whose groups start at block starts (64 input columns, one group) must come out equal up to
    # float rounding of the Hessians (a causal-mask, Hessian or data mistake on either side breaks this).
    lb, tq = load_file(str(out / "prep" / "lowbit_q.safetensors")), load_file(str(out / "prep" / "torch_q.safetensors"))
    assert set(lb) == set(tq) and len(lb) == 14
    for name in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj", "mlp/gate_proj",
                 "mlp/up_proj"):
        a, b = lb[f"layers/0/{name}"], tq[f"layers/0/{name}"]
        assert np.mean(np.isclose(a, b, rtol=1e-4, atol=1e-6)) > 0.98, name
    assert abs(row["ppl_rel_diff"]) < 0.02, row


def test_baseline_mode_times_lowbit_against_another_checkout(tmp_path):
    """``--baseline DIR``: this checkout as its own baseline gives the same packed codes."""
    pytest.importorskip("torch")
    bench = _load_bench()
    ns = type("A", (), dict(baseline=ROOT, shapes=["48x256"], bits=4, group_size=128, repeats=1, out=str(tmp_path)))
    (row,) = bench.bench_baseline(ns)
    assert row["packed_words_equal"] == 1.0 and row["lowbit_s"] > 0 and row["baseline_s"] > 0
    with pytest.raises(SystemExit, match="no lowbit/methods/gptq_core.py or gptq.py"):
        bench._gptq_module_from(str(tmp_path))
