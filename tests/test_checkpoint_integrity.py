"""Damaged checkpoints surface as CheckpointError (never a silently different tree), export refuses
non-finite tensors, and a process killed anywhere in the directory swap loses nothing."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit import QuantSpec, quantize
from lowbit.io import checkpoint
from lowbit.io.checkpoint import CheckpointError


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    # random float32 data does not compress: its chunk is stored as is, so a flipped byte decodes
    # into a different value instead of a decoder error -- only a checksum can notice it
    return {"small": jnp.arange(3.0), "w": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)}


def _array_files(path):
    out = []
    for root, _, files in os.walk(os.path.join(path, "arrays")):
        for f in files:
            if os.sep + "d" + os.sep in os.path.join(root, f) + os.sep or os.path.basename(root) == "d":
                out.append(os.path.join(root, f))
    return sorted(out, key=os.path.getsize)


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def test_manifest_has_a_checksum_per_array_and_names_node_kinds(tmp_path):
    p = checkpoint.save(str(tmp_path / "ck"), {"a": jnp.ones(3), "q": quantize(jnp.ones((8, 32)), QuantSpec(bits=4, group_size=32))})
    m = json.load(open(os.path.join(p, "manifest.json")))
    assert m["version"] == 3
    assert len(m["tree"]["__dict__"]["a"]["sha256"]) == 64
    q = m["tree"]["__dict__"]["q"]
    assert q["__node__"] == "qtensor" and q["meta"]["bits"] == 4
    assert all("sha256" in s for s in q["__dict__"].values())


def test_flipped_byte_in_raw_chunk_names_the_array(tmp_path):
    p = checkpoint.save(str(tmp_path / "ck"), _tree())
    big = _array_files(p)[-1]
    assert os.path.getsize(big) > 64 * 64 * 4 // 2
    _flip(big, os.path.getsize(big) // 2)
    with pytest.raises(CheckpointError) as e:
        checkpoint.restore(p)
    msg = str(e.value)
    assert p in msg and "'w'" in msg and "\n" not in msg


def test_flipped_byte_in_compressed_chunk_is_a_checkpoint_error(tmp_path):
    p = checkpoint.save(str(tmp_path / "ck"), {"z": jnp.tile(jnp.arange(512.0), (64, 1)), "b": jnp.ones(3)})
    big = _array_files(p)[-1]
    assert os.path.getsize(big) < 64 * 512 * 4 // 4  # compressed
    for off in range(0, os.path.getsize(big), max(1, os.path.getsize(big) // 7)):
        _flip(big, off)
    with pytest.raises(CheckpointError, match="checkpoint .*ck") as e:
        checkpoint.restore(p)
    assert "\n" not in str(e.value)


def test_flipped_byte_anywhere_never_passes_silently(tmp_path):
    tree = _tree(1)
    p = checkpoint.save(str(tmp_path / "ck"), tree)
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(p, "arrays")) for f in fs]
    for i, f in enumerate(sorted(files)):
        q = str(tmp_path / f"c{i}")
        shutil.copytree(p, q)
        g = os.path.join(q, os.path.relpath(f, p))
        if os.path.getsize(g) == 0:
            continue
        _flip(g, os.path.getsize(g) // 2)
        try:
            back = checkpoint.restore(q)
        except CheckpointError:
            continue
        for k in tree:  # read despite the damage (e.g. in unused metadata): must be the same tree
            np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(tree[k]))


def test_truncated_file_is_a_checkpoint_error(tmp_path):
    p = checkpoint.save(str(tmp_path / "ck"), _tree())
    big = _array_files(p)[-1]
    with open(big, "r+b") as f:
        f.truncate(os.path.getsize(big) // 3)
    with pytest.raises(CheckpointError, match="cannot read arrays") as e:
        checkpoint.restore(p)
    assert "\n" not in str(e.value)


def test_missing_array_file_is_a_checkpoint_error(tmp_path):
    p = checkpoint.save(str(tmp_path / "ck"), _tree())
    os.remove(_array_files(p)[-1])
    with pytest.raises(CheckpointError, match="cannot read arrays"):
        checkpoint.restore(p)


def test_missing_or_bad_manifest_is_a_clear_checkpoint_error(tmp_path):
    p = checkpoint.save(str(tmp_path / "ck"), _tree())
    mf = os.path.join(p, "manifest.json")
    text = open(mf).read()
    open(mf, "w").write(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="manifest.json"):
        checkpoint.restore(p)
    os.remove(mf)
    with pytest.raises(CheckpointError, match="manifest.json"):
        checkpoint.restore(p)
    with pytest.raises(FileNotFoundError):  # still a FileNotFoundError for callers that probe
        checkpoint.read_extra(p)
    with pytest.raises(CheckpointError, match="no such directory"):
        checkpoint.restore(str(tmp_path / "nothing"))


def test_version_1_manifest_is_read_without_verification(tmp_path):
    tree = _tree()
    p = checkpoint.save(str(tmp_path / "ck"), tree)
    mf = os.path.join(p, "manifest.json")
    m = json.load(open(mf))

    def strip(s):
        if isinstance(s, dict):
            return {k: strip(v) for k, v in s.items() if k != "sha256"}
        if isinstance(s, list):
            return [strip(v) for v in s]
        return s

    json.dump({**m, "version": 1, "tree": strip(m["tree"])}, open(mf, "w"))
    back = checkpoint.restore(p)
    np.testing.assert_array_equal(np.asarray(back["w"]), np.asarray(tree["w"]))
    json.dump({**m, "version": 99}, open(mf, "w"))
    with pytest.raises(CheckpointError, match="version 99"):
        checkpoint.restore(p)


# ----------------------------------------------------------------------------- export: non-finite


def test_export_refuses_non_finite_tensors(tmp_path):
    from lowbit.calib.driver import default_recipe
    from lowbit.core.transforms import quantize_params
    from lowbit.io.export import export_gptq
    from lowbit.methods.rtn import rtn
    from lowbit.models import llama

    cfg = llama.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                            num_kv_heads=2, max_position_embeddings=64)
    params = llama.init_params(jax.random.key(0), cfg)
    q = quantize_params(params, default_recipe(rtn(QuantSpec(bits=4, group_size=32))))
    out = str(tmp_path / "hf")
    bad = dict(q, norm=q["norm"].at[3].set(jnp.inf))
    with pytest.raises(ValueError, match="model.norm.weight.*non-finite"):
        export_gptq(out, bad, cfg)
    big = dict(q, embed_tokens=q["embed_tokens"].at[0, 0].set(1e6))  # finite, but not in float16
    with pytest.raises(ValueError, match="model.embed_tokens.weight.*float16"):
        export_gptq(out, big, cfg)
    layer = dict(q["layers"][0])
    mlp = dict(layer["mlp"])
    up = mlp["up_proj"]
    mlp["up_proj"] = dataclasses.replace(up, scales=up.scales.at[5, 0].set(jnp.inf))
    nan_scales = dict(q, layers=[dict(layer, mlp=mlp)])
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.scales.*non-finite"):
        export_gptq(out, nan_scales, cfg)
    assert not os.path.exists(out)
    assert export_gptq(out, q, cfg) == out


# ----------------------------------------------------------------------------- crash points in the swap

_SNIPPET = textwrap.dedent("""
    import sys, jax.numpy as jnp
    from lowbit.io import checkpoint
    checkpoint.save(sys.argv[1], {"a": jnp.full(4, 2.0), "b": jnp.arange(5)})
