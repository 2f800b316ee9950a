import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit
from lowbit import QuantizedTensor, QuantSpec, bits_per_param, dequantize, fake_quant, quantize
from lowbit.core import numerics
from lowbit.core.pack import unpack
from lowbit.core.quantizers import scale_table


def _w(shape=(48, 256), seed=0, heavy=False):
    k = jax.random.key(seed)
    return (jax.random.t(k, 3.0, shape) if heavy else jax.random.normal(k, shape)).astype(jnp.float32)


SPECS = [
    QuantSpec(bits=b, group_size=g, symmetric=s)
    for b in (1, 2, 3, 4, 8) for g in (32, 128, None) for s in (False, True) if not (s and b == 1)
] + [
    QuantSpec(bits=4, per_tensor=True), QuantSpec(bits=4, format="nf4", group_size=64),
    QuantSpec(bits=4, format="fp4", group_size=32), QuantSpec(bits=3, format="codebook", levels=numerics.log_levels(3)),
    QuantSpec(bits=1, format="sign", group_size=64), QuantSpec(bits=1, format="onebit", group_size=None),
    QuantSpec(bits=4, format="nf4", group_size=64, double_quant=True), QuantSpec(bits=3, clip=True, group_size=64),
    QuantSpec(bits=4, group_size=32, double_quant=True), QuantSpec(bits=4, group_size=64, scale_dtype="bfloat16"),
]


def _id(s):
    return f"{s.format}-b{s.bits}-g{s.group_size}{'-sym' if s.symmetric else ''}{'-t' if s.per_tensor else ''}" \
           f"{'-dq' if s.double_quant else ''}{'-clip' if s.clip else ''}-{s.scale_dtype}"


def _steps(q: QuantizedTensor):
    """Per-element grid step of an "int" tensor, in original column order."""
    rows, cols = q.shape
    s = jnp.broadcast_to(scale_table(q)[..., None], (rows, q.n_groups, q.group_size))
    return s.reshape(rows, cols)


@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_invariant_jit_vmap(spec):
    """dequantize == the documented formula; quantize works under jit and vmap."""
    w = _w()
    q = quantize(w, spec)
    rows, cols = q.shape
    codes = np.asarray(unpack(q.data, q.bits, cols)).astype(np.float64).reshape(rows, q.n_groups, q.group_size)
    s = np.asarray(scale_table(q), np.float64)[..., None]
    if q.format == "int":
        z = 2 ** (q.bits - 1) if q.zeros is None else np.asarray(unpack(q.zeros, q.bits, q.n_groups))[..., None]
        ref = (codes - z) * s
    elif q.format in ("sign", "onebit"):
        ref = (2 * codes - 1) * s
    else:
        ref = np.asarray(q.levels)[codes.astype(int)] * s
    ref = ref.reshape(rows, cols)
    if q.col_scale is not None:
        ref = ref * np.asarray(q.col_scale, np.float64)
    np.testing.assert_allclose(np.asarray(dequantize(q)), ref, rtol=1e-6, atol=1e-6)

    qj = jax.jit(quantize, static_argnums=1)(w, spec)
    np.testing.assert_array_equal(np.asarray(qj.data), np.asarray(q.data))
    batched = jax.vmap(lambda x: dequantize(quantize(x, spec)))(jnp.stack([w, 2 * w]))
    np.testing.assert_allclose(np.asarray(batched[0]), np.asarray(dequantize(q)), rtol=1e-6, atol=1e-6)
    leaves, tdef = jax.tree_util.tree_flatten(q)
    assert isinstance(jax.tree_util.tree_unflatten(tdef, leaves), QuantizedTensor)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.format == "int" and not s.clip and not s.double_quant], ids=_id)
def test_rtn_error_at_most_half_a_step(spec):
    w = _w(heavy=True)
    q = quantize(w, spec)
    err = jnp.abs(dequantize(q) - w)
    assert bool(jnp.all(err <= _steps(q) / 2 * (1 + 1e-5) + 1e-7)), float(jnp.max(err / _steps(q)))


