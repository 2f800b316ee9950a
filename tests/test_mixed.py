"""A bit width per column group (lowbit.core.mixed, GPTQ's quantize_weight_mixed): equal widths
reproduce uniform GPTQ exactly, mixed GPTQ beats mixed RTN on its objective, storage, bytes,
checkpoints and bad widths."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.alloc.recipe import MixedSpec, spec_bytes
from lowbit.core.mixed import MixedWidthWeight, mixed_bytes, quantize_mixed
from lowbit.core.qtensor import QuantSpec
from lowbit.core.quantizers import dequantize, quantize
from lowbit.io import checkpoint
from lowbit.methods.gptq import quantize_weight, quantize_weight_mixed


def _problem(rows=48, cols=200, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, cols)).astype(np.float32)
    X = rng.standard_normal((400, cols)).astype(np.float32) * np.linspace(0.2, 3.0, cols, dtype=np.float32)
    return W, X, 2 * X.T @ X / len(X)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_equal_widths_are_exactly_uniform_gptq(bits, symmetric):
    W, _, H = _problem()
    spec = QuantSpec(bits=bits, group_size=32, symmetric=symmetric, partial_groups=True)   # 200 = 6 x 32 + 8
    ref = quantize_weight(W, H, spec, blocksize=64)
    m, losses, damp = quantize_weight_mixed(W, H, spec, [bits] * 7, blocksize=64)
    assert isinstance(m, MixedWidthWeight) and len(m.parts) == 1
    for a, b in zip(jax.tree_util.tree_leaves(ref.q), jax.tree_util.tree_leaves(m.parts[0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(ref.losses), np.asarray(losses))
    assert float(damp) == float(ref.damp)


def test_mixed_gptq_beats_mixed_rtn_and_wider_groups_are_more_accurate():
    W, X, H = _problem(seed=1)
    spec = QuantSpec(bits=3, group_size=32, partial_groups=True)
    widths = [2, 4, 3, 8, 2, 4, 3]
    err = lambda Q: float(np.linalg.norm((W - np.asarray(Q)) @ X.T) / np.linalg.norm(W @ X.T))  # noqa: E731
    g = quantize_weight_mixed(W, H, spec, widths)[0]
    r = quantize_mixed(W, spec, widths)
    assert err(g.dequantize()) < 0.95 * err(r.dequantize())
    # RTN: each group's error is its own width's (the 8-bit group is near exact, the 2-bit ones are not)
    e = np.abs(W - np.asarray(r.dequantize()))
    per_group = [e[:, 32 * i:32 * (i + 1)].mean() for i in range(7)]
    assert per_group[3] < 0.05 * per_group[0] and per_group[1] < per_group[0]
    # the RTN parts are uniform RTN of their columns
    cols = r.columns(2)
    np.testing.assert_array_equal(np.asarray(r.dequantize())[:, cols],
                                  np.asarray(dequantize(quantize(W[:, cols], QuantSpec(bits=2, group_size=32,
                                                                                      partial_groups=True)))))


def test_matmul_bytes_and_describe():
    W, _, H = _problem(rows=40, cols=136)   # partial last group (136 = 4 x 32 + 8) in the 4-bit part
    spec = QuantSpec(bits=4, group_size=32, partial_groups=True)
    widths = [2, 3, 2, 8, 4]
    m = quantize_weight_mixed(W, H, spec, widths)[0]
    x = jax.random.normal(jax.random.key(0), (2, 3, 136))
    from lowbit.ops import linear

    y = linear(x, m)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ m.dequantize().T), rtol=1e-5, atol=1e-5)
    assert m.bits_per_param() * 40 * 136 / 8 == mixed_bytes(spec, (40, 136), widths)
    assert spec_bytes(MixedSpec(spec, tuple(widths)), (40, 136)) == mixed_bytes(spec, (40, 136), widths)
    assert m.bits == pytest.approx((2 * 64 + 3 * 32 + 8 * 32 + 4 * 8) / 136)
    d = m.describe()
    assert d["format"] == "int-mixed" and d["widths"] == "2 3 2 8 4"
    # jit: a MixedWidthWeight is a pytree with static widths
    yj = jax.jit(linear)(x, m)
    np.testing.assert_allclose(np.asarray(yj), np.asarray(y), rtol=1e-6)


@pytest.mark.parametrize("widths, match", [
    ([3, 3], "expected 7 widths"), ([3, 3, 3, 3, 3, 3, 9], "in 1..8"), ([3, 3, 3, 3, 3, 3, 0], "in 1..8"),
    ([3, 3, 3, True, 3, 3, 3], "in 1..8"), ("abc", "sequence of ints"),
])
def test_bad_widths_are_named(widths, match):
    W, _, H = _problem()
    with pytest.raises(ValueError, match=match):
        quantize_weight_mixed(W, H, QuantSpec(bits=3, group_size=32, partial_groups=True), widths)


def test_widths_need_a_group_wise_int_spec():
    W, _, H = _problem()
    for spec in (QuantSpec(bits=3, group_size=None), QuantSpec(bits=4, group_size=32, format="nf4", partial_groups=True)):
        with pytest.raises(ValueError, match="group-wise int spec"):
            quantize_weight_mixed(W, H, spec, [3] * 7)


def test_checkpoint_round_trip_and_legacy_manifest_entries(tmp_path):
    W, _, H = _problem(rows=16, cols=96)
    m = quantize_weight_mixed(W, H, QuantSpec(bits=3, group_size=32), [2, 8, 3])[0]
    p = checkpoint.save(str(tmp_path / "m"), {"w": m})
    back = checkpoint.restore(p)["w"]
    assert isinstance(back, MixedWidthWeight) and back.widths == (2, 8, 3)
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(m.dequantize()))
    # an LLM.int8() weight saved by an older lowbit (a version-2 "__llm_int8__" manifest entry) still loads
    from lowbit.methods.llm_int8 import Int8Weight

    w8 = Int8Weight(codes=jnp.asarray(np.arange(-6, 6, dtype=np.int8).reshape(3, 4)),
                    absmax=jnp.ones((3,), jnp.float32), threshold=5.0)
    p = checkpoint.save(str(tmp_path / "i8"), {"w": w8})
    man_path = os.path.join(p, "manifest.json")
    man = json.load(open(man_path))
    node = man["tree"]["__dict__"]["w"]
    assert node["__node__"] == "int8" and node["meta"] == {"threshold": 5.0}
    man["tree"]["__dict__"]["w"] = {"__llm_int8__": {"threshold": 5.0}, "__dict__": node["__dict__"]}
    man["version"] = 2
    with open(man_path, "w") as f:
        json.dump(man, f)
    back = checkpoint.restore(p)["w"]
    assert isinstance(back, Int8Weight) and back.threshold == 5.0
    np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(w8.codes))


def test_a_manifest_cannot_name_a_foreign_class(tmp_path):
    W, _, H = _problem(rows=16, cols=96)
    m = quantize_weight_mixed(W, H, QuantSpec(bits=3, group_size=32), [2, 8, 3])[0]
    p = checkpoint.save(str(tmp_path / "m"), {"w": m})
    man_path = os.path.join(p, "manifest.json")
    text = open(man_path).read().replace('"__node__": "mixed"', '"__node__": "os:system"')
    with open(man_path, "w") as f:
        f.write(text)
    with pytest.raises(checkpoint.CheckpointError, match="'os:system': not a registered weight-node kind"):
        checkpoint.restore(p)
