"""Mixed-precision recipes (lowbit.alloc.recipe): exact byte costs, the YAML file round trip, bad
files, and ``lowbit quantize --recipe`` / ``lowbit run`` rows with ``recipe:`` on the tiny model."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import yaml

from lowbit.alloc import DENSE, Recipe, load_recipe, save_recipe, spec_bytes
from lowbit.alloc.recipe import MixedSpec
from lowbit.core.mixed import MixedWidthWeight
from lowbit.core.qtensor import QuantizedTensor, QuantSpec
from lowbit.core.quantizers import bits_per_param, quantize


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=128, partial_groups=True),
                                  QuantSpec(bits=3, group_size=None, symmetric=True),
                                  QuantSpec(bits=2, group_size=64), QuantSpec.qlora_nf4(),
                                  QuantSpec(bits=1, format="onebit", group_size=None)])
def test_spec_bytes_is_exactly_what_quantize_stores(spec):
    w = jax.random.normal(jax.random.key(0), (192, 576))
    assert spec_bytes(spec, (192, 576)) == round(bits_per_param(quantize(w, spec)) * 192 * 576 / 8)
    assert spec_bytes(None, (192, 576)) == 2 * 192 * 576


def test_recipe_file_round_trips(tmp_path):
    r = Recipe({"layers/0/mlp/up_proj": QuantSpec(bits=4, group_size=128, partial_groups=True),
                "layers/0/mlp/down_proj": None,
                "layers/1/self_attn/q_proj": QuantSpec(bits=3, group_size=32, partial_groups=True, symmetric=True),
                "layers/1/self_attn/k_proj": MixedSpec(QuantSpec(bits=8, group_size=64), (2, 8, 3))},
               method="rtn")
    path = save_recipe(r, str(tmp_path / "r.yaml"), comment="made by a test\nsecond line")
    text = open(path).read()
    assert text.startswith("# made by a test\n# second line\n") and "layers/0/mlp/down_proj: dense" in text
    assert "- 8" in text and "group_size: 64" in text   # a width per column group: a list of bits
    assert load_recipe(path) == r


@pytest.mark.parametrize("doc, match", [
    ({"format": "other", "version": 1, "weights": {}}, "format: lowbit-recipe"),
    ({"format": "lowbit-recipe", "version": 1, "weights": {"a": {"bits": 9}}}, "bits=9"),
    ({"format": "lowbit-recipe", "version": 1, "weights": {"a": "fp8"}}, "expected 'dense'"),
    ({"format": "lowbit-recipe", "version": 1, "method": "fp", "weights": {"a": DENSE}}, "does not quantize"),
    ({"format": "lowbit-recipe", "version": 1, "weights": {"a": {"bits": 4}}, "extra": 1}, "unknown keys"),
    ({"format": "lowbit-recipe", "version": 1, "weights": {}}, "non-empty"),
    ({"format": "lowbit-recipe", "version": 1, "weights": {"a": {"bits": [3, 9], "group_size": 64}}}, "widths in 1..8"),
    ({"format": "lowbit-recipe", "version": 1, "weights": {"a": {"bits": [3, 4], "group_size": None}}}, "group-wise int"),
    ({"format": "lowbit-recipe", "version": 1, "method": "awq", "weights": {"a": {"bits": [3, 4], "group_size": 64}}},
     "needs method gptq or rtn"),
    ({"format": "lowbit-recipe", "version": 1, "gptq": {"act_order": True},
      "weights": {"a": {"bits": [3, 4], "group_size": 64}}}, "act_order: false"),
])
def test_bad_recipe_files_are_named(tmp_path, doc, match):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=match):
        load_recipe(str(p))


def test_recipe_naming_unknown_paths_is_refused():
    params = {"layers": [{"mlp": {"up_proj": np.zeros((8, 4), np.float32)}}]}
    r = Recipe({"layers/0/mlp/up_proj": None, "layers/7/mlp/gate_proj": QuantSpec(bits=4, group_size=None)})
    with pytest.raises(ValueError, match=r"unknown weight paths \['layers/7/mlp/gate_proj'\].*layers/0/mlp/up_proj"):
        r.check(params)


def _recipe_for(root, tmp_path) -> str:
    """A mixed recipe over the tiny model: 2-bit q_proj and down_proj of block 0, 8-bit elsewhere in
    block 0, block 1's MLP dense, block 1's attention unlisted (stays dense)."""
    w = {}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        w[f"layers/0/self_attn/{name}"] = QuantSpec(bits=2 if name == "q_proj" else 8, group_size=32,
                                                    partial_groups=True)
    for name in ("gate_proj", "up_proj", "down_proj"):
        w[f"layers/0/mlp/{name}"] = QuantSpec(bits=2 if name == "down_proj" else 8, group_size=32,
                                              partial_groups=True)
        w[f"layers/1/mlp/{name}"] = None
    w["layers/0/mlp/gate_proj"] = MixedSpec(QuantSpec(bits=8, group_size=32, partial_groups=True),
                                            tuple([2, 8, 3, 4, 2, 3, 8, 8][:-(-_hidden(root) // 32)]))
    return save_recipe(Recipe(w, method="gptq"), str(tmp_path / "mixed.yaml"))


def _hidden(root) -> int:
    from lowbit.models.loaders import load_model

    return int(load_model(str(root / "model"))[0]["layers"][0]["mlp"]["gate_proj"].shape[1])


def test_quantize_and_run_accept_a_recipe(tiny_experiment, tmp_path):
    from lowbit.cli import main
    from lowbit.models.loaders import load_model
    from lowbit.runner.config import load_config
    from lowbit.runner.experiment import experiment_dir, run_experiment

    root, path = tiny_experiment
    recipe = _recipe_for(root, tmp_path)
    ckpt = str(tmp_path / "q")
    assert main(["quantize", "--model", str(root / "model"), "--recipe", recipe, "--calib", str(root / "corpus.txt"),
                 "--nsamples", "4", "--seqlen", "32", "--out", ckpt, "--no-progress"]) == 0
    params, _, _ = load_model(ckpt)
    q = params["layers"][0]["self_attn"]["q_proj"]
    assert isinstance(q, QuantizedTensor) and q.bits == 2
    assert params["layers"][0]["mlp"]["up_proj"].bits == 8
    gate = params["layers"][0]["mlp"]["gate_proj"]   # a width per column group, saved and loaded back
    assert isinstance(gate, MixedWidthWeight) and gate.widths == load_recipe(recipe).weights["layers/0/mlp/gate_proj"].widths
    assert not isinstance(params["layers"][1]["mlp"]["up_proj"], QuantizedTensor)
    assert not isinstance(params["layers"][1]["self_attn"]["q_proj"], QuantizedTensor)
    # a lowbit run row with the recipe: the table says "mixed", the row depends on the recipe's content
    conf = yaml.safe_load(path.read_text())
    conf["experiment"] = "mixed"
    conf["methods"] = [{"name": "fp", "method": "fp"}, {"name": "mixed", "method": "gptq", "recipe": recipe}]
    p = tmp_path / "mixed-exp.yaml"
    p.write_text(yaml.safe_dump(conf))
    cfg = load_config(str(p))
    run_experiment(cfg, results_dir=str(tmp_path / "res"), progress=False)
    m = json.load(open(os.path.join(experiment_dir(cfg, str(tmp_path / "res")), "mixed", "metrics.json")))
    assert m["bits"] == "mixed" and m["size"]["n_quantized"] == 7
    row = os.path.join(experiment_dir(cfg, str(tmp_path / "res")), "mixed")
    assert load_recipe(os.path.join(row, "recipe.yaml")) == load_recipe(recipe)   # the allocation, as run
    assert os.path.isfile(os.path.join(row, "bits.png"))
    conf["methods"][1]["method"] = "rtn"
    p.write_text(yaml.safe_dump(conf))
    with pytest.raises(ValueError, match="recipe .* is for 'gptq'"):
        run_experiment(load_config(str(p)), results_dir=str(tmp_path / "res2"), progress=False)
