"""Pallas kernels (``kernels/``, installed as ``lowbit.kernels``): layout, references, interpret-mode
kernels on CPU, lowering to Triton / Mosaic (no device needed), ``ops.linear`` dispatch.

Device tests (compiled kernels) are marked ``gpu`` and skipped without a GPU.
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit import QuantSpec, dequantize, ops, quantize
from lowbit.ops import kernel_format
from lowbit.core import numerics
from lowbit.kernels import layout, onebit_matmul as ob, quant_matmul as qm, quant_matmul_tpu as qt
from lowbit.core.quantizers import qlinear

ON_GPU = jax.default_backend() == "gpu"
TOL = 1e-2  # relative Frobenius error allowed for bf16 in / bf16 out


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _q(spec, n, k, seed=0):
    w = jax.random.normal(jax.random.key(seed), (n, k), jnp.float32)
    return quantize(w, spec)


def _x(m, k, seed=1):
    x = jax.random.normal(jax.random.key(seed), (m, k), jnp.float32)
    return (x + 0.1).astype(jnp.bfloat16)  # random, never zero-mean exactly


@jax.jit
def _exact(x, q):
    """``x @ dequantize(q).T`` in float32 (the ground truth)."""
    return jnp.dot(x.astype(jnp.float32), dequantize(q).T, precision=jax.lax.Precision.HIGHEST)


# XLA:CPU compile time dominates interpret-mode tests; -O0 halves it (options local to these calls).
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _interpret(fn, x, kw, **static):
    """``fn(x, kw, interpret=True, **static)``, compiled without backend optimisations."""
    lowered = jax.jit(functools.partial(fn, interpret=True, **static)).lower(x, kw)
    try:
        compiled = lowered.compile(compiler_options=_FAST_COMPILE)
    except Exception:  # an XLA without that option: compile normally
        compiled = lowered.compile()
    return compiled(x, kw)


def _with_perm(q, seed=3):
    perm = jax.random.permutation(jax.random.key(seed), q.shape[1]).astype(jnp.int32)
    return dataclasses.replace(q, perm=perm)


def _with_col_scale(q, seed=4):
    cs = jax.random.uniform(jax.random.key(seed), (q.shape[1],), jnp.float32, 0.5, 2.0).astype(jnp.float16)
    return dataclasses.replace(q, col_scale=cs)


# ----------------------------------------------------------------------------- layout

@pytest.mark.parametrize("bits", layout.SUPPORTED_BITS)
def test_pack_planes_roundtrip(bits):
    tile_rows = 32 if bits in (3, 4) else 16
    pb = layout.pack_block(bits, tile_rows)
    codes = jax.random.randint(jax.random.key(bits), (2 * pb, 256), 0, 2**bits)
    planes = layout.pack_planes(codes, bits, tile_rows)
    assert all(p.dtype == jnp.int32 for p in planes)
    assert sum(p.size for p in planes) * 32 == codes.size * bits  # exactly `bits` bits per code
    np.testing.assert_array_equal(layout.unpack_planes(planes, bits, tile_rows), codes)


@pytest.mark.parametrize("bits", layout.SUPPORTED_BITS)
def test_pieces_enumerate_the_block(bits):
    """Every K row of a pack block comes out of exactly one piece, with its own code."""
    pb = layout.pack_block(bits)
    codes = jax.random.randint(jax.random.key(0), (pb, 128), 0, 2**bits)
    planes = layout.pack_planes(codes, bits)
    seen = np.zeros(pb, int)
    for k_off, c in layout.iter_block_pieces(lambda p, r, n: planes[p][r:r + n], bits, 16, 16):
        np.testing.assert_array_equal(c, codes[k_off:k_off + 16])
        seen[k_off:k_off + 16] += 1
    assert (seen == 1).all()


def test_table_lookup_and_float_trick():
    c = jnp.arange(16, dtype=jnp.int32)[:, None] * jnp.ones((1, 4), jnp.int32)
    got = layout.decode(c, "table", jnp.ones((1, 4), jnp.float32), levels=numerics.NF4_LEVELS)
    np.testing.assert_array_equal(got[:, 0], np.asarray(numerics.NF4_LEVELS, np.float32))
    c8 = jnp.arange(256, dtype=jnp.int32)[:, None]
    np.testing.assert_array_equal(layout.codes_to_f32(c8)[:, 0], np.arange(256, dtype=np.float32))


# ----------------------------------------------------------------------------- conversion + references

REF_SPECS = [
    QuantSpec(bits=b, group_size=g, symmetric=s)
    for b, g, s in [(2, 32, False), (3, 64, False), (3, 128, True), (4, 32, True), (4, None, False),
                    (8, 64, False), (8, None, True), (1, 32, False)]
] + [
    QuantSpec(bits=4, format="nf4", group_size=64), QuantSpec(bits=4, format="fp4", group_size=32),
    QuantSpec(bits=3, format="codebook", levels=numerics.log_levels(3), group_size=32),
    QuantSpec(bits=1, format="sign", group_size=64), QuantSpec(bits=1, format="onebit", group_size=None),
    QuantSpec(bits=4, per_tensor=True), QuantSpec(bits=4, group_size=32, double_quant=True),
    QuantSpec(bits=2, group_size=64, scale_dtype="bfloat16"),
    QuantSpec(bits=4, group_size=256, partial_groups=True),  # 384 = 256 + a short last group
]


def _sid(s):
    return f"{s.format}-b{s.bits}-g{s.group_size}{'-sym' if s.symmetric else ''}{'-t' if s.per_tensor else ''}" \
           f"{'-dq' if s.double_quant else ''}{'-pg' if getattr(s, 'partial_groups', False) else ''}-{s.scale_dtype}"


@pytest.mark.parametrize("spec", REF_SPECS, ids=_sid)
def test_reference_equals_dequantize(spec):
    """to_kernel_layout + *_reference == x @ dequantize(q).T (ragged K, N: padding is invisible)."""
    q = _q(spec, 136, 384)
    x = _x(5, 384)
    kw = kernel_format.to_kernel_layout(q)
    assert kw.k_pad % kw.pack_block == 0 and kw.n_pad % layout.N_ALIGN == 0
    exact = _exact(x, q)
    for ref in (qm.quant_matmul_reference, qt.quant_matmul_tpu_reference):
        assert _rel(ref(x, kw, out_dtype=jnp.float32), exact) < 1e-5
    if spec.format == "onebit":
        assert _rel(ob.onebit_matmul_reference(x, kw, out_dtype=jnp.float32), exact) < 1e-5


@pytest.mark.parametrize("variant", ["perm", "col_scale", "both"])
def test_reference_perm_and_col_scale(variant):
    q = _q(QuantSpec(bits=4, group_size=32), 64, 256)
    if variant in ("perm", "both"):
        q = _with_perm(q)
    if variant in ("col_scale", "both"):
        q = _with_col_scale(q)
    x = _x(3, 256)
    kw = kernel_format.to_kernel_layout(q)
    assert _rel(qm.quant_matmul_reference(x, kw, out_dtype=jnp.float32), _exact(x, q)) < 1e-5


def test_unsupported_conversion_is_explained():
    q = _q(QuantSpec(bits=5, group_size=32), 64, 256)
    assert "bits=5" in kernel_format.check(q)
    with pytest.raises(ValueError, match="bits=5"):
        kernel_format.to_kernel_layout(q)
    assert "group_size=24" in kernel_format.check(_q(QuantSpec(bits=4, group_size=24), 16, 96))
    cb = _q(QuantSpec(bits=5, format="codebook", levels=numerics.log_levels(5), group_size=32), 16, 64)
    assert kernel_format.check(cb) is not None
    tree = kernel_format.prepare({"a": _q(QuantSpec(bits=4, group_size=32), 16, 64), "b": q, "c": jnp.ones(3)})
    assert isinstance(tree["a"], layout.KernelWeight) and tree["b"] is q


# ----------------------------------------------------------------------------- GPU (Triton) kernel, interpret mode

# (spec, M, K, N, block sizes): bits x groups x zeros sampled so that every bit width meets several
# group sizes, both zero kinds, M = 1 / odd / larger, and K, N that are not block multiples.
_S = QuantSpec


def _bs(bits, **kw):
    """Block sizes with one pack block per loop iteration (keeps interpret-mode compiles short)."""
    return qm.BlockSizes(block_k=layout.pack_block(bits), **kw)


GPU_CASES = [
    (_S(bits=4, group_size=32), 1, 320, 200, None),                      # defaults: GEMV, split-K, ragged K, N
    (_S(bits=4, group_size=128, symmetric=True), 7, 384, 136, None),     # defaults: odd M on the dot path
    (_S(bits=4, group_size=None), 40, 256, 256, _bs(4, block_m=32, block_n=64)),
    (_S(bits=2, group_size=64), 1, 512, 256, _bs(2, block_m=1, block_n=128, split_k=2)),
    pytest.param((_S(bits=2, group_size=None), 2, 256, 64, _bs(2, block_m=2, block_n=64)),
                 marks=pytest.mark.slow),
    (_S(bits=2, group_size=128, symmetric=True), 7, 384, 192, _bs(2, block_m=16, block_n=64, split_k=2)),
    (_S(bits=3, group_size=32), 2, 640, 130, None),
    (_S(bits=3, group_size=128, symmetric=True), 16, 512, 256, _bs(3, block_m=16, block_n=128)),
    (_S(bits=8, group_size=32), 1, 96, 64, _bs(8, block_m=1, block_n=64)),
    pytest.param((_S(bits=8, group_size=64, symmetric=True), 7, 320, 136, _bs(8, block_m=16, split_k=5)),
                 marks=pytest.mark.slow),
    (_S(bits=8, group_size=None), 64, 192, 128, _bs(8, block_m=64, block_n=64)),
    (_S(bits=4, group_size=128, partial_groups=True), 5, 320, 128, _bs(4, block_m=16)),  # short last group
    (_S(bits=4, format="nf4", group_size=64), 1, 256, 192, _bs(4, block_m=1)),
    pytest.param((_S(bits=4, format="nf4", group_size=64, double_quant=True), 9, 320, 128, _bs(4, block_m=16)),
                 marks=pytest.mark.slow),
    (_S(bits=3, format="codebook", levels=numerics.log_levels(3), group_size=32), 2, 256, 128, _bs(3, block_m=2)),
    (_S(bits=1, format="sign", group_size=64), 5, 512, 128, _bs(1, block_m=16)),
]


def _case_id(case):
    spec, m, k, n, bs = case.values if hasattr(case, "values") else case
    fields = [f.name for f in dataclasses.fields(bs)] if bs is not None else []
    extra = "".join(f"{f[0]}{f[-1]}{getattr(bs, f)}" for f in fields if f.startswith(("block", "split")))
    extra = f"-{extra}" if extra else ""
    return f"{_sid(spec)}-M{m}-K{k}-N{n}{extra}"


def _check_kernel(fn, ref, q, x, bs, **kw_args):
    kw = kernel_format.to_kernel_layout(q, **kw_args)
    y = _interpret(fn, x, kw, block_sizes=bs)
    assert y.shape == (x.shape[0], q.shape[0]) and y.dtype == jnp.bfloat16
    assert _rel(y, ref(x, kw, out_dtype=jnp.float32)) < TOL
    assert _rel(y, _exact(x, q)) < TOL


@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_quant_matmul_interpret(case):
    spec, m, k, n, bs = case
    _check_kernel(qm.quant_matmul, qm.quant_matmul_reference, _q(spec, n, k), _x(m, k), bs)


def test_quant_matmul_tile_rows_64():
    """A wider layout (64-row word tiles, 32-row pieces for g32): larger dot pieces for large M."""
    q = _q(QuantSpec(bits=4, group_size=32), 136, 640)
    _check_kernel(qm.quant_matmul, qm.quant_matmul_reference, q, _x(3, 640),
                  qm.BlockSizes(block_m=16, block_n=64, block_k=512), tile_rows=64)
    kw = kernel_format.to_kernel_layout(q, tile_rows=64)
    assert kw.pack_block == 512 and kw.k_pad == 1024
    assert "xla.gpu.triton" in _export(lambda x, w: qm.quant_matmul(x, w), "cuda", _x(3, 640), kw)


def test_quant_matmul_perm_col_scale_and_batch_dims():
    q = _with_col_scale(_with_perm(_q(QuantSpec(bits=4, group_size=32), 72, 256)))
    kw = kernel_format.to_kernel_layout(q)
    x = _x(6, 256).reshape(2, 3, 256)
    y = _interpret(qm.quant_matmul, x, kw)
    assert y.shape == (2, 3, 72)
    assert _rel(y.reshape(6, 72), _exact(x.reshape(6, 256), q)) < TOL


def test_resolve_block_sizes():
    kw = kernel_format.to_kernel_layout(_q(QuantSpec(bits=4, group_size=128), 512, 4096))
    bs = qm.resolve_block_sizes(1, kw, None)
    assert bs.block_m == 1 and bs.split_k > 1 and kw.n_blocks % bs.split_k == 0
    assert (kw.n_blocks // bs.split_k) % (bs.block_k // kw.pack_block) == 0
    big = qm.resolve_block_sizes(4096, kw, None)
    assert big.block_m >= 64 and big.split_k == 1
    odd = qm.resolve_block_sizes(7, kw, qm.BlockSizes(block_m=16, block_n=256, split_k=3))
    assert kw.n_blocks % odd.split_k == 0 and kw.n_pad % odd.block_n == 0


def test_check_reasons():
    kw = kernel_format.to_kernel_layout(_q(QuantSpec(bits=4, group_size=32), 64, 256))
    x = _x(2, 256)
    assert "bfloat16" in qm.check(x.shape, jnp.float32, kw, interpret=True)
    assert "backend 'cpu'" in qm.check(x.shape, x.dtype, kw, backend="cpu")
    assert "in_features" in qm.check((2, 100), x.dtype, kw, interpret=True)
    assert "block_k" in qm.check(x.shape, x.dtype, kw, interpret=True, block_sizes=qm.BlockSizes(block_k=100))
    assert qm.can_use(x, kw, interpret=True) and not qm.can_use(x, kw, backend="cpu")
    with pytest.raises(ValueError, match="bfloat16"):
        qm.quant_matmul(x.astype(jnp.float32), kw, interpret=True)
    assert "OneBit" in ob.check(x.shape, x.dtype, kw, interpret=True)
    assert "TPU" in qt.check(x.shape, x.dtype, kw, backend="gpu")


# ----------------------------------------------------------------------------- OneBit kernel

@pytest.mark.parametrize("m,k,n,bs", [
    (1, 300, 200, None),
    (33, 512, 136, qm.BlockSizes(block_m=16, block_n=64, block_k=512, split_k=1)),
])
def test_onebit_matmul_interpret(m, k, n, bs):
    q = _q(QuantSpec(bits=1, format="onebit", group_size=None), n, k)
    _check_kernel(ob.onebit_matmul, ob.onebit_matmul_reference, q, _x(m, k), bs)


# ----------------------------------------------------------------------------- TPU (Mosaic) kernel, interpret mode

TPU_CASES = [
    (_S(bits=4, group_size=32), 1, 320, 200, None),                               # one K step, static rows
    (_S(bits=4, group_size=32), 7, 512, 256, qt.BlockSizes(block_k=256)),         # blocked (8, bn) scales
    (_S(bits=4, group_size=64, symmetric=True), 7, 512, 128, qt.BlockSizes(block_k=128)),  # dynamic rows
    pytest.param((_S(bits=3, group_size=64), 5, 512, 128, None),
                 marks=pytest.mark.slow),
    (_S(bits=2, group_size=128, symmetric=True), 40, 256, 256, qt.BlockSizes(block_m=16)),  # M padded
    pytest.param((_S(bits=8, group_size=None), 2, 192, 130, None),
                 marks=pytest.mark.slow),
    pytest.param((_S(bits=4, format="nf4", group_size=64), 3, 256, 128, None),
                 marks=pytest.mark.slow),
    (_S(bits=1, format="onebit", group_size=None), 2, 512, 128, None),
]


@pytest.mark.parametrize("case", TPU_CASES, ids=_case_id)
def test_quant_matmul_tpu_interpret(case):
    spec, m, k, n, bs = case
    _check_kernel(qt.quant_matmul_tpu, qt.quant_matmul_tpu_reference, _q(spec, n, k), _x(m, k), bs,
                  scale_dtype=jnp.float32)


def test_tpu_resolve_block_sizes():
    kw = kernel_format.to_kernel_layout(_q(QuantSpec(bits=4, group_size=128), 256, 4096))
    bs, mode = qt.resolve_block_sizes(8, kw)
    assert mode == "blocked" and bs.block_k % 1024 == 0 and bs.block_m == 8
    bs, mode = qt.resolve_block_sizes(4096, kw)
    assert bs.block_m == 256 and bs.block_n % 128 == 0


# ----------------------------------------------------------------------------- lowering (no device needed)

def _export(fn, platform, *args):
    from jax import export

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if platform == "cuda" else []
    return export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args).mlir_module()


LOWER_CASES = [
    (_S(bits=4, group_size=128), 1, 4096, 512, qm.BlockSizes(block_m=1, block_n=128, split_k=4)),
    (_S(bits=3, group_size=64), 7, 1024, 256, None),
    (_S(bits=2, group_size=32, symmetric=True), 256, 512, 256, qm.BlockSizes(block_m=64, block_n=128)),
    (_S(bits=8, group_size=None), 2, 320, 200, None),
    (_S(bits=4, format="nf4", group_size=64), 16, 512, 256, None),
]


@pytest.mark.parametrize("case", LOWER_CASES, ids=_case_id)
def test_lowers_to_triton(case):
    """The Pallas -> Triton IR lowering accepts the kernel (power-of-two tiles, supported ops)."""
    spec, m, k, n, bs = case
    kw = kernel_format.to_kernel_layout(_q(spec, n, k))
    txt = _export(lambda x, w: qm.quant_matmul(x, w, block_sizes=bs), "cuda", _x(m, k), kw)
    assert "xla.gpu.triton" in txt
    if spec.bits == 8:
        kw1 = kernel_format.to_kernel_layout(_q(QuantSpec(bits=1, format="onebit", group_size=None), n, k))
        for b in (qm.BlockSizes(block_m=1, split_k=2), qm.BlockSizes(block_m=16)):
            txt = _export(lambda x, w: ob.onebit_matmul(x, w, block_sizes=b), "cuda", _x(m, k), kw1)
            assert "xla.gpu.triton" in txt


@pytest.mark.parametrize("case", LOWER_CASES, ids=_case_id)
def test_lowers_to_mosaic(case):
    """The Pallas -> Mosaic lowering accepts the TPU kernel ((8, 128) blocks, static aligned slices)."""
    spec, m, k, n, _ = case
    kw = kernel_format.to_kernel_layout(_q(spec, n, k), scale_dtype=jnp.float32)
    assert "tpu_custom_call" in _export(lambda x, w: qt.quant_matmul_tpu(x, w), "tpu", _x(m, k), kw)


# ----------------------------------------------------------------------------- ops.linear dispatch

def test_kernel_mode_setter_context_and_jit_cache():
    base = ops.get_kernel_mode()
    with ops.kernel_mode("interpret"):
        assert ops.get_kernel_mode() == "interpret"
    assert ops.get_kernel_mode() == base
    with pytest.raises(ValueError, match="mode"):
        ops.set_kernel_mode("fast")
    # the mode is part of jit's cache key: a function traced under one mode re-traces under another
    traced = []

    @jax.jit
    def f(x):
        traced.append(ops.get_kernel_mode())
        return x + 1

    with ops.kernel_mode("off"):
        f(1.0)
        f(2.0)
    with ops.kernel_mode("interpret"):
        f(1.0)
    assert traced == ["off", "interpret"]


@pytest.mark.parametrize("value, expect", [("off", "off"), ("", "auto"), ("bogus", "LOWBIT_KERNELS")])
def test_kernel_mode_environment_variable(value, expect):
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "from lowbit import ops; print(ops.get_kernel_mode())"],
                       env={**os.environ, "LOWBIT_KERNELS": value, "JAX_PLATFORMS": "cpu"},
                       capture_output=True, text=True, timeout=120)
    assert expect in (r.stdout + r.stderr)


def test_linear_auto_on_cpu_is_the_reference():
    q = _q(QuantSpec(bits=4, group_size=32), 64, 256)
    x = _x(3, 256)
    kw = kernel_format.to_kernel_layout(q)
    with ops.kernel_mode("auto"):
        if jax.default_backend() == "cpu":
            assert ops.select_kernel(x, kw) == (None, False)
            np.testing.assert_array_equal(ops.linear(x, q), qlinear(x, q))
    with ops.kernel_mode("off"):
        np.testing.assert_array_equal(ops.linear(x, q), qlinear(x, q))
        assert _rel(ops.linear(x, kw), qlinear(x, q)) < TOL


@pytest.mark.parametrize("mode", ["interpret", "interpret_tpu"])
def test_linear_dispatches_to_kernels(mode):
    q = _with_perm(_q(QuantSpec(bits=4, group_size=32), 72, 256))  # act-order: x columns permuted
    x = _x(6, 256).reshape(2, 3, 256)
    bias = jnp.linspace(-1, 1, 72)
    ref = qlinear(x, q) + bias.astype(jnp.bfloat16)
    with ops.kernel_mode(mode):
        fn, interp = ops.select_kernel(x, kernel_format.to_kernel_layout(q))
        assert interp and fn.__name__ == ("quant_matmul" if mode == "interpret" else "quant_matmul_tpu")
        y = ops.linear(x, q, bias)
        y_kw = ops.linear(x, kernel_format.prepare(q))
    assert y.shape == (2, 3, 72) and y.dtype == x.dtype
    assert _rel(y, ref) < TOL and _rel(y_kw, qlinear(x, q)) < TOL


def test_linear_dispatch_onebit_and_fallbacks():
    q = _q(QuantSpec(bits=1, format="onebit", group_size=None), 64, 512)
    x = _x(2, 512)
    with ops.kernel_mode("interpret"):
        fn, _ = ops.select_kernel(x, kernel_format.to_kernel_layout(q))
        assert fn.__name__ == "onebit_matmul"
        assert _rel(ops.linear(x, q), qlinear(x, q)) < TOL
        # float32 activations and unsupported weights take the reference path
        xf = x.astype(jnp.float32)
        np.testing.assert_array_equal(ops.linear(xf, q), qlinear(xf, q))
        q5 = _q(QuantSpec(bits=5, group_size=32), 64, 512)
        np.testing.assert_array_equal(ops.linear(x, q5), qlinear(x, q5))
        with pytest.raises(ValueError, match="does not match in_features"):
            ops.linear(_x(2, 500), q)


def test_linear_dense_unchanged():
    w = jax.random.normal(jax.random.key(0), (8, 16))
    x = jax.random.normal(jax.random.key(1), (3, 16))
    np.testing.assert_allclose(ops.linear(x, w, jnp.ones(8)), x @ w.T + 1, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expected a 2-D"):
        ops.linear(x, jnp.ones((2, 8, 16)))
    with pytest.raises(ValueError, match="does not match w in_features"):
        ops.linear(jnp.ones((3, 15)), w)


# ----------------------------------------------------------------------------- exhaustive product (slow)

@pytest.mark.slow
@pytest.mark.parametrize("bits,group,sym,m", list(itertools.product(
    (2, 3, 4, 8), (32, 64, 128, None), (False, True), (1, 7, 48))))
def test_quant_matmul_product(bits, group, sym, m):
    spec = QuantSpec(bits=bits, group_size=group, symmetric=sym)
    _check_kernel(qm.quant_matmul, qm.quant_matmul_reference, _q(spec, 130, 640), _x(m, 640), None)


# ----------------------------------------------------------------------------- device (compiled)

gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("spec,m", [
    (QuantSpec(bits=b, group_size=g), m)
    for b, g, m in [(4, 128, 1), (4, 128, 16), (4, 128, 256), (2, 64, 1), (3, 128, 7), (8, None, 33)]
] + [(QuantSpec(bits=4, format="nf4", group_size=64), 1)], ids=str)
def test_quant_matmul_compiled(spec, m):
    q = _q(spec, 4096 + 128, 4096)
    kw = kernel_format.to_kernel_layout(q)
    x = _x(m, 4096)
    y = qm.quant_matmul(x, kw)
    assert _rel(y, _exact(x, q)) < TOL
    for bs in (qm.BlockSizes(block_m=1, split_k=8), qm.BlockSizes(block_m=16, block_n=256, split_k=1)):
        assert _rel(qm.quant_matmul(x, kw, block_sizes=bs), _exact(x, q)) < TOL


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 5, 64])
def test_onebit_matmul_compiled(m):
    q = _q(QuantSpec(bits=1, format="onebit", group_size=None), 2048, 4096)
    x = _x(m, 4096)
    assert _rel(ob.onebit_matmul(x, kernel_format.to_kernel_layout(q)), _exact(x, q)) < TOL


@pytest.mark.gpu
@gpu
def test_linear_uses_kernel_on_gpu():
    q = _q(QuantSpec(bits=4, group_size=128), 1024, 2048)
    x = _x(4, 2048)
    with ops.kernel_mode("auto"):
        fn, interp = ops.select_kernel(x, kernel_format.to_kernel_layout(q))
        assert fn is qm.quant_matmul and not interp
        assert _rel(jax.jit(ops.linear)(x, q), qlinear(x, q)) < TOL
