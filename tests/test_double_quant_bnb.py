"""QLoRA's double quantization as bitsandbytes does it (``QuantSpec(dq_map="dynamic")``,
``nf4_qlora_spec()``): the dynamic 8-bit map, the nearest-code rule, the blockwise quantization of
the mean-centred absmax constants, 4.127 bits per parameter, and the usual pytree / checkpoint /
kernel paths.

The reference is bitsandbytes' ``functional.py`` (``create_dynamic_map``, ``quantize_blockwise``,
``quantize_4bit(compress_statistics=True)``, ``dequantize_4bit``) and its CUDA kernel
``csrc/kernels.cu`` (``dQuantize<0>``, ``kQuantizeBlockwise``, ``kDequantizeBlockwise``). Tests that
call bitsandbytes itself (plain torch on CPU) are skipped where it is not installed, except in CI
(``LOWBIT_REQUIRE_EXTRAS=1``), which installs it; the others pin its values without it.
"""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit
from lowbit import QuantSpec, bits_per_param, dequantize, nf4_qlora_spec, quantize
from lowbit.core import numerics
from lowbit.core.pack import pack, unpack
from lowbit.core.qtensor import QuantizedTensor
from lowbit.core.quantizers import fake_quant, qlinear, scale_table

F32 = np.float32
DMAP = np.asarray(numerics.DYNAMIC_MAP, F32)


def _bnb():
    """bitsandbytes.functional, or skip (a failure under LOWBIT_REQUIRE_EXTRAS=1: tests/conftest.py)."""
    try:
        import bitsandbytes.functional as bnbf
    except Exception as e:  # not installed, or no usable torch
        pytest.skip(f"bitsandbytes not importable: {e}")
    return bnbf


def _w(shape, seed=0, std=0.02):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * std


# ----------------------------------------------------------------------------- the dynamic map

def test_dynamic_map_pinned_values():
    """create_dynamic_map(signed=True) values, pinned without bitsandbytes."""
    m = numerics.dynamic_map()
    assert m.dtype == np.float32 and m.shape == (256,)
    np.testing.assert_array_equal(m, DMAP)
    assert np.all(np.diff(m) > 0)                                   # sorted, all distinct
    assert m[127] == 0.0 and m[255] == 1.0 and -1.0 not in m        # 0 and +1 exact; -1 is not a code
    assert [float(v) for v in m[:4]] == [-0.992968738079071, -0.9789062738418579, -0.96484375, -0.9507812261581421]
    assert [float(v) for v in m[125:131]] == [-3.250000190746505e-06, -5.500000384017767e-07, 0.0,
                                              5.500000384017767e-07, 3.250000190746505e-06, 7.749999895168003e-06]
    assert [float(v) for v in m[-4:]] == [0.96484375, 0.9789062738418579, 0.992968738079071, 1.0]
    np.testing.assert_array_equal(m[:127], -m[128:255][::-1])       # signed: +/- the same 127 values
    # 1, 2, 4, ..., 64 positive values in the decades [1e-7, 1e-6), ..., [0.1, 1)
    pos = m[128:255].astype(np.float64)
    counts = [int(np.sum((pos >= 10.0 ** (e - 1)) & (pos < 10.0**e))) for e in range(-6, 1)]
    assert counts == [1, 2, 4, 8, 16, 32, 64]
    # every bit of all 256 float32 values (little-endian), as create_dynamic_map() returns them
    assert hashlib.sha256(m.astype("<f4").tobytes()).hexdigest() == \
        "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"


@pytest.mark.parametrize("args", [(True, 7, 8), (False, 7, 8), (True, 4, 8), (True, 5, 8), (True, 1, 8),
                                  (False, 3, 4), (True, 3, 6), (False, 4, 8), (True, 8, 8)])
def test_dynamic_map_equals_bitsandbytes(args):
    """Bit for bit, including the padding to 256 entries below 8 bits and the failing counts."""
    bnbf = _bnb()
    try:
        ref = bnbf.create_dynamic_map(*args).numpy()
    except AssertionError:
        with pytest.raises(ValueError, match="2\\*\\*total_bits"):
            numerics.dynamic_map(*args)
        return
    got = numerics.dynamic_map(*args)
    assert got.shape == ref.shape == (256,)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_dynamic_map_argument_errors():
    for kw in (dict(signed=1), dict(max_exponent_bits=0), dict(total_bits=9), dict(total_bits=True)):
        with pytest.raises(ValueError):
            numerics.dynamic_map(**kw)


