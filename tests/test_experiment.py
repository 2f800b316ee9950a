"""The config -> results runner and the paper generator, end to end on a tiny saved model."""

import json
import os

import jax
import pytest

from lowbit.runner import paper
from lowbit.runner.config import load_config
from lowbit.runner.experiment import experiment_dir, run_experiment

@pytest.fixture(scope="module")
def setup(tiny_experiment):
    return tiny_experiment


def _metrics(d, name):
    with open(os.path.join(d, name, "metrics.json")) as f:
        return json.load(f)


def test_run_writes_results_and_is_reproducible(setup, tmp_path):
    root, path = setup
    cfg = load_config(str(path))
    summary = run_experiment(cfg, results_dir=str(tmp_path), progress=False)
    d = experiment_dir(cfg, str(tmp_path))
    assert [r["name"] for r in summary["runs"]] == ["fp", "rtn-w3g32", "gptq-w3g32"]
    for f in ("summary.md", "summary.csv", "summary.json", "ppl_vs_bits.png", "config.yaml"):
        assert os.path.isfile(os.path.join(d, f)), f
    for f in ("metrics.json", "config.yaml", "layers.csv", "layers.png", "calib_windows.json"):
        assert os.path.isfile(os.path.join(d, "gptq-w3g32", f)), f
    m = _metrics(d, "gptq-w3g32")
    assert m["environment"]["jax"] == jax.__version__ and "git_sha" in m["environment"]
    assert m["size"]["linear_bits_per_param"] < 4 and m["eval"][str(setup[0] / "corpus.txt")]["n_windows"] == 4
    starts = json.load(open(os.path.join(d, "gptq-w3g32", "calib_windows.json")))["starts"]
    assert len(starts) == 8
    # same config + seed -> identical metrics, recomputed from scratch
    first = {n: _metrics(d, n)["eval"] for n in ("fp", "rtn-w3g32", "gptq-w3g32")}
    run_experiment(cfg, results_dir=str(tmp_path), progress=False, force=True)
    for n in first:
        for k, v in _metrics(d, n)["eval"].items():
            assert v["ppl"] == first[n][k]["ppl"] and v["nll"] == first[n][k]["nll"]
    assert json.load(open(os.path.join(d, "gptq-w3g32", "calib_windows.json")))["starts"] == starts
    # the paper generator fills its blocks from these results
    report = tmp_path / "report.md"
    report.write_text("intro\n<!-- lowbit:table tiny -->\nstale\n<!-- /lowbit -->\n"
                      "<!-- lowbit:figure tiny -->\n<!-- /lowbit -->\n<!-- lowbit:provenance tiny -->\n<!-- /lowbit -->\n"
                      "<!-- lowbit:table nothing -->\n<!-- /lowbit -->\n"
                      "<!-- lowbit:figure tiny/gptq-w3g32/layers.png -->\n<!-- /lowbit -->\n"
                      "<!-- lowbit:figure bench_x/plot.png -->\n<!-- /lowbit -->\n")
    paper.render(str(report), results=str(tmp_path))
    text = report.read_text()
    assert "stale" not in text and "| gptq-w3g32 |" in text and "figures/tiny.png" in text
    assert "No results for `nothing`" in text and text.startswith("intro\n")
    assert os.path.isfile(tmp_path / "figures" / "tiny.png")
    assert "figures/tiny-gptq-w3g32-layers.png" in text and os.path.isfile(tmp_path / "figures" / "tiny-gptq-w3g32-layers.png")
    assert "run `python experiments/bench_x.py`" in text


def test_failed_run_keeps_earlier_results_and_resume_from_a_layer(setup, tmp_path):
    root, path = setup
    cfg = load_config(str(path), variant="small")
    run_experiment(load_config(str(path), variant="small", overrides=["methods=[{name: fp, method: fp}]"]),
                   results_dir=str(tmp_path), progress=False)
    d = experiment_dir(cfg, str(tmp_path))
    before = open(os.path.join(d, "fp", "metrics.json")).read()
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, results_dir=str(tmp_path), progress=False, stop_after_layer=0)
    assert open(os.path.join(d, "fp", "metrics.json")).read() == before      # fp reused, untouched
    partial = [p for p in os.listdir(d) if p.startswith(".partial-rtn")]
    assert partial and not os.path.exists(os.path.join(d, "rtn-w3g32"))
    run_experiment(cfg, results_dir=str(tmp_path), progress=False)          # resumes after layer 0
    assert not [p for p in os.listdir(d) if p.startswith(".partial")]
    resumed = {n: _metrics(d, n)["eval"] for n in ("rtn-w3g32", "gptq-w3g32")}
    run_experiment(cfg, results_dir=str(tmp_path / "fresh"), progress=False)
    fresh_dir = experiment_dir(cfg, str(tmp_path / "fresh"))
    for n, ev in resumed.items():
        for k, v in ev.items():
            assert v["ppl"] == _metrics(fresh_dir, n)["eval"][k]["ppl"]


