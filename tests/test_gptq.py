import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit
from lowbit import QuantSpec, dequantize, quantize
from lowbit.core import numerics
from lowbit.methods.gptq import HessianStat, gptq, hessian_update, inverse_hessian_upper, quantize_weight
from lowbit.core.pack import unpack
from lowbit.core.transforms import calibrate, partition


def _problem(rows=64, cols=256, n=1024, rank=32, seed=0):
    """Heavy-tailed, correlated calibration inputs (like LLM activations) and a weight matrix."""
    k = jax.random.split(jax.random.key(seed), 4)
    W = jax.random.normal(k[0], (rows, cols))
    Z = jax.random.t(k[1], 3.0, (n, rank))
    X = Z @ jax.random.normal(k[2], (rank, cols)) + 0.2 * jax.random.normal(k[3], (n, cols))
    X = X * jnp.exp(0.5 * jax.random.normal(k[3], (cols,)))  # outlier features
    return W, X, _hessian(X)


def _hessian(X):
    return hessian_update(HessianStat(jnp.zeros((X.shape[1],) * 2), jnp.float32(0)), X).H


def _out_err(W, Wq, X):
    return float(jnp.linalg.norm((W - Wq) @ X.T))


SPECS = [QuantSpec(bits=4, group_size=128), QuantSpec(bits=3, group_size=64), QuantSpec(bits=2, group_size=64),
         QuantSpec(bits=4, group_size=None, symmetric=True), QuantSpec(bits=8, group_size=32),
         QuantSpec(bits=4, format="nf4", group_size=64), QuantSpec(bits=4, format="fp4", group_size=32),
         QuantSpec(bits=3, format="codebook", levels=numerics.log_levels(3), group_size=64),
         QuantSpec(bits=1, format="sign", group_size=64), QuantSpec(bits=3, group_size=64, clip=True),
         QuantSpec(bits=4, per_tensor=True)]


@pytest.mark.parametrize("spec, act_order", [(s, i % 2 == 1) for i, s in enumerate(SPECS)] + [(SPECS[0], True)],
                         ids=lambda v: f"{v.format}{v.bits}-g{v.group_size}" if isinstance(v, QuantSpec) else f"ao={v}")
def test_output_error_below_rtn(spec, act_order):
    W, X, H = _problem()
    res = quantize_weight(W, H, spec, act_order=act_order)
    e_gptq = _out_err(W, dequantize(res.q), X)
    e_rtn = _out_err(W, dequantize(quantize(W, spec)), X)
    assert e_gptq < 0.75 * e_rtn, (e_gptq, e_rtn)
    # the QuantizedTensor is consistent: the reference matmul equals x @ dequantize(q).T
    y = lowbit.ops.linear(X[:8], res.q)
    np.testing.assert_allclose(np.asarray(y), np.asarray(X[:8] @ dequantize(res.q).T), rtol=1e-4, atol=1e-3)
    assert res.losses.shape == (W.shape[1],) and bool(jnp.all(res.losses >= 0))


def _numpy_gptq(W, H, bits, g, damp=0.01):
    """Independent float64 definition: one column at a time, no lazy blocks, asymmetric min/max
    groups computed from the error-corrected weights when the group starts."""
    W = np.array(W, np.float64)
    H = np.array(H, np.float64)
    cols = W.shape[1]
    H = H + damp * np.mean(np.diag(H)) * np.eye(cols)
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    maxq = 2**bits - 1
    Q = np.zeros_like(W)
    for i in range(cols):
        if i % g == 0:
            blk = W[:, i:i + g]
            lo, hi = np.minimum(blk.min(1), 0), np.maximum(blk.max(1), 0)
            scale = np.asarray(jnp.asarray((hi - lo) / maxq, jnp.float32).astype(jnp.float16)
                               .astype(jnp.float32), np.float64)
            scale = np.where(scale < (hi - lo) / maxq, np.nextafter(scale.astype(np.float16), np.float16(np.inf))
                             .astype(np.float64), scale)
            zero = np.clip(np.round(-lo / scale), 0, maxq)
        q = (np.clip(np.round(W[:, i] / scale) + zero, 0, maxq) - zero) * scale
        Q[:, i] = q
        err = (W[:, i] - q) / U[i, i]
        W[:, i:] -= np.outer(err, U[i, i:])
    return Q


