"""The repository root on ``sys.path`` (Python started in the checkout, ``python -m pytest``,
``PYTHONPATH=.``) must not shadow any installed distribution: transformers >= 5 imports Hugging
Face's ``kernels`` package, which a regular package ``kernels/`` at the root would hide (the
fresh-machine failure: ``cannot import name 'CUDAProperties' from 'kernels'``)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_nothing_at_the_root_is_a_regular_package_or_module():
    shadowing = []
    for name in sorted(os.listdir(ROOT)):
        path = os.path.join(ROOT, name)
        if name.endswith(".py") or (os.path.isdir(path) and name.isidentifier()
                                    and os.path.exists(os.path.join(path, "__init__.py"))):
            shadowing.append(name)
    # lowbit itself is the one top-level import name the checkout provides on purpose
    assert shadowing == ["lowbit"], f"the repository root would shadow installed packages named {shadowing}"


_CHILD = r"""
import importlib.util, os, sys
root = sys.argv[1]
assert os.path.realpath(sys.path[0] or os.getcwd()) == os.path.realpath(root), sys.path[:3]
import torch, transformers
cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1)
model = transformers.LlamaForCausalLM(cfg)
print("logits", tuple(model(torch.zeros(1, 3, dtype=torch.long)).logits.shape))
spec = importlib.util.find_spec("kernels")
mine = os.path.join(os.path.realpath(root), "kernels")
print("kernels", "none" if spec is None else ("checkout" if spec.origin is None or
      os.path.dirname(os.path.realpath(spec.origin)) == mine else "installed"))
import lowbit.kernels.layout
print("lowbit.kernels", os.path.dirname(os.path.realpath(lowbit.kernels.layout.__file__)) == mine)
"""


def test_transformers_imports_with_the_checkout_on_sys_path():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    # `python -c` puts the working directory first on sys.path, exactly as for a user in the checkout
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", _CHILD, ROOT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert lines["logits"] == "(1, 3, 64)"
    # Hugging Face's `kernels` (a transformers dependency) when installed, never the checkout's folder
    assert lines["kernels"] in ("installed", "none"), r.stdout
    assert lines["lowbit.kernels"] == "True", r.stdout