def test_config_errors(setup, tmp_path):
    root, path = setup
    with pytest.raises(ValueError, match="calib.nsample: unknown key"):
        load_config(str(path), overrides=["calib.nsample=3"])
    with pytest.raises(ValueError, match="variants"):
        load_config(str(path), variant="huge")
    with pytest.raises(ValueError, match="methods.0.method=.spqr."):
        load_config(str(path), overrides=["methods.0.method=spqr"])
    with pytest.raises(FileNotFoundError):
        load_config(str(tmp_path / "nope.yaml"))
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ValueError, match="circular"):
        load_config(str(tmp_path / "loop.yaml"))


def test_cli_quantize_eval_export(setup, tmp_path, capsys):
    from lowbit.cli import main

    root, _ = setup
    corpus, ckpt, hf = str(root / "corpus.txt"), str(tmp_path / "q"), str(tmp_path / "hf")
    assert main(["quantize", "--model", str(root / "model"), "--method", "gptq", "--bits", "4", "--group-size", "32",
                 "--act-order", "--calib", corpus, "--nsamples", "4", "--seqlen", "32", "--out", ckpt,
                 "--no-progress"]) == 0
    assert os.path.isfile(os.path.join(ckpt, "layers.csv"))
    assert main(["eval", "--model", ckpt, "--data", corpus, "--seqlen", "32", "--max-windows", "2",
                 "--out", str(tmp_path / "e.json"), "--no-progress"]) == 0
    assert json.load(open(tmp_path / "e.json"))["ppl"] > 1
    assert main(["export", ckpt, "--format", "gptq", "--out", hf]) == 0
    qc = json.load(open(os.path.join(hf, "config.json")))["quantization_config"]
    assert qc["bits"] == 4 and qc["desc_act"] is True and qc["damp_percent"] == 0.01
    assert main(["quantize", "--model", str(root / "model"), "--method", "rtn", "--bits", "9", "--out", ckpt]) == 2
    assert "bits=9" in capsys.readouterr().err


def test_expectations_are_checked_row_by_row(setup, capsys):
    from lowbit.runner.summary import check_expectations

    root, path = setup
    cfg = load_config(str(path), overrides=["expect={tolerance: 0.05, rows: {fp: {corpus: 10.0}, "
                                            "rtn-w3g32: {corpus: 20.0}, gone: {corpus: 5.0}}}"])
    summary = {"runs": [{"name": "fp", "ppl": {"corpus": 10.2}}, {"name": "rtn-w3g32", "ppl": {"corpus": 25.0}}]}
    got = {(e["name"], e["ok"]) for e in check_expectations(cfg, summary)}
    assert got == {("fp", True), ("rtn-w3g32", False), ("gone", False)}
    out = capsys.readouterr().out
    assert "DEPARTS" in out and "2 of 3 rows depart" in out
    # a variant runs another protocol: its rows are not held to the main expectations
    small = load_config(str(path), variant="small", overrides=["expect={rows: {fp: {corpus: 10.0}}}"])
    assert check_expectations(small, summary) == []
    with pytest.raises(ValueError, match="expect.rows.fp.corpus"):
        load_config(str(path), overrides=["expect={rows: {fp: {corpus: -1}}}"])


def test_delta_column_signs():
    """The "Δ vs fp" column writes a row better than fp as -0.59, not +-0.59."""
    from lowbit.runner.summary import _signed

    assert (_signed(-0.59), _signed(10.6), _signed(0.0), _signed(-1234.5)) == ("-0.59", "+10.60", "+0.00", "-1.23e+03")
