"""One protocol for every weight kind (lowbit.core.nodes): each registered kind has a matmul
(lowbit.ops.register_matmul) and a checkpoint form that round-trips; a manifest names kinds, never
modules, so loading a file imports nothing it names; checkpoints written before the registry
(manifest version 2, tests/data/ckpt_v2_nodes, written by lowbit 219da49) still load and compute
what they computed then."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit
from lowbit import QuantSpec
from lowbit.core import nodes
from lowbit.core.lora import LoraWeight
from lowbit.core.mixed import quantize_mixed
from lowbit.io import checkpoint
from lowbit.methods import llm_int8, onebit
from lowbit.ops import kernel_format

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _w(shape=(8, 64), seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 0.05


def _samples():
    """One node of every built-in kind."""
    w = _w()
    qt = lowbit.quantize(w, QuantSpec(bits=4, group_size=32))
    return {"qtensor": qt,
            "mixed": quantize_mixed(w, QuantSpec(bits=4, group_size=32), (2, 4)),
            "int8": llm_int8.quantize_weight(w, threshold=6.0),
            "onebit": onebit.pack({"x": onebit.init_weight(w, svid_method="svd")}, "float16")["x"],
            "lora": LoraWeight(qt, _w((2, 64), 1), _w((8, 2), 2), None, 0.5, 2, 0.0),
            "kernel": kernel_format.to_kernel_layout(qt)}


def test_every_registered_kind_has_a_matmul_and_round_trips(tmp_path):
    samples = _samples()
    builtin = {n for n in nodes.kind_names() if nodes.get_kind(n).cls.__module__.startswith("lowbit.")}
    assert set(samples) == builtin, "a new built-in weight-node kind needs a sample here"
    x = jax.random.normal(jax.random.key(3), (3, 64))
    p = checkpoint.save(str(tmp_path / "ck"), samples)
    back = checkpoint.restore(p)
    for name, node in samples.items():
        assert nodes.kind_of(node).name == name
        assert type(back[name]) is type(node)
        y = np.asarray(lowbit.ops.linear(x, node))
        assert y.shape == (3, 8)
        np.testing.assert_array_equal(np.asarray(lowbit.ops.linear(x, back[name])), y, err_msg=name)
    man = json.load(open(os.path.join(p, "manifest.json")))
    assert {v["__node__"] for v in man["tree"]["__dict__"].values()} == set(samples)
    assert "lowbit." not in json.dumps(man)   # no module or class path in the file


def test_opaque_kinds_are_leaves_and_lora_is_walked_into():
    from lowbit.core.transforms import flatten

    s = _samples()
    flat = flatten({"a": s["int8"], "l": s["lora"]})
    assert set(flat) == {"a", "l/base", "l/a", "l/b"}
    assert not nodes.is_opaque(s["lora"]) and all(nodes.is_opaque(s[k]) for k in s if k != "lora")


def test_a_checkpoint_written_before_the_registry_still_loads():
    p = os.path.join(DATA, "ckpt_v2_nodes")
    assert json.load(open(os.path.join(p, "manifest.json")))["version"] == 2
    want = json.load(open(p + ".expected.json"))
    tree = checkpoint.restore(p)
    assert {k: type(v).__name__ for k, v in tree.items()} == {
        "dense": "ArrayImpl", "qt": "QuantizedTensor", "int8": "Int8Weight", "onebit": "OneBitWeight",
        "mixed": "MixedWidthWeight", "lora": "LoraWeight", "list": "list"}
    x = jnp.asarray(want["x"], jnp.float32)
    for name, y in want["y"].items():
        np.testing.assert_allclose(np.asarray(lowbit.ops.linear(x, tree[name])), np.asarray(y, np.float32),
                                   rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("version", [2, 3])
def test_a_manifest_naming_a_module_imports_nothing(tmp_path, monkeypatch, version):
    # a module on sys.path whose import would leave a trace
    (tmp_path / "lowbit_side_effect_probe.py").write_text("import os\nopen(os.environ['PROBE'], 'w').close()\n"
                                                         "class Thing: pass\n")
    probe = tmp_path / "imported"
    monkeypatch.setenv("PROBE", str(probe))
    monkeypatch.syspath_prepend(str(tmp_path))
    p = checkpoint.save(str(tmp_path / "ck"), {"w": _samples()["int8"]})
    mf = os.path.join(p, "manifest.json")
    man = json.load(open(mf))
    node = man["tree"]["__dict__"]["w"]
    if version == 2:
        entry = {"__qmatrix__": {"type": "lowbit_side_effect_probe:Thing", "meta": {}}, "__dict__": node["__dict__"]}
    else:
        entry = {**node, "__node__": "lowbit_side_effect_probe:Thing"}
    man["tree"]["__dict__"]["w"] = entry
    man["version"] = version
    json.dump(man, open(mf, "w"))
    with pytest.raises(checkpoint.CheckpointError, match="lowbit_side_effect_probe:Thing"):
        checkpoint.restore(p)
    assert not probe.exists() and "lowbit_side_effect_probe" not in sys.modules


def test_register_node_refuses_a_second_class_under_one_kind():
    class Other:
        def ckpt_fields(self):
            return {}, {}

        from_ckpt = classmethod(lambda cls, fields, meta: cls())

    with pytest.raises(ValueError, match="already registered"):
        nodes.register_node("int8", Other)
    with pytest.raises(ValueError, match="not a registered weight-node kind"):
        nodes.get_kind("no-such-kind")


def test_linear_names_a_weight_without_a_matmul():
    class Opaque:
        shape = (8, 64)

    with pytest.raises(ValueError, match="registered matmul"):
        lowbit.ops.linear(jnp.ones((2, 64)), Opaque())