# ----------------------------------------------------------------------------- nearest code

def _binary_search_code(x: F32) -> int:
    """The CUDA kernel's rule written out: a 7-step binary search from pivot 127 (steps 64 .. 1)
    tracking the last pivots below / above, then the float32 midpoint with that neighbour; ties
    stay on the final pivot."""
    pivot, lo_p, hi_p = 127, 0, 255
    lo_v, hi_v = F32(-1.0), F32(1.0)
    val = DMAP[pivot]
    step = 64
    while step:
        if x > val:
            lo_p, lo_v, pivot = pivot, val, pivot + step
        else:
            hi_p, hi_v, pivot = pivot, val, pivot - step
        val = DMAP[pivot]
        step //= 2
    if hi_p == 255:
        hi_v = DMAP[255]
    if lo_p == 0:
        lo_v = DMAP[0]
    if x > val:
        return hi_p if x > (hi_v + val) * F32(0.5) else pivot
    return lo_p if x < (lo_v + val) * F32(0.5) else pivot


def _probe_values():
    mid = numerics.DYNAMIC_MAP_MIDPOINTS
    rng = np.random.default_rng(0)
    return np.concatenate([
        DMAP, mid, np.nextafter(mid, F32(2)), np.nextafter(mid, F32(-2)),
        rng.standard_normal(4000) * 10.0 ** rng.uniform(-8, 0, 4000), rng.uniform(-1.1, 1.1, 2000),
        [0.0, -0.0, 1.0, -1.0, 1.0000001, -1.0000001, 3.0, -3.0],
    ]).astype(F32)


def test_nearest_code_is_the_kernels_binary_search():
    x = _probe_values()
    want = np.asarray([_binary_search_code(v) for v in x])
    np.testing.assert_array_equal(np.asarray(numerics.nearest_dynamic_code(x)), want)
    # exact ties go to the even index of the pair
    ties = np.asarray(numerics.nearest_dynamic_code(numerics.DYNAMIC_MAP_MIDPOINTS))
    j = np.arange(255)
    np.testing.assert_array_equal(ties, np.where(j % 2 == 0, j, j + 1))
    assert int(numerics.nearest_dynamic_code(F32(0.0))) == 127


