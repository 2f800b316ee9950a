"""Every shipped experiment config (configs/*.yaml) and each of its variants loads and validates
(methods registered, options typed, names safe) without touching a model."""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from lowbit.runner.config import load_config

CONFIGS = sorted(p for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml"))
                 if not os.path.basename(p).startswith("_"))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_says_what_it_reproduces_and_checks_only_its_own_rows(path):
    """A config opens with the table it reproduces and the command (big_vision style), has a smoke
    variant, every row it expects a number of is one of its rows, and the README's report section
    gives its command."""
    name = os.path.splitext(os.path.basename(path))[0]
    head = []
    for line in open(path):
        if not line.startswith("#"):
            break
        head.append(line)
    text = "".join(head)
    assert "Reproduces:" in text and f"configs/{name}.yaml" in text, f"{path}: no Reproduces / Run header"
    assert "smoke" in (yaml.safe_load(open(path)).get("variants") or {}), f"{path}: no smoke variant"
    cfg = load_config(path)
    assert set(cfg.expect.rows or {}) <= {m.name for m in cfg.methods}
    assert f"configs/{name}.yaml" in open(os.path.join(ROOT, "README.md")).read()


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_and_variants_load(path):
    cfg = load_config(path)
    assert cfg.methods and cfg.experiment == os.path.splitext(os.path.basename(path))[0]
    for variant in (yaml.safe_load(open(path)).get("variants") or {}):
        assert load_config(path, variant=variant).variant == variant


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_recipe_a_config_names_is_shipped_and_valid(path):
    from lowbit.alloc import load_recipe

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for m in load_config(path).methods:
        if m.recipe is not None:
            r = load_recipe(os.path.join(root, m.recipe))
            assert r.method == m.method, (m.name, r.method)
