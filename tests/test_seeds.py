"""Seeds as an axis of an experiment: ``seeds: [...]`` (the config's, or a row's own) runs a row once
per seed, each run its own resumable directory (``<row>-s<seed>``); the summary shows the row's mean
± standard deviation with ``n``; expectations compare the mean, with a row's own tolerance; a float
perturbation of the calibration activations moves GPTQ and not RTN."""

import dataclasses
import json
import os

import numpy as np
import pytest
import yaml

from lowbit.runner.config import load_config
from lowbit.runner.experiment import experiment_dir, run_experiment


def _config(tiny_experiment, tmp_path, **over):
    root, path = tiny_experiment
    conf = yaml.safe_load(path.read_text())
    conf.update(experiment="seeds", seeds=[0, 1, 2])
    conf["methods"] = [{"name": "fp", "method": "fp", "seeds": [0]},
                       {"name": "rtn-w3g32", "method": "rtn", "quant": {"bits": 3, "group_size": 32}},
                       {"name": "gptq-w3g32", "method": "gptq", "quant": {"bits": 3, "group_size": 32}}]
    conf.update(over)
    p = tmp_path / "seeds.yaml"
    p.write_text(yaml.safe_dump(conf))
    return load_config(str(p)), conf


def _m(d, name):
    return json.load(open(os.path.join(d, name, "metrics.json")))


def test_rows_run_once_per_seed_and_the_summary_shows_the_spread(tiny_experiment, tmp_path):
    cfg, _ = _config(tiny_experiment, tmp_path)
    summary = run_experiment(cfg, results_dir=str(tmp_path / "res"), progress=False)
    d = experiment_dir(cfg, str(tmp_path / "res"))
    runs = sorted(n for n in os.listdir(d) if os.path.isfile(os.path.join(d, n, "metrics.json")))
    assert runs == ["fp-s0", "gptq-w3g32-s0", "gptq-w3g32-s1", "gptq-w3g32-s2",
                    "rtn-w3g32-s0", "rtn-w3g32-s1", "rtn-w3g32-s2"]
    (ds,) = _m(d, "fp-s0")["eval"]
    seeds = {s: _m(d, f"gptq-w3g32-s{s}") for s in range(3)}
    assert [(m["row"], m["seed"]) for m in seeds.values()] == [("gptq-w3g32", s) for s in range(3)]
    # the seed picks the calibration windows, so GPTQ's result; RTN is data-free: the same every seed
    starts = [json.load(open(os.path.join(d, f"gptq-w3g32-s{s}", "calib_windows.json")))["starts"] for s in range(3)]
    assert starts[0] != starts[1] != starts[2]
    gptq = [seeds[s]["eval"][ds]["ppl"] for s in range(3)]
    rtn = [_m(d, f"rtn-w3g32-s{s}")["eval"][ds]["ppl"] for s in range(3)]
    assert len(set(gptq)) == 3 and len(set(rtn)) == 1
    rows = {r["name"]: r for r in summary["runs"]}
    assert list(rows) == ["fp", "rtn-w3g32", "gptq-w3g32"]
    g = rows["gptq-w3g32"]
    assert g["n"] == 3 and g["seeds"] == [0, 1, 2] and g["ppl_runs"][ds] == gptq
    assert g["ppl"][ds] == pytest.approx(np.mean(gptq)) and g["ppl_std"][ds] == pytest.approx(np.std(gptq, ddof=1))
    assert rows["rtn-w3g32"]["ppl_std"][ds] == 0.0 and rows["fp"]["n"] == 1
    md = open(os.path.join(d, "summary.md")).read()
    assert "| method | n |" in md and "| gptq-w3g32 | 3 |" in md and " ± " in md and "standard deviation" in md
    assert os.path.isfile(os.path.join(d, "ppl_vs_bits.png"))
    assert len(json.load(open(os.path.join(d, "summary.json")))["seed_runs"]) == 7