@pytest.mark.parametrize("blocksize", [16, 128])
def test_matches_a_column_by_column_float64_reference(blocksize):
    W, X, H = _problem(rows=32, cols=192, n=512)
    res = quantize_weight(W, H, QuantSpec(bits=3, group_size=32), blocksize=blocksize)
    ref = _numpy_gptq(W, H, 3, 32)
    got = np.asarray(dequantize(res.q), np.float64)
    agree = np.mean(np.isclose(got, ref, rtol=1e-3, atol=1e-5))
    assert agree > 0.99, agree  # float32 vs float64 may flip a rare rounding tie
    assert abs(_out_err(W, got, X) / _out_err(W, ref, X) - 1) < 0.02


def test_segments_with_a_short_last_one_match_the_reference():
    # 13 blocks of 16 columns run as 7 segments of 2 blocks, the last one of a single block: the
    # left-looking corrections from earlier segments and inside a segment both matter
    W, X, H = _problem(rows=24, cols=208, n=512)
    res = quantize_weight(W, H, QuantSpec(bits=3, group_size=16), blocksize=16)
    ref = _numpy_gptq(W, H, 3, 16)
    got = np.asarray(dequantize(res.q), np.float64)
    assert np.mean(np.isclose(got, ref, rtol=1e-3, atol=1e-5)) > 0.99
    U, _ = inverse_hessian_upper(H, 0.01)   # the explicit factor still equals the float64 one
    Hd = np.asarray(H, np.float64) + 0.01 * np.mean(np.diag(np.asarray(H, np.float64))) * np.eye(208)
    np.testing.assert_allclose(np.asarray(U), np.linalg.cholesky(np.linalg.inv(Hd)).T, rtol=2e-3,
                               atol=2e-3 * float(np.abs(np.asarray(U)).max()))


@pytest.mark.parametrize("spec,kw", [(QuantSpec(bits=3, group_size=16), {}),
                                     (QuantSpec(bits=4, group_size=16), dict(act_order=True, static_groups=True)),
                                     (QuantSpec(bits=4, group_size=None, per_tensor=True), {})])
def test_row_chunks_give_the_unchunked_result(monkeypatch, spec, kw):
    # 27 rows in chunks of at most 8: 4 chunks (7, 7, 7, 6 rows: the last one shorter), each through
    # the segments; codes, scales and the losses (summed over the chunks) equal one pass of all rows
    from lowbit.methods import gptq_core as gptq_mod

    W, X, H = _problem(rows=27, cols=96, n=512)
    whole = quantize_weight(W, H, spec, blocksize=16, **kw)
    monkeypatch.setattr(gptq_mod, "_ROW_CHUNK", 8)
    assert [b - a for a, b in gptq_mod._row_chunks(27)] == [7, 7, 7, 6]
    chunked = quantize_weight(W, H, spec, blocksize=16, **kw)
    assert np.mean(np.asarray(chunked.q.data) == np.asarray(whole.q.data)) > 0.99
    np.testing.assert_allclose(np.asarray(dequantize(chunked.q)), np.asarray(dequantize(whole.q)), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(chunked.losses), np.asarray(whole.losses), rtol=1e-4, atol=1e-6)


def test_blocksize_does_not_change_the_result():
    W, X, H = _problem(cols=320)  # 320 is not a multiple of 128: a padded last block
    outs = [np.asarray(dequantize(quantize_weight(W, H, QuantSpec(bits=4, group_size=64), blocksize=b).q))
            for b in (64, 128, 320, 1000)]
    for o in outs[1:]:
        assert np.mean(np.isclose(o, outs[0], rtol=1e-4, atol=1e-5)) > 0.99


