"""GPTQ and the runner on the real SmolLM2-135M and real text (slow: CI runs them with -m slow)."""

import os

import jax.numpy as jnp
import pytest

from lowbit import QuantSpec, data
from lowbit.calib.driver import default_recipe, quantize_model
from lowbit.methods.gptq import gptq
from lowbit.models.protocol import hidden_layerwise
from lowbit.methods.rtn import rtn

pytestmark = pytest.mark.slow


def test_gptq_beats_rtn_on_held_out_text(smollm2):
    """First 6 layers of SmolLM2 at 3 bits: GPTQ's hidden-state error on evaluation text (not the
    calibration windows) is below RTN's, and well below with act-order (measured: RTN 0.298, GPTQ
    0.253, GPTQ act-order 0.229; the attention-sink tokens' massive activations dominate the
    Hessians, and act-order quantizes their columns first, see paper/report.md)."""
    params, cfg, tok = smollm2
    n = 6
    small = {**params, "layers": params["layers"][:n]}
    c = cfg.replace(num_layers=n)
    calib, _ = data.calibration_windows(tok.encode(data.corpus_text("brown", "calib")[:1_500_000]), 16, 256, 0)
    held_out = data.eval_windows(tok.encode(data.corpus_text("austen", "eval")[:200_000]), 256, 4)
    spec = QuantSpec(bits=3, group_size=64)

    def hidden(p):
        return hidden_layerwise(p, held_out, c)[:, 1:]  # position 0 is the attention sink

    ref = hidden(small)
    errs = {}
    for name, method in (("rtn", rtn(spec)), ("gptq", gptq(spec)), ("gptq-ao", gptq(spec, act_order=True))):
        q, rows = quantize_model(small, c, default_recipe(method), calib, batch_size=8, progress=False)
        errs[name] = float(jnp.linalg.norm(hidden(q) - ref) / jnp.linalg.norm(ref))
        assert len(rows) == 7 * n
    assert errs["gptq"] < 0.95 * errs["rtn"], errs
    assert errs["gptq-ao"] < 0.85 * errs["rtn"], errs


def test_demo_smoke_runs_end_to_end(tmp_path):
    from lowbit.cli import main

    assert main(["run", os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"),
                 "--variant", "smoke", "--results", str(tmp_path), "--no-progress"]) == 0
    d = tmp_path / "demo-smoke"
    table = (d / "summary.md").read_text()
    for name in ("fp", "rtn-w4g128", "gptq-w4g128", "rtn-w3g128", "gptq-w3g128"):
        assert f"| {name} |" in table
        assert (d / name / "metrics.json").is_file()
    # the plot is a real PNG and the smoke metrics are sane: finite, fp best, 3 bits worse than 4
    assert (d / "ppl_vs_bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import json

    ppl = {r["name"]: r["ppl"]["brown"] for r in json.loads((d / "summary.json").read_text())["runs"]}
    assert all(1 < v < 1e4 for v in ppl.values()), ppl
    assert ppl["fp"] < ppl["rtn-w4g128"] < ppl["rtn-w3g128"], ppl