def test_more_bits_less_error_and_groups_help():
    w = _w(heavy=True)
    errs = [float(jnp.mean((dequantize(quantize(w, QuantSpec(bits=b, group_size=64))) - w) ** 2)) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    e_g = float(jnp.mean((dequantize(quantize(w, QuantSpec(bits=3, group_size=32))) - w) ** 2))
    e_c = float(jnp.mean((dequantize(quantize(w, QuantSpec(bits=3, group_size=None))) - w) ** 2))
    assert e_g < e_c


def test_clip_search_lowers_error_on_heavy_tails():
    w = _w(heavy=True)
    plain = float(jnp.mean((dequantize(quantize(w, QuantSpec(bits=3, group_size=None))) - w) ** 2))
    clipped = float(jnp.mean((dequantize(quantize(w, QuantSpec(bits=3, group_size=None, clip=True))) - w) ** 2))
    assert clipped < plain


def test_nf4_matches_published_table_and_definition():
    assert len(numerics.NF4_LEVELS) == 16 and numerics.NF4_LEVELS[0] == -1.0 and numerics.NF4_LEVELS[-1] == 1.0
    assert numerics.NF4_LEVELS[7] == 0.0
    np.testing.assert_allclose(numerics.nf4_levels_from_normal(), numerics.NF4_LEVELS, atol=2e-6)


def test_fp4_levels_are_e2m1():
    mags = sorted({abs(v) * 6 for v in numerics.FP4_E2M1_LEVELS})
    assert mags == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_nf4_beats_int4_on_normal_weights():
    w = _w((64, 512), seed=3)
    e_nf4 = float(jnp.mean((dequantize(quantize(w, QuantSpec(bits=4, format="nf4", group_size=64))) - w) ** 2))
    e_int = float(jnp.mean((dequantize(quantize(w, QuantSpec(bits=4, symmetric=True, group_size=64))) - w) ** 2))
    assert e_nf4 < e_int


def test_ste_gradient_identity_inside_range_zero_outside():
    w = _w()
    g = jax.grad(lambda x: jnp.sum(fake_quant(x, QuantSpec(bits=4, group_size=64)) * 3.0))(w)
    np.testing.assert_allclose(np.asarray(g), 3.0)  # min/max range: nothing is clipped
    spec = QuantSpec(bits=2, group_size=64, clip=True)
    g = jax.grad(lambda x: jnp.sum(fake_quant(x, spec)))(w)
    q = quantize(w, spec)
    inside = jnp.abs(dequantize(q) - w) <= _steps(q) / 2 * (1 + 1e-5)
    assert bool(jnp.all(jnp.where(inside, g == 1.0, g == 0.0)))
    assert 0 < float(jnp.mean(g)) < 1
    np.testing.assert_allclose(np.asarray(jax.jit(fake_quant, static_argnums=1)(w, spec)), np.asarray(dequantize(q)))


def test_onebit_svid_layout():
    w = _w((32, 64))
    q = quantize(w, QuantSpec(bits=1, format="onebit", group_size=None))
    a, b = np.asarray(q.scales[:, 0], np.float64), np.asarray(q.col_scale, np.float64)
    sign = np.where(np.asarray(w) >= 0, 1.0, -1.0)
    np.testing.assert_allclose(np.asarray(dequantize(q)), sign * np.outer(a, b), rtol=1e-6)
    # SVID's rank-1 |W| beats a per-row mean-|w| scale
    e1 = float(jnp.mean((dequantize(q) - w) ** 2))
    e0 = float(jnp.mean((dequantize(quantize(w, QuantSpec(bits=1, format="sign", group_size=None))) - w) ** 2))
    assert e1 <= e0 * 1.0001


def test_bits_per_param_hand_counts():
    w = _w((64, 256))
    # 4-bit g128 asym, fp16 scales, packed 4-bit zeros: 4 + 16/128 + 4/128 (zeros pad to a word per row)
    q = quantize(w, QuantSpec(bits=4, group_size=128))
    assert bits_per_param(q) == (64 * 256 * 4 + 64 * 2 * 16 + 64 * 32) / (64 * 256)
    q = quantize(w, QuantSpec(bits=3, group_size=64, symmetric=True))
    assert bits_per_param(q) == (64 * 24 * 32 + 64 * 4 * 16) / (64 * 256)
    q = quantize(w, QuantSpec(bits=1, format="onebit", group_size=None))
    assert bits_per_param(q) == (64 * 8 * 32 + 64 * 16 + 256 * 16) / (64 * 256)
    # QLoRA double quant: 4 + 8/64 + 32/(64*256) + 32/numel
    w = _w((128, 1024))
    q = quantize(w, QuantSpec(bits=4, format="nf4", group_size=64, double_quant=True, dq_block=256))
    n_scales = 128 * 1024 // 64
    expect = (128 * 1024 * 4 + n_scales * 8 + (n_scales // 256) * 32 + 32) / (128 * 1024)
    assert bits_per_param(q) == expect
    assert abs(expect - 4.127) < 1e-3


def test_double_quant_is_close_to_plain():
    w = _w((128, 1024))
    a = dequantize(quantize(w, QuantSpec(bits=4, format="nf4", group_size=64)))
    b = dequantize(quantize(w, QuantSpec(bits=4, format="nf4", group_size=64, double_quant=True)))
    assert float(jnp.mean((a - w) ** 2)) * 1.02 > float(jnp.mean((b - w) ** 2))


def test_zero_and_constant_matrices():
    for w in (jnp.zeros((8, 64)), jnp.full((8, 64), 0.5)):
        for spec in (QuantSpec(bits=4, group_size=32), QuantSpec(bits=4, symmetric=True), QuantSpec(bits=4, format="nf4")):
            d = dequantize(quantize(w, spec.replace(group_size=32)))
            assert bool(jnp.all(jnp.isfinite(d)))
            np.testing.assert_allclose(np.asarray(d), np.asarray(w), atol=1e-6 + 0.5 * 0.5 / 7)


@pytest.mark.parametrize("bad, match", [
    (dict(bits=0), "bits"), (dict(bits=9), "bits"), (dict(bits=2.5), "bits"), (dict(group_size=0), "group_size"),
    (dict(format="int3"), "format"), (dict(format="nf4", bits=3), "4-bit"), (dict(format="codebook"), "levels"),
    (dict(bits=1, symmetric=True), "symmetric"), (dict(format="sign", bits=2), "1-bit"),
    (dict(scale_dtype="int8"), "scale_dtype"), (dict(format="onebit", bits=1), "onebit"),
])
def test_spec_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**bad)


def test_input_errors():
    spec = QuantSpec(bits=4, group_size=128)
    with pytest.raises(ValueError, match="must divide in_features=100"):
        quantize(jnp.ones((4, 100)), spec)
    with pytest.raises(ValueError, match="2-D"):
        quantize(jnp.ones(128), spec)
    with pytest.raises(ValueError, match="2-D"):
        quantize(jnp.ones((2, 2, 128)), spec)
    with pytest.raises(ValueError, match="non-empty"):
        quantize(jnp.ones((0, 128)), spec)
    with pytest.raises(ValueError, match="floating"):
        quantize(jnp.ones((4, 128), jnp.int32), spec)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(jnp.ones((4, 128)).at[1, 2].set(jnp.nan), spec)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(jnp.ones((4, 128)).at[1, 2].set(jnp.inf), spec)
    with pytest.raises(ValueError, match="QuantSpec"):
        quantize(jnp.ones((4, 128)), {"bits": 4})
    with pytest.raises(ValueError, match="QuantizedTensor"):
        dequantize(jnp.ones((4, 4)))


def test_linear_accepts_quantized_weights():
    w = _w((32, 128))
    x = jax.random.normal(jax.random.key(1), (3, 5, 128))
    q = quantize(w, QuantSpec(bits=8, group_size=32))
    y = lowbit.ops.linear(x, q)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ dequantize(q).T), rtol=1e-5, atol=1e-5)
    dense = lowbit.ops.linear(x, w)
    assert float(jnp.linalg.norm(y - dense) / jnp.linalg.norm(dense)) < 0.01  # 8-bit: ~0.5% expected
    with pytest.raises(ValueError, match="in_features"):
        lowbit.ops.linear(jnp.ones((2, 64)), q)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=128, partial_groups=True),
                                  QuantSpec(bits=3, group_size=128, symmetric=True, partial_groups=True),
                                  QuantSpec(bits=1, format="sign", group_size=128, partial_groups=True),
                                  QuantSpec(bits=4, format="nf4", group_size=128, partial_groups=True, clip=True)],
                         ids=lambda s: f"{s.format}{s.bits}{'-sym' if s.symmetric else ''}{'-clip' if s.clip else ''}")
