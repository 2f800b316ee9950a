"""Remote results directories (lowbit.io.remote): a run into a URL stages locally, uploads every
committed layer and row, and a second machine (a fresh stage) resumes from what the remote holds.
The remote here is fsspec's in-memory filesystem (``memory://``): the same fsspec calls gcsfs serves
for ``gs://``."""

import json
import os

import fsspec
import pytest

from lowbit.io.remote import Mirror, default_stage, is_remote
from lowbit.runner.config import load_config
from lowbit.runner.experiment import run_experiment


@pytest.fixture
def bucket():
    """A fresh ``memory://`` bucket per test (fsspec's memory store is process-global)."""
    fs = fsspec.filesystem("memory")
    name = f"/bucket-{os.getpid()}-{id(fs)}"
    yield f"memory://{name}"
    if fs.exists(name):
        fs.rm(name, recursive=True)


def _remote_files(url):
    fs, root = fsspec.core.url_to_fs(url)
    return sorted(p[len(root.rstrip("/")) + 1:] for p in fs.find(root))


def test_is_remote_and_stage_paths(monkeypatch, tmp_path):
    assert is_remote("gs://b/p") and is_remote("memory://x") and not is_remote("results")
    assert not is_remote("file:///tmp/x") and not is_remote("/abs/path")
    monkeypatch.setenv("LOWBIT_STAGE_DIR", str(tmp_path))
    assert default_stage("gs://b/p") == default_stage("gs://b/p/") != default_stage("gs://b/q")
    assert os.path.dirname(default_stage("gs://b/p")) == str(tmp_path)
    with pytest.raises(ValueError, match="not a remote URL"):
        Mirror("results", str(tmp_path))
    with pytest.raises(ValueError, match=r"nosuchfs://: no filesystem .*|nosuchfs"):
        Mirror("nosuchfs://b/p", str(tmp_path))


def test_push_uploads_changes_commit_files_last_and_removes_what_is_gone(bucket, tmp_path):
    stage = tmp_path / "stage"
    m = Mirror(bucket + "/exp", str(stage))
    m.pull()   # nothing there yet
    (stage / "row").mkdir()
    (stage / "row" / "metrics.json").write_text("{}")
    (stage / "row" / "layers.csv").write_text("a,b\n")
    (stage / ".lock").write_text("")
    (stage / "row.tmp-1-x").mkdir()
    (stage / "row.tmp-1-x" / "half").write_text("x")
    sent = m.push()
    assert sent == ["row/layers.csv", "row/metrics.json"]       # the commit file last; locks, temps never
    assert _remote_files(bucket + "/exp") == ["row/layers.csv", "row/metrics.json"]
    assert m.push() == []                                       # nothing changed
    (stage / "row" / "layers.csv").write_text("a,b\n1,2\n")
    assert m.push() == ["row/layers.csv"]
    (stage / "row" / "layers.csv").unlink()
    assert m.push() == ["row/layers.csv"] and _remote_files(bucket + "/exp") == ["row/metrics.json"]
    # another machine: pulls what it lacks, keeps what it has at the same size
    other = Mirror(bucket + "/exp", str(tmp_path / "other"))
    assert other.pull() == ["row/metrics.json"] and other.pull() == []
    assert (tmp_path / "other" / "row" / "metrics.json").read_text() == "{}"


def _metrics(d, name):
    with open(os.path.join(d, name, "metrics.json")) as f:
        return json.load(f)


def test_a_run_into_a_url_resumes_on_another_machine(tiny_experiment, bucket, tmp_path, monkeypatch, capsys):
    """Machine A is preempted after layer 0 of the first quantized row; machine B (an empty stage)
    resumes that row from the bucket's per-layer checkpoint and finishes; the metrics equal a local
    run's."""
    root, path = tiny_experiment
    cfg = load_config(str(path), variant="small")
    url = bucket + "/results"
    monkeypatch.setenv("LOWBIT_STAGE_DIR", str(tmp_path / "machine-a"))
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, results_dir=url, progress=False, stop_after_layer=0)
    up = _remote_files(url)
    assert "tiny-small/fp/metrics.json" in up and "tiny-small/config.yaml" in up
    assert any(p.startswith("tiny-small/.partial-rtn") and "layer_0000" in p for p in up)
    assert not any(p.startswith("tiny-small/rtn-w3g32/") for p in up)

    monkeypatch.setenv("LOWBIT_STAGE_DIR", str(tmp_path / "machine-b"))
    capsys.readouterr()
    summary = run_experiment(cfg, results_dir=url, progress=False)
    out = capsys.readouterr().out
    assert "downloaded" in out and "fp: up to date" in out and "rtn-w3g32: resuming after layer 0" in out
    assert [r["name"] for r in summary["runs"]] == ["fp", "rtn-w3g32", "gptq-w3g32"]
    up = _remote_files(url)
    assert not any(".partial" in p for p in up)                  # the finished row's checkpoints are gone
    for f in ("summary.md", "summary.json", "ppl_vs_bits.png", "gptq-w3g32/metrics.json", "rtn-w3g32/layers.csv"):
        assert f"tiny-small/{f}" in up, f

    local = tmp_path / "local"
    run_experiment(cfg, results_dir=str(local), progress=False)
    stage_b = os.path.join(default_stage(url), "tiny-small")
    for n in ("fp", "rtn-w3g32", "gptq-w3g32"):   # resumed across machines == one uninterrupted local run
        want = _metrics(str(local / "tiny-small"), n)["eval"]
        assert {k: v["ppl"] for k, v in _metrics(stage_b, n)["eval"].items()} == {k: v["ppl"] for k, v in want.items()}
    fs, r = fsspec.core.url_to_fs(url + "/tiny-small/gptq-w3g32/metrics.json")
    with fs.open(r) as f:
        assert json.load(f)["eval"] == _metrics(stage_b, "gptq-w3g32")["eval"]


def test_quantize_into_a_url_and_evaluate_from_it_on_another_machine(tiny_experiment, bucket, tmp_path, monkeypatch,
                                                                     capsys):
    """``lowbit quantize --out URL`` uploads the checkpoint; ``lowbit eval --model URL`` on a machine
    with an empty stage downloads and evaluates it, with the numbers of the local checkpoint."""
    from lowbit.cli import main

    root, _ = tiny_experiment
    corpus = str(root / "corpus.txt")
    args = ["quantize", "--model", str(root / "model"), "--method", "rtn", "--bits", "4", "--group-size", "32",
            "--calib", corpus, "--nsamples", "4", "--seqlen", "32", "--no-progress"]
    monkeypatch.setenv("LOWBIT_STAGE_DIR", str(tmp_path / "a"))
    assert main(args + ["--out", bucket + "/q"]) == 0
    assert "q/manifest.json" in [f"q/{p}" for p in _remote_files(bucket + "/q")]
    assert main(args + ["--out", bucket + "/q"]) != 0
    assert "already holds files; pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "local")]) == 0
    monkeypatch.setenv("LOWBIT_STAGE_DIR", str(tmp_path / "b"))
    ev = ["eval", "--data", corpus, "--seqlen", "32", "--max-windows", "2", "--no-progress"]
    assert main(ev + ["--model", bucket + "/q", "--out", str(tmp_path / "remote.json")]) == 0
    assert main(ev + ["--model", str(tmp_path / "local"), "--out", str(tmp_path / "local.json")]) == 0
    got, want = (json.load(open(tmp_path / f))["ppl"] for f in ("remote.json", "local.json"))
    assert got == want
