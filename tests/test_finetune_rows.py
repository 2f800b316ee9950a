"""Fine-tuning rows of ``lowbit run`` (LoRA / QLoRA, issue 13) on the tiny saved model: the runner
quantizes the base, trains adapters on a split the evaluation never sees, evaluates the adapter
model, and a killed training resumes."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from lowbit.runner import paper
from lowbit.runner.config import load_config
from lowbit.runner.experiment import experiment_dir, run_config, run_experiment
from lowbit.runner.config import config_hash


@pytest.fixture(scope="module")
def ft_cfg(tiny_experiment, tmp_path_factory):
    root, path = tiny_experiment
    conf = yaml.safe_load(path.read_text())
    corpus = str(root / "corpus.txt")
    conf["experiment"] = "ft"
    conf["eval"]["split"] = "eval"
    conf["finetune"] = {"data": corpus, "split": "calib", "steps": 6, "batch_size": 2, "seqlen": 32,
                        "rank": 4, "alpha": 8.0, "lr": 3e-3, "compute_dtype": "float32", "save_every": 2}
    nf4 = {"bits": 4, "group_size": 32, "format": "nf4", "symmetric": True}
    conf["methods"] = [{"name": "fp", "method": "fp"},
                       {"name": "lora-fp", "method": "fp", "finetune": True},
                       {"name": "nf4", "method": "rtn", "quant": nf4},
                       {"name": "qlora-nf4", "method": "rtn", "quant": nf4, "finetune": True}]
    p = tmp_path_factory.mktemp("ft") / "ft.yaml"
    p.write_text(yaml.safe_dump(conf))
    return p


def _m(d, name):
    with open(os.path.join(d, name, "metrics.json")) as f:
        return json.load(f)


def test_finetune_rows_train_adapters_and_improve_the_eval_loss(ft_cfg, tmp_path):
    cfg = load_config(str(ft_cfg))
    run_experiment(cfg, results_dir=str(tmp_path), progress=False)
    d = experiment_dir(cfg, str(tmp_path))
    ds = next(iter(_m(d, "fp")["eval"]))
    ppl = {n: _m(d, n)["eval"][ds]["ppl"] for n in ("fp", "lora-fp", "nf4", "qlora-nf4")}
    # the tiny model is random: a few steps on the same-distribution corpus lower held-out perplexity
    assert ppl["lora-fp"] < ppl["fp"] and ppl["qlora-nf4"] < ppl["nf4"], ppl
    ft = _m(d, "qlora-nf4")["finetune"]
    # 2 layers x 7 linears, rank 4: a (4, in) + b (out, 4) each
    assert ft["adapter_params"] == 2 * 4 * sum(i + o for i, o in ((64, 64), (64, 32), (64, 32), (64, 64),
                                                                 (64, 128), (64, 128), (128, 64)))
    assert ft["steps"] == 6 and os.path.isfile(os.path.join(d, "qlora-nf4", "train_loss.png"))
    assert "finetune" not in _m(d, "nf4")
    assert ft["train_step_mb"] > 0 and ft["train_step_memory"]["temp"] > 0
    # the report's training block: one line per fine-tuning row, the runner's combined loss figure
    assert os.path.isfile(os.path.join(d, "train_loss.png"))
    report = tmp_path / "paper" / "report.md"
    report.parent.mkdir()
    report.write_text("# r\n<!-- lowbit:training ft -->\n<!-- /lowbit -->\n")
    paper.render(str(report), results=str(tmp_path))
    text = report.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("| lora-fp") or ln.startswith("| qlora-nf4")]
    assert [ln.split(" | ")[1] for ln in lines] == ["float32", "nf4 g32"], text
    assert f"| {ft['adapter_params']:,} | 6 x 2 x 32 | 384 |" in lines[1], text
    assert "![training loss: ft](figures/ft-train_loss.png)" in text
    assert os.path.isfile(tmp_path / "paper" / "figures" / "ft-train_loss.png")
    assert not [f for f in os.listdir(d) if f.startswith(".train-")], "committed rows leave no training dirs"
    # rows that do not fine-tune do not depend on the finetune block (their results stay up to date)
    other = load_config(str(ft_cfg), overrides=["finetune.steps=7"])
    for m0, m1 in zip(cfg.methods, other.methods):
        same = config_hash(run_config(cfg, m0)) == config_hash(run_config(other, m1))
        assert same == (not m0.finetune)


def test_finetune_on_an_evaluation_split_is_refused(ft_cfg):
    with pytest.raises(ValueError, match="is an evaluation split"):
        load_config(str(ft_cfg), overrides=["finetune.split=eval"])
    with pytest.raises(ValueError, match="finetune.rank=0"):
        load_config(str(ft_cfg), overrides=["finetune.rank=0"])