""")


def _old_tree():
    return {"a": jnp.full(4, 1.0), "b": jnp.arange(5) * 10}


@pytest.mark.parametrize("point", ["checkpoint.before-swap", "checkpoint.mid-swap", "checkpoint.after-swap"])
def test_crash_in_the_swap_loses_nothing(tmp_path, point):
    path = str(tmp_path / "ck")
    checkpoint.save(path, _old_tree())
    env = dict(os.environ, LOWBIT_CRASH_AT=point, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _SNIPPET, path], env=env, capture_output=True, text=True)
    assert r.returncode == 137, r.stderr[-2000:]
    assert any(n.startswith(".ck.tmp-") for n in os.listdir(tmp_path))  # the crash left its temporaries
    if point == "checkpoint.mid-swap":
        assert not os.path.exists(path)  # the window: old moved away, new not yet in place
    back = checkpoint.restore(path)
    a = np.asarray(back["a"])
    if point == "checkpoint.before-swap":
        np.testing.assert_array_equal(a, np.ones(4))
    elif point == "checkpoint.after-swap":
        np.testing.assert_array_equal(a, np.full(4, 2.0))
    else:  # either complete tree
        assert (a == 1).all() or (a == 2).all()
        np.testing.assert_array_equal(np.asarray(back["b"]), np.arange(5) * (10 if (a == 1).all() else 1))
    checkpoint.save(path, {"a": jnp.zeros(2)})
    assert os.listdir(tmp_path) == ["ck"]  # the next write removed the dead process's temporaries


def test_temporaries_of_a_live_process_are_kept(tmp_path):
    path = str(tmp_path / "ck")
    checkpoint.save(path, _old_tree())
    live = tmp_path / f".ck.tmp-{os.getppid()}-abcd1234"
    live.mkdir()
    dead = tmp_path / ".ck.tmp-999999999-abcd1234"
    dead.mkdir()
    other = tmp_path / ".other.tmp-999999999-abcd1234"
    other.mkdir()
    checkpoint.save(path, _old_tree())
    assert sorted(os.listdir(tmp_path)) == sorted(["ck", live.name, other.name])