def test_losses_equal_the_output_error_without_dampening():
    W, X, H = _problem(n=2048, rank=256)  # full-rank H
    res = quantize_weight(W, H, QuantSpec(bits=3, group_size=64), damp=1e-6)
    # sum_i (w_i - q_i)^2 / U_ii^2 / 2 = tr(dW H dW^T) / 2 = ||dW X^T||^2 / N for H = 2/N X^T X
    np.testing.assert_allclose(float(jnp.sum(res.losses)),
                               _out_err(W, dequantize(res.q), X) ** 2 / X.shape[0], rtol=0.02)


def test_act_order_never_worse_on_average():
    ratios = []
    for seed in range(4):
        W, X, H = _problem(seed=seed)
        for spec in (QuantSpec(bits=3, group_size=64), QuantSpec(bits=4, group_size=None)):
            plain = _out_err(W, dequantize(quantize_weight(W, H, spec).q), X)
            ao = _out_err(W, dequantize(quantize_weight(W, H, spec, act_order=True).q), X)
            ratios.append(ao / plain)
    assert np.mean(ratios) <= 1.0, ratios


def test_act_order_stores_the_permutation_and_static_groups_do_not_need_it():
    W, X, H = _problem()
    spec = QuantSpec(bits=4, group_size=64)
    q = quantize_weight(W, H, spec, act_order=True).q
    perm = np.asarray(q.perm)
    np.testing.assert_array_equal(perm, np.argsort(-np.diag(np.asarray(H)), kind="stable"))
    # stored (permuted) order dequantizes back to the original column order
    stored = np.asarray(dequantize(q, unpermute=False))
    np.testing.assert_array_equal(np.asarray(dequantize(q))[:, perm], stored)
    qs = quantize_weight(W, H, spec, act_order=True, static_groups=True).q
    assert qs.perm is None
    np.testing.assert_array_equal(np.asarray(qs.scales), np.asarray(quantize(W, spec).scales))
    assert _out_err(W, dequantize(qs), X) < 0.75 * _out_err(W, dequantize(quantize(W, spec)), X)


def test_zero_hessian_is_round_to_nearest():
    W, _, _ = _problem()
    for spec in (QuantSpec(bits=3, group_size=64), QuantSpec(bits=4, group_size=None, symmetric=True)):
        res = quantize_weight(W, jnp.zeros((256, 256)), spec)
        np.testing.assert_array_equal(np.asarray(res.q.data), np.asarray(quantize(W, spec).data))
        assert bool(jnp.all(jnp.isfinite(res.losses)))


def test_dead_columns_keep_their_weights_or_are_zeroed():
    W, X, _ = _problem()
    X = X.at[:, 10:20].set(0.0)
    H = _hessian(X)
    spec = QuantSpec(bits=8, group_size=None)
    q = dequantize(quantize_weight(W, H, spec).q)
    np.testing.assert_allclose(np.asarray(q[:, 10:20]), np.asarray(dequantize(quantize(W, spec))[:, 10:20]))
    qz = dequantize(quantize_weight(W, H, spec, zero_dead=True).q)
    assert float(jnp.max(jnp.abs(qz[:, 10:20]))) < 0.02


def test_singular_hessian_retries_with_more_dampening():
    W, X, _ = _problem(n=8)  # rank 8 << 256
    H = _hessian(X)
    res = quantize_weight(W, H, QuantSpec(bits=4, group_size=64), damp=0.0)
    assert bool(jnp.all(jnp.isfinite(dequantize(res.q))))
    assert float(res.damp) > 0.0
    U, d = inverse_hessian_upper(H, 0.01)
    assert float(d) == pytest.approx(0.01) and bool(jnp.all(jnp.isfinite(U)))


def test_every_width_and_double_quant_with_static_groups():
    W, X, H = _problem()
    for bits in range(2, 9):
        for sym in (bits % 2 == 0,):
            spec = QuantSpec(bits=bits, group_size=64, symmetric=sym)
            e = _out_err(W, dequantize(quantize_weight(W, H, spec).q), X)
            assert e < _out_err(W, dequantize(quantize(W, spec)), X)
    spec = QuantSpec(bits=4, format="nf4", group_size=32, double_quant=True)
    q = quantize_weight(W, H, spec, static_groups=True).q
    assert isinstance(q.scales, tuple)
    assert _out_err(W, dequantize(q), X) < 0.75 * _out_err(W, dequantize(quantize(W, spec)), X)


