"""Fault injection for ``lowbit run``: kill the process at every write point, damage what it left,
run two at once, hand it hostile names and unwritable places; a rerun must always recover to the
metrics of an undisturbed run (issue 11, items 2, 5, 6, 7, 8, 10).

Each kill runs ``lowbit run`` in a subprocess with ``LOWBIT_CRASH_AT=<point>[:<n>]``
(:mod:`lowbit.faults`: ``os._exit(137)`` at that point, as ``kill -9`` would); the recovery run is
in-process (faster: its jit cache is warm).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from lowbit.runner import lock
from lowbit.runner.config import load_config
from lowbit.runner.experiment import experiment_dir, run_experiment, write_summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fault_cfg(tiny_experiment, tmp_path_factory):
    """The tiny experiment with two rows (fp, gptq over 2 layers), and its undisturbed results."""
    root, path = tiny_experiment
    conf = yaml.safe_load(path.read_text())
    conf["experiment"] = "faults"
    conf["methods"] = [m for m in conf["methods"] if m["name"] in ("fp", "gptq-w3g32")]
    p = tmp_path_factory.mktemp("faults") / "faults.yaml"
    p.write_text(yaml.safe_dump(conf))
    ref = tmp_path_factory.mktemp("faults-ref")
    run_experiment(load_config(str(p)), results_dir=str(ref), progress=False)
    return p, experiment_dir(load_config(str(p)), str(ref))


def _cli(args, env_extra=None, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _crash_run(cfg_path, results, point, *extra):
    r = _cli(["run", str(cfg_path), "--results", str(results), "--no-progress", *extra],
             {"LOWBIT_CRASH_AT": point})
    assert r.returncode == 137, f"crash point {point} not reached (rc {r.returncode}):\n{r.stderr[-2000:]}"
    assert f"killed at {point.split(':')[0]}" in r.stderr


def _evals(exp_dir):
    out = {}
    for mf in glob.glob(os.path.join(exp_dir, "*", "metrics.json")):
        m = json.load(open(mf))
        out[m["name"]] = {d: (v["ppl"], v["nll"]) for d, v in m["eval"].items()}
    return out


def _layer_rows(exp_dir, name):
    with open(os.path.join(exp_dir, name, "layers.csv")) as f:
        return sorted(line.split(",")[1] for line in f.read().splitlines()[1:])


def _assert_recovered(fault_cfg, results):
    cfg_path, ref_dir = fault_cfg
    cfg = load_config(str(cfg_path))
    run_experiment(cfg, results_dir=str(results), progress=False)
    d = experiment_dir(cfg, str(results))
    assert _evals(d) == _evals(ref_dir)
    assert _layer_rows(d, "gptq-w3g32") == _layer_rows(ref_dir, "gptq-w3g32")
    assert not glob.glob(os.path.join(d, ".partial-*")), "a finished row leaves no partial layers"
    assert not [p for p in glob.glob(os.path.join(d, "**", "*tmp-*"), recursive=True)]
    assert not [p for p in glob.glob(os.path.join(d, "**", ".*tmp-*"), recursive=True)]
    summary = json.load(open(os.path.join(d, "summary.json")))
    assert [r["name"] for r in summary["runs"]] == ["fp", "gptq-w3g32"] and "excluded" not in summary
    return d


# every point where `lowbit run` commits something, in the order it reaches them
# (checkpoint.* are inside lowbit.io.checkpoint: the n-th save is the n-th layer of the gptq row)
CRASH_POINTS = ["run.layer-committed:1", "checkpoint.before-swap:2", "run.layer-committed:2",
                "run.row-written", "run.row-committed", "run.summary"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_at_each_write_point_then_rerun_recovers(fault_cfg, tmp_path, point):
    _crash_run(fault_cfg[0], tmp_path, point)
    _assert_recovered(fault_cfg, tmp_path)


def test_kill_while_replacing_finished_results_keeps_them(fault_cfg, tmp_path):
    """--force over complete results, killed in the middle of swapping a row directory: the old
    row is still found (or the new one), never neither."""
    cfg_path, ref_dir = fault_cfg
    shutil.copytree(ref_dir, tmp_path / "faults")
    # saves: layer 0, layer 1 of the gptq row, then the fp row dir (1st with an old copy) ...
    _crash_run(cfg_path, tmp_path, "checkpoint.mid-swap:1", "--force")
    _assert_recovered(fault_cfg, tmp_path)


def test_damaged_partial_layer_is_discarded_and_recomputed(fault_cfg, tmp_path, capsys):
    cfg_path, _ = fault_cfg
    _crash_run(cfg_path, tmp_path, "run.layer-committed:2")
    layer1 = glob.glob(os.path.join(tmp_path, "faults", ".partial-gptq-w3g32-*", "layer_0001"))[0]
    # truncate every OCDBT data file (where the array bytes live) to half. Damaging one chosen file
    # is not enough: which hash-named file holds what varies from run to run, and a file restore
    # never reads (e.g. an unreferenced node) can be damaged harmlessly.
    victims = [p for p in glob.glob(os.path.join(layer1, "arrays", "**", "d", "*"), recursive=True)
               if os.path.isfile(p)]
    assert victims, f"no OCDBT data files under {layer1}"
    for victim in victims:
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    _assert_recovered(fault_cfg, tmp_path)
    out = capsys.readouterr().out
    assert "discarding saved layers 1.." in out and "resuming after layer 0" in out


def test_force_works_after_any_kill(fault_cfg, tmp_path):
    cfg_path, ref_dir = fault_cfg
    _crash_run(cfg_path, tmp_path, "run.layer-committed:1")
    cfg = load_config(str(cfg_path))
    run_experiment(cfg, results_dir=str(tmp_path), progress=False, force=True)
    assert _evals(experiment_dir(cfg, str(tmp_path))) == _evals(ref_dir)


def test_old_format_partial_without_rows_is_recomputed(fault_cfg, tmp_path):
    """A partial layer written by an older lowbit (rows in a separate rows.json) is not trusted."""
    cfg_path, _ = fault_cfg
    _crash_run(cfg_path, tmp_path, "run.layer-committed:1")
    layer0 = glob.glob(os.path.join(tmp_path, "faults", ".partial-gptq-w3g32-*", "layer_0000"))[0]
    extra = os.path.join(layer0, "extra.json")
    os.remove(extra)
    _assert_recovered(fault_cfg, tmp_path)


def test_concurrent_run_on_one_results_dir_is_refused(fault_cfg, tmp_path):
    cfg_path, _ = fault_cfg
    cfg = load_config(str(cfg_path))
    d = experiment_dir(cfg, str(tmp_path))
    with lock.hold(d, what="lowbit run"):
        with pytest.raises(lock.LockedError, match=r"another lowbit run holds .*faults since .* \(pid \d+ on "):
            run_experiment(cfg, results_dir=str(tmp_path), progress=False)
        r = _cli(["run", str(cfg_path), "--results", str(tmp_path), "--no-progress"])
        assert r.returncode == 2 and "another lowbit run holds" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(os.path.join(d, "summary.json")), "the refused run wrote nothing"


@pytest.mark.parametrize("name", ["../victim", "/tmp/abs", "a/b", "..", ".hidden", "", "x y"])
def test_experiment_names_cannot_escape_the_results_root(fault_cfg, tmp_path, name):
    with pytest.raises(ValueError, match="experiment=.*single file-name-safe path component"):
        load_config(str(fault_cfg[0]), overrides=[f"experiment={json.dumps(name)}"])


def test_variant_names_are_checked_too(fault_cfg, tmp_path):
    p = tmp_path / "v.yaml"
    conf = yaml.safe_load(fault_cfg[0].read_text())
    conf["variants"] = {"../x": {"seed": 1}}
    p.write_text(yaml.safe_dump(conf))
    with pytest.raises(ValueError, match="variant="):
        load_config(str(p), variant="../x")


def test_summary_leaves_out_rows_of_another_protocol(fault_cfg, tmp_path):
    """Rerunning a smaller config (fp only, 1 eval window) into a filled results dir must not put
    the gptq row (evaluated on 4 windows) into its table or its deltas."""
    cfg_path, ref_dir = fault_cfg
    shutil.copytree(ref_dir, tmp_path / "faults")
    cfg = load_config(str(cfg_path), overrides=["eval.max_windows=1", "methods=[{name: fp, method: fp}]"])
    summary = run_experiment(cfg, results_dir=str(tmp_path), progress=False)
    assert [r["name"] for r in summary["runs"]] == ["fp"]
    assert summary["excluded"] == [{"name": "gptq-w3g32", "why": "eval.max_windows 4 vs 1"}]
    md = open(os.path.join(tmp_path, "faults", "summary.md")).read()
    assert "| gptq-w3g32 |" not in md and "Not in this table" in md and "gptq-w3g32 (eval.max_windows 4 vs 1)" in md
    # eval.batch_size does not change the numbers: rows evaluated with another batch size stay
    cfg2 = load_config(str(cfg_path), overrides=["eval.batch_size=1"])
    shutil.rmtree(tmp_path / "faults" / "fp")
    shutil.copytree(os.path.join(ref_dir, "fp"), tmp_path / "faults" / "fp")
    summary = write_summary(str(tmp_path / "faults"), cfg2)
    assert [r["name"] for r in summary["runs"]] == ["fp", "gptq-w3g32"] and "excluded" not in summary


def test_bad_config_values_fail_before_anything_is_written(fault_cfg, tmp_path, monkeypatch):
    cfg_path, ref_dir = fault_cfg
    shutil.copytree(ref_dir, tmp_path / "faults")
    before = open(tmp_path / "faults" / "config.yaml").read()
    for bad, msg in (("eval.max_windows=0", "eval.max_windows=0: expected a positive integer"),
                     ("eval.max_windows=-3", "eval.max_windows=-3"),
                     ("eval.split=test", "eval.split='test': expected one of"),
                     ("calib.skip_first=-1", "calib.skip_first=-1"),
                     ("calib.token_cap=.nan", "calib.token_cap=nan")):
        with pytest.raises(ValueError, match=msg):
            load_config(str(cfg_path), overrides=[bad, "seed=5"])
    # data and sequence-length errors: found before the model is loaded / before config.yaml changes
    import lowbit.models.loaders as loaders

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(loaders, "load_model", no_load)
    cfg = load_config(str(cfg_path), overrides=[f"eval.data=[{tmp_path / 'missing.txt'}]", "seed=5"])
    with pytest.raises((ValueError, FileNotFoundError), match="missing.txt"):
        run_experiment(cfg, results_dir=str(tmp_path), progress=False)
    monkeypatch.undo()
    cfg = load_config(str(cfg_path), overrides=["eval.seqlen=100000", "seed=5"])
    with pytest.raises(ValueError, match="eval.seqlen=100000: exceeds the context"):
        run_experiment(cfg, results_dir=str(tmp_path), progress=False)
    assert open(tmp_path / "faults" / "config.yaml").read() == before


def test_cli_reports_interrupts_and_os_errors_in_one_line(fault_cfg, tmp_path, monkeypatch, capsys):
    from lowbit import cli
    from lowbit.runner import experiment

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "run_experiment", interrupted)
    assert cli.main(["run", str(fault_cfg[0]), "--results", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted; rerun the same command to resume" in err and "Traceback" not in err
    monkeypatch.undo()
    (tmp_path / "afile").write_text("x")
    # a results root under a file / on a filesystem nobody can write to (works as root too)
    for results in (str(tmp_path / "afile" / "results"), "/proc/lowbit-results"):
        assert cli.main(["run", str(fault_cfg[0]), "--results", results, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "lowbit run: error:" in err, err


def test_cli_rejects_bad_numbers_before_loading_anything(tmp_path, monkeypatch, capsys):
    from lowbit import cli
    import lowbit.models.loaders as loaders

    monkeypatch.setattr(loaders, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(SystemExit):
        cli.main(["eval", "--data", "brown", "--batch-size", "0"])
    assert "--batch-size: '0': expected a positive integer" in capsys.readouterr().err
    for damp in ("inf", "nan", "-1"):
        rc = cli.main(["quantize", "--method", "gptq", "--bits", "4", "--damp", damp, "--out", str(tmp_path / "q")])
        err = capsys.readouterr().err
        assert rc == 2 and "damp" in err and err.count("\n") == 1, err


def test_cli_checks_data_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from lowbit import cli
    import lowbit.models.loaders as loaders

    monkeypatch.setattr(loaders, "load_model", lambda *a, **k: pytest.fail("model loaded before the data check"))
    missing = str(tmp_path / "missing.txt")
    for argv in (["eval", "--data", missing], ["eval", "--data", "brown", "--split", "test"],
                 ["quantize", "--method", "rtn", "--bits", "4", "--calib", missing, "--out", str(tmp_path / "q")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("missing.txt" in err or "split" in err), err