def test_each_seed_run_resumes_on_its_own(tiny_experiment, tmp_path, capsys):
    cfg, _ = _config(tiny_experiment, tmp_path, seeds=[4, 5])
    cfg = dataclasses.replace(cfg, methods=cfg.methods[2:])   # the GPTQ row only
    res = str(tmp_path / "res")
    with pytest.raises(KeyboardInterrupt):   # the first run finishes, the second stops after layer 0
        run_experiment(cfg, results_dir=res, progress=False, stop_after_layer=0)
    d = experiment_dir(cfg, res)
    assert not os.path.exists(os.path.join(d, "gptq-w3g32-s4", "metrics.json"))
    capsys.readouterr()
    run_experiment(cfg, results_dir=res, progress=False)
    out = capsys.readouterr().out
    assert "gptq-w3g32-s4: resuming after layer 0" in out
    capsys.readouterr()
    run_experiment(cfg, results_dir=res, progress=False)   # both up to date now
    out = capsys.readouterr().out
    assert "gptq-w3g32-s4: up to date" in out and "gptq-w3g32-s5: up to date" in out
    # the resumed runs equal uninterrupted ones
    fresh = str(tmp_path / "fresh")
    run_experiment(cfg, results_dir=fresh, progress=False)
    for s in (4, 5):
        a, b = _m(d, f"gptq-w3g32-s{s}"), _m(experiment_dir(cfg, fresh), f"gptq-w3g32-s{s}")
        assert [(v["ppl"], v["nll"]) for v in a["eval"].values()] == [(v["ppl"], v["nll"]) for v in b["eval"].values()]


def test_expectations_compare_the_mean_with_a_rows_own_tolerance(tiny_experiment, tmp_path, capsys):
    cfg, conf = _config(tiny_experiment, tmp_path, seeds=[0, 1])
    summary = run_experiment(cfg, results_dir=str(tmp_path / "res"), progress=False)
    rows = {r["name"]: r for r in summary["runs"]}
    (ds,) = rows["gptq-w3g32"]["ppl"]
    mean = rows["gptq-w3g32"]["ppl"][ds]
    conf["expect"] = {"tolerance": 0.001, "rows": {"gptq-w3g32": {ds: mean * 1.04, "tolerance": 0.05},
                                                   "rtn-w3g32": {ds: rows["rtn-w3g32"]["ppl"][ds] * 1.04}}}
    p = tmp_path / "expect.yaml"
    p.write_text(yaml.safe_dump(conf))
    cfg = load_config(str(p))
    capsys.readouterr()
    got = run_experiment(cfg, results_dir=str(tmp_path / "res"), progress=False)["expectations"]
    by = {e["name"]: e for e in got}
    assert by["gptq-w3g32"]["ok"] and by["gptq-w3g32"]["tolerance"] == 0.05 and by["gptq-w3g32"]["n"] == 2
    assert not by["rtn-w3g32"]["ok"] and by["rtn-w3g32"]["tolerance"] == 0.001
    out = capsys.readouterr().out
    assert "over 2 seeds" in out and "1 of 2 rows depart" in out


@pytest.mark.parametrize("bad, needle", [
    ({"seeds": []}, "seeds=[]"), ({"seeds": [1, 1]}, "distinct"), ({"seeds": [-1]}, ">= 0"),
    ({"seeds": None, "methods": [{"name": "x-s0", "method": "fp"}, {"name": "x", "method": "fp", "seeds": [0]}]},
     "named twice"),
    ({"expect": {"rows": {"fp": {"tolerance": 2}}}}, "expect.rows.fp.tolerance=2")])
def test_bad_seeds_and_tolerances_are_named(tiny_experiment, tmp_path, bad, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        _config(tiny_experiment, tmp_path, **bad)


def test_a_float_perturbation_moves_gptq_and_not_the_float_model(tiny_experiment, tmp_path):
    cfg, conf = _config(tiny_experiment, tmp_path, seeds=None)
    base = run_experiment(cfg, results_dir=str(tmp_path / "a"), progress=False)
    conf["calib"]["perturb"] = 1
    p = tmp_path / "perturbed.yaml"
    p.write_text(yaml.safe_dump(conf))
    moved = run_experiment(load_config(str(p)), results_dir=str(tmp_path / "b"), progress=False)
    a, b = ({r["name"]: r["ppl"] for r in s["runs"]} for s in (base, moved))
    assert a["fp"] == b["fp"] and a["rtn-w3g32"] == b["rtn-w3g32"]   # RTN is data-free: no activations
    (ds,) = a["gptq-w3g32"]
    assert a["gptq-w3g32"] != b["gptq-w3g32"] and abs(b["gptq-w3g32"][ds] / a["gptq-w3g32"][ds] - 1) < 0.05


def test_perturb_ulp_moves_entries_by_one_ulp_at_most():
    import jax.numpy as jnp

    from lowbit.calib.driver import perturb_ulp

    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32))
    y = perturb_ulp(x, 7)
    steps = np.abs(np.asarray(y).view(np.int32).astype(np.int64) - np.asarray(x).view(np.int32).astype(np.int64))
    assert set(np.unique(steps)) == {0, 1} and 0.5 < (steps == 1).mean() < 0.8
    assert np.array_equal(np.asarray(perturb_ulp(x, 7)), np.asarray(y))