def test_errors():
    W, _, H = _problem()
    with pytest.raises(ValueError, match="H: expected shape"):
        quantize_weight(W, H[:10], QuantSpec(bits=4))
    with pytest.raises(ValueError, match="NaN"):
        quantize_weight(W, H.at[0, 0].set(jnp.nan), QuantSpec(bits=4))
    with pytest.raises(ValueError, match="onebit"):
        quantize_weight(W, H, QuantSpec(bits=1, format="onebit", group_size=None))
    with pytest.raises(ValueError, match="static_groups"):
        quantize_weight(W, H, QuantSpec(bits=4, group_size=64, double_quant=True))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_weight(W, H, QuantSpec(bits=4), blocksize=0)
    with pytest.raises(ValueError, match="must divide"):
        quantize_weight(W, H, QuantSpec(bits=4, group_size=100))
    with pytest.raises(ValueError, match="W: expected a 2-D"):
        quantize_weight(W[0], H, QuantSpec(bits=4))


def test_transform_accumulates_a_running_mean_and_returns_metrics():
    W, X, H = _problem()
    params = {"a/q_proj": W, "a/k_proj": W[:32], "norm": jnp.ones(256)}
    t = partition([(r"proj", gptq(QuantSpec(bits=4, group_size=64)))])
    halves = [{"a/q_proj": X[:300], "a/k_proj": X[:300]}, {"a/q_proj": X[300:], "a/k_proj": X[300:]}]
    stats = calibrate(t, params, halves)
    np.testing.assert_allclose(np.asarray(stats[0]["a/q_proj"].H), np.asarray(H), rtol=1e-4, atol=1e-4)
    out, metrics = t.apply(params, stats)
    assert set(metrics) == {"a/q_proj", "a/k_proj"}
    assert all(float(m["gptq_loss"]) > 0 and float(m["damp"]) == pytest.approx(0.01) for m in metrics.values())
    # apply is pure: the same under jax.jit (timing and host syncs live in the driver)
    jit_out, jit_metrics = jax.jit(t.apply)(params, stats)
    np.testing.assert_array_equal(np.asarray(jit_out["a/q_proj"].data), np.asarray(out["a/q_proj"].data))
    np.testing.assert_allclose(float(jit_metrics["a/k_proj"]["gptq_loss"]), float(metrics["a/k_proj"]["gptq_loss"]),
                               rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["a/q_proj"].data),
                                  np.asarray(quantize_weight(W, stats[0]["a/q_proj"].H,
                                                             QuantSpec(bits=4, group_size=64)).q.data))
    with pytest.raises(ValueError, match="no calibration activations"):
        t.apply(params, t.init(params))
    # update hands the activations on unchanged (GPTQ is not an equivalence transform)
    _, handed = t.update(t.init(params), halves[0])
    assert handed["a/q_proj"] is halves[0]["a/q_proj"]
    with pytest.raises(ValueError, match="gptq quantizes float 2-D"):
        gptq(QuantSpec(bits=4)).init({"norm": jnp.ones(4)})


def test_packed_codes_are_in_range():
    W, _, H = _problem()
    q = quantize_weight(W, H, QuantSpec(bits=3, group_size=64)).q
    codes = np.asarray(unpack(q.data, 3, 256))
    assert codes.max() <= 7 and q.data.dtype == jnp.uint32


def test_partial_last_group():
    W, X, H = _problem(cols=320)  # groups of 128: 128 + 128 + 64
    spec = QuantSpec(bits=3, group_size=128, partial_groups=True)
    q = quantize_weight(W, H, spec).q
    assert q.n_groups == 3
    assert _out_err(W, dequantize(q), X) < 0.75 * _out_err(W, dequantize(quantize(W, spec)), X)
    z = quantize_weight(W, jnp.zeros((320, 320)), spec).q  # no correction = RTN, partial group included
    np.testing.assert_array_equal(np.asarray(z.data), np.asarray(quantize(W, spec).data))