def test_nearest_code_is_nearest_in_float64():
    """Away from exact ties, the code is the float64 nearest entry."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(-1, 1, 20000), rng.standard_normal(20000) * 10.0 ** rng.uniform(-8, 0, 20000)])
    x = np.clip(x, -1, 1).astype(F32)
    got = np.asarray(numerics.nearest_dynamic_code(x))
    d = np.abs(x.astype(np.float64)[:, None] - DMAP.astype(np.float64)[None, :])
    want = np.argmin(d, axis=1)
    tie = np.abs(d[np.arange(len(x)), got] - d[np.arange(len(x)), want]) <= 1e-7 * np.abs(x)
    assert np.all((got == want) | tie)
    assert np.mean(got == want) > 0.9999


# ----------------------------------------------------------------------------- the double quantization

def _reference_dq(scales_flat: np.ndarray, offset: F32, block: int):
    """The algorithm in numpy: centre on the (given) float32 mean, blockwise float32 absmax, code =
    float64-nearest entry of x * (1 / absmax), an all-zero block stores absmax 0 and codes 0;
    dequantize = map[code] * absmax + mean (float32)."""
    c = (scales_flat.astype(F32) - offset).astype(F32)
    n = c.size
    nb = -(-n // block)
    blocks = np.zeros(nb * block, F32)
    blocks[:n] = c
    blocks = blocks.reshape(nb, block)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    inv = (F32(1.0) / np.where(absmax == 0, F32(1.0), absmax)).astype(F32)
    x = (blocks * inv).astype(F32)
    codes = np.argmin(np.abs(x.astype(np.float64)[..., None] - DMAP.astype(np.float64)), axis=-1)
    codes = np.where(absmax == 0, 0, codes)
    deq = (DMAP[codes] * absmax).astype(F32).reshape(-1)[:n] + offset
    return codes, absmax, deq.astype(F32)


@pytest.mark.parametrize("shape", [(64, 1024), (40, 640)])  # 4 full blocks; 400 scales = 256 + 144
def test_dynamic_dq_matches_numpy_reference(shape):
    spec = nf4_qlora_spec()
    w = _w(shape)
    q = quantize(w, spec)
    nested, offset = q.scales
    assert isinstance(nested, QuantizedTensor) and nested.format == "codebook" and nested.bits == 8
    assert nested.levels == numerics.DYNAMIC_MAP and nested.group_size == 256
    assert offset.dtype == jnp.float32 and offset.shape == (1,)
    raw = np.abs(np.asarray(w, F32).reshape(-1, 64)).max(axis=1)           # float32 absmax per 64
    np.testing.assert_allclose(float(offset[0]), raw.astype(np.float64).mean(), rtol=1e-6)
    codes, absmax, deq = _reference_dq(raw, F32(offset[0]), 256)
    got_codes = np.asarray(unpack(nested.data, 8, 256))
    np.testing.assert_array_equal(np.asarray(nested.scales), absmax)
    np.testing.assert_array_equal(got_codes, codes)
    np.testing.assert_array_equal(np.asarray(scale_table(q)).reshape(-1), deq)
    assert nested.shape == (len(codes), 256)


def test_weights_round_against_the_exact_absmax():
    """As bitsandbytes: the NF4 codes are those of float32-absmax NF4 without double quantization;
    only the stored statistics change. ("linear" rounds against the stored scales, as before.)"""
    w = _w((64, 512))
    a = quantize(w, nf4_qlora_spec())
    b = quantize(w, nf4_qlora_spec(double_quant=False))
    np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    # (XLA may fuse map[code] * absmax + mean into one FMA inside dequantize: 1 ulp)
    np.testing.assert_allclose(np.asarray(dequantize(a)),
                               np.asarray(numerics.NF4_LEVELS, F32)[np.asarray(unpack(a.data, 4, 512))]
                               * np.repeat(np.asarray(scale_table(a)), 64, axis=1), rtol=3e-7, atol=0)


def test_scale_error_is_bounded_and_weights_stay_close():
    w = _w((256, 1024), seed=3)
    q = quantize(w, nf4_qlora_spec())
    q0 = quantize(w, nf4_qlora_spec(double_quant=False))
    s, s0 = np.asarray(scale_table(q)).reshape(-1), np.asarray(scale_table(q0)).reshape(-1)
    nested, _ = q.scales
    block_absmax = np.repeat(np.asarray(nested.scales)[:, 0], 256)[: s.size]
    # rounding to the nearest map entry: at most half the largest gap (0.0140625) of the block's absmax
    half_gap = float(np.max(np.diff(DMAP))) / 2
    assert np.all(np.abs(s - s0) <= half_gap * block_absmax * (1 + 1e-6) + 1e-7 * np.abs(s0))
    rel = np.abs(s - s0) / s0
    assert rel.max() < 0.01 and rel.mean() < 0.003     # 8-bit map near 1: steps of ~1.4% of the block absmax
    mse_dq = float(jnp.mean((dequantize(q) - w) ** 2))
    mse = float(jnp.mean((dequantize(q0) - w) ** 2))
    assert mse <= mse_dq < mse * 1.01


def test_constant_and_zero_blocks():
    """All scales equal: the centred values are 0, the blocks store absmax 0 and codes 0 (what
    bitsandbytes writes) and the scales come back exactly; a zero matrix stays zero."""
    w = jnp.tile(jnp.asarray([0.5, -0.25, 0.125, -0.5]), (8, 64))
    q = quantize(w, nf4_qlora_spec())
    nested, _ = q.scales
    np.testing.assert_array_equal(np.asarray(nested.scales), 0.0)
    np.testing.assert_array_equal(np.asarray(unpack(nested.data, 8, 256)), 0)
    np.testing.assert_array_equal(np.asarray(scale_table(q)), 0.5)
    plain = quantize(w, nf4_qlora_spec(double_quant=False))
    np.testing.assert_array_equal(np.asarray(dequantize(q)), np.asarray(dequantize(plain)))
    z = dequantize(quantize(jnp.zeros((4, 128)), nf4_qlora_spec()))
    np.testing.assert_array_equal(np.asarray(z), 0.0)


# ----------------------------------------------------------------------------- against bitsandbytes

def test_blockwise_round_trip_vs_bitsandbytes():
    """Our blockwise dynamic quantization of centred scales vs bnb.quantize_blockwise (CPU): the
    same absmax; the same codes wherever the value is not within the CPU library's lookup-table
    resolution (2 / 65535) of a decision boundary (its CPU path bins [-1, 1] into 65536 steps,
    where the CUDA kernel, which this follows, searches exactly), and never a larger error; and
    bnb.dequantize_blockwise of any codes equals our codebook dequantization bit for bit."""
    bnbf = _bnb()
    import torch

    w = _w((128, 2048), seed=5)
    q = quantize(w, nf4_qlora_spec())
    nested, offset = q.scales
    raw = np.abs(np.asarray(w, F32).reshape(-1, 64)).max(axis=1)
    centred = (raw - F32(offset[0])).astype(F32)
    qb, st = bnbf.quantize_blockwise(torch.from_numpy(centred.copy()), blocksize=256)
    np.testing.assert_array_equal(st.absmax.numpy(), np.asarray(nested.scales)[:, 0])
    ours = np.asarray(unpack(nested.data, 8, 256)).reshape(-1)
    theirs = qb.numpy().reshape(-1)
    x = (centred.reshape(-1, 256) * (F32(1) / st.absmax.numpy()[:, None])).reshape(-1)
    far = np.min(np.abs(x[:, None] - numerics.DYNAMIC_MAP_MIDPOINTS[None, :]), axis=1) > 2.0 / 65535
    np.testing.assert_array_equal(ours[far], theirs[far])
    err_ours = np.abs(DMAP[ours] - x)
    err_theirs = np.abs(DMAP[theirs] - x)
    assert np.all(err_ours <= err_theirs * (1 + 1e-6))
    # dequantization: bnb's codes through our codebook tensor == bnb.dequantize_blockwise
    same = QuantizedTensor(data=jnp.asarray(np.asarray(nested.data)), scales=nested.scales, shape=nested.shape,
                           bits=8, group_size=256, format="codebook", levels=numerics.DYNAMIC_MAP)
    bnb_as_ours = QuantizedTensor(data=pack(jnp.asarray(theirs.reshape(-1, 256)), 8), scales=nested.scales,
                                  shape=nested.shape, bits=8, group_size=256, format="codebook",
                                  levels=numerics.DYNAMIC_MAP)
    np.testing.assert_array_equal(np.asarray(dequantize(bnb_as_ours)).reshape(-1),
                                  bnbf.dequantize_blockwise(qb, st).numpy())
    np.testing.assert_array_equal(np.asarray(dequantize(same)).reshape(-1),
                                  bnbf.dequantize_blockwise(torch.from_numpy(ours.astype(np.uint8)), st).numpy())


def test_qlora_nf4_vs_bitsandbytes_quantize_4bit():
    """The whole base format vs bnb.quantize_4bit(nf4, blocksize=64, compress_statistics=True) on
    CPU: the same mean, block absmax and NF4 codes; the dequantized weights as close to W."""
    bnbf = _bnb()
    import torch

    w = np.asarray(_w((256, 1024), seed=7), F32)
    q = quantize(jnp.asarray(w), nf4_qlora_spec())
    qb, st = bnbf.quantize_4bit(torch.from_numpy(w.copy()), blocksize=64, compress_statistics=True, quant_type="nf4")
    nested, offset = q.scales
    np.testing.assert_allclose(float(offset[0]), float(st.offset), rtol=2e-7)
    np.testing.assert_allclose(np.asarray(nested.scales)[:, 0], st.state2.absmax.numpy(), rtol=1e-6)
    packed = qb.numpy().reshape(-1)
    bnb_codes = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)
    ours = np.asarray(unpack(q.data, 4, 1024)).reshape(-1)
    assert np.mean(ours == bnb_codes) > 0.9999
    s_bnb = (bnbf.dequantize_blockwise(st.absmax, st.state2) + st.offset).numpy()
    s_ours = np.asarray(scale_table(q)).reshape(-1)
    assert np.mean(s_ours == s_bnb) > 0.99
    d_b = bnbf.dequantize_4bit(qb, st).numpy()
    d_o = np.asarray(dequantize(q))
    assert np.mean((d_o - w) ** 2) <= np.mean((d_b - w) ** 2) * (1 + 1e-3)
    assert np.max(np.abs(d_o - d_b)) < 0.02 * np.max(np.abs(w))


# ----------------------------------------------------------------------------- spec, preset, size

def test_spec_validation_and_preset():
    assert QuantSpec().dq_map == "linear"
    linear = quantize(_w((8, 128)), QuantSpec(bits=4, format="nf4", group_size=64, double_quant=True))
    assert linear.scales[0].format == "int"
    with pytest.raises(ValueError, match="dq_map='cubic'"):
        QuantSpec(dq_map="cubic")
    with pytest.raises(ValueError, match="dq_bits=4: dq_map='dynamic'"):
        QuantSpec(double_quant=True, dq_map="dynamic", dq_bits=4)
    s = nf4_qlora_spec()
    assert s == QuantSpec.qlora_nf4() == lowbit.nf4_qlora_spec()
    assert (s.format, s.bits, s.group_size, s.symmetric, s.double_quant, s.dq_map, s.dq_bits, s.dq_block,
            s.scale_dtype) == ("nf4", 4, 64, True, True, "dynamic", 8, 256, "float32")
    assert nf4_qlora_spec(group_size=128).group_size == 128
    assert "nf4_qlora_spec" in lowbit.__all__
    assert "double-quant(dynamic)" in repr(quantize(_w((4, 256)), s))


def test_bits_per_param_is_4_127():
    rows = cols = 4096
    q = quantize(_w((rows, cols)), nf4_qlora_spec())
    n_scales = rows * cols // 64
    expect = (rows * cols * 4 + n_scales * 8 + (n_scales // 256) * 32 + 32) / (rows * cols)
    assert bits_per_param(q) == expect
    assert expect == 4 + 8 / 64 + 32 / (64 * 256) + 32 / (rows * cols)
    assert abs(bits_per_param(q) - 4.127) < 5e-4


# ----------------------------------------------------------------------------- jit / vmap / checkpoint / kernels

def test_jit_vmap_and_fake_quant():
    spec = nf4_qlora_spec()
    w = _w((32, 512))
    q = quantize(w, spec)
    ref = np.asarray(dequantize(q))
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize)(q)), ref)
    np.testing.assert_array_equal(np.asarray(dequantize(jax.jit(lambda t: t)(q))), ref)
    np.testing.assert_array_equal(np.asarray(dequantize(jax.jit(lambda x: quantize(x, spec))(w))), ref)
    ws = jnp.stack([w, _w((32, 512), seed=1), _w((32, 512), seed=2)])
    qs = jax.vmap(lambda x: quantize(x, spec))(ws)
    ds = jax.vmap(dequantize)(qs)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(ds[i]), np.asarray(dequantize(quantize(ws[i], spec))))
    np.testing.assert_array_equal(np.asarray(fake_quant(w, spec)), ref)
    g = jax.grad(lambda x: jnp.sum(fake_quant(x, spec) ** 2))(w)
    assert g.shape == w.shape and bool(jnp.all(jnp.isfinite(g)))


def test_checkpoint_round_trip(tmp_path):
    from lowbit.io import checkpoint

    q = quantize(_w((48, 640)), nf4_qlora_spec())
    path = checkpoint.save(str(tmp_path / "ck"), {"w": q})
    back = checkpoint.restore(path)["w"]
    assert back.scales[0].levels == numerics.DYNAMIC_MAP and back.scales[0].format == "codebook"
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(q)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(dequantize(back)), np.asarray(dequantize(q)))


def test_kernel_layout_and_linear():
    """The kernels' operands (scale table from the nested tensor) reproduce dequantize; ops.linear
    through the Triton kernel in interpret mode matches the reference."""
    from lowbit import ops
    from lowbit.kernels import quant_matmul as qm
    from lowbit.ops import kernel_format

    q = quantize(_w((96, 512), seed=4), nf4_qlora_spec())                  # 768 scales: 3 blocks
    x = (jax.random.normal(jax.random.key(9), (3, 512)) + 0.1).astype(jnp.bfloat16)
    exact = jnp.dot(x.astype(jnp.float32), dequantize(q).T, precision=jax.lax.Precision.HIGHEST)
    kw = kernel_format.to_kernel_layout(q)
    assert kw.scales.dtype == jnp.float32
    # (1 ulp: XLA may fuse map[code] * absmax + mean into an FMA inside the jitted conversion)
    np.testing.assert_allclose(np.asarray(kw.scales[: q.n_groups, : q.shape[0]]), np.asarray(scale_table(q)).T,
                               rtol=3e-7, atol=0)
    y_ref = qm.quant_matmul_reference(x, kw, out_dtype=jnp.float32)

    def rel(a, b):
        return float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))

    assert rel(y_ref, exact) < 1e-5
    with ops.kernel_mode("interpret"):
        y = ops.linear(x, q)
    assert y.shape == (3, 96) and y.dtype == jnp.bfloat16
    assert rel(y, exact) < 1e-2
    assert rel(qlinear(x, q), exact) < 1e-2