def test_partial_last_group_equals_quantizing_the_pieces(spec):
    """576 columns in groups of 128 (SmolLM2's hidden size): 4 full groups + one of 64, each group
    quantized exactly as if it were its own matrix."""
    w = _w((16, 576), heavy=True)
    q = quantize(w, spec)
    assert q.n_groups == 5 and q.scale_shape == (16, 5)
    d = dequantize(q)
    head = dequantize(quantize(w[:, :512], spec.replace(partial_groups=False)))
    tail = dequantize(quantize(w[:, 512:], spec.replace(group_size=64, partial_groups=False)))
    np.testing.assert_allclose(np.asarray(d), np.asarray(jnp.concatenate([head, tail], axis=1)), rtol=1e-6, atol=1e-6)
    g = jax.grad(lambda x: jnp.sum(fake_quant(x, spec)))(w)
    # STE gradient of the partial-group matrix = the pieces' gradients (1 inside the grid, 0 where clipped)
    g_head = jax.grad(lambda x: jnp.sum(fake_quant(x, spec.replace(partial_groups=False))))(w[:, :512])
    g_tail = jax.grad(lambda x: jnp.sum(fake_quant(x, spec.replace(group_size=64, partial_groups=False))))(w[:, 512:])
    np.testing.assert_array_equal(np.asarray(g), np.asarray(jnp.concatenate([g_head, g_tail], axis=1)))
    assert float(jnp.mean(g)) > 0.5
    with pytest.raises(ValueError, match="partial_groups=True"):
        quantize(w, spec.replace(partial_groups=False))
