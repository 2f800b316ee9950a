import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit import QuantSpec, dequantize, quantize
from lowbit.io import checkpoint


def _tree():
    w = jax.random.normal(jax.random.key(0), (32, 128))
    return {
        "layers": [{"q": quantize(w, QuantSpec(bits=3, group_size=64)), "norm": jnp.ones(128)},
                   {"q": quantize(w, QuantSpec(bits=4, format="nf4", group_size=32, double_quant=True))}],
        "onebit": quantize(w, QuantSpec(bits=1, format="onebit", group_size=None)),
        "dense": w,
    }


def test_orbax_round_trip_with_quantized_tensors(tmp_path):
    tree = _tree()
    path = checkpoint.save(str(tmp_path / "ck"), tree, extra={"model": "x"})
    back = checkpoint.restore(path)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(dequantize(back["layers"][1]["q"])),
                                  np.asarray(dequantize(tree["layers"][1]["q"])))
    assert checkpoint.read_extra(path) == {"model": "x"}


def test_overwrite_is_atomic_and_leaves_no_temporaries(tmp_path):
    path = str(tmp_path / "ck")
    checkpoint.save(path, {"a": jnp.ones(3)})
    checkpoint.save(path, {"a": jnp.zeros(3)})
    assert os.listdir(tmp_path) == ["ck"]
    np.testing.assert_array_equal(np.asarray(checkpoint.restore(path)["a"]), np.zeros(3))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "ck")
    checkpoint.save(path, {"a": jnp.ones(3)})
    with pytest.raises(Exception):
        checkpoint.save(path, {"a": object()})
    np.testing.assert_array_equal(np.asarray(checkpoint.restore(path)["a"]), np.ones(3))
    assert os.listdir(tmp_path) == ["ck"]


def test_restore_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a lowbit checkpoint"):
        checkpoint.restore(str(tmp_path))


def test_qtensor_passes_through_jit():
    q = _tree()["layers"][0]["q"]
    out = jax.jit(lambda q: q)(q)
    np.testing.assert_array_equal(np.asarray(dequantize(out)), np.asarray(dequantize(q)))
