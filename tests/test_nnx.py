"""lowbit.interop.nnx: quantizing the nnx.Linear layers of a Flax NNX transformer with lowbit recipes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowbit.core.qtensor import QuantizedTensor, QuantSpec
from lowbit.core.quantizers import dequantize, quantize
from lowbit.core.transforms import identity, partition
from lowbit.interop.nnx import QuantizedLinear, find_linears, quantize_nnx
from lowbit.methods.gptq import gptq
from lowbit.methods.rtn import rtn

VOCAB, D, HEADS, MLP, SEQ, BATCH = 96, 64, 4, 128, 16, 4
SPEC = QuantSpec(bits=3, group_size=32)


class Attention(nnx.Module):
    def __init__(self, rngs):
        self.q = nnx.Linear(D, D, rngs=rngs)
        self.k = nnx.Linear(D, D, rngs=rngs)
        self.v = nnx.Linear(D, D, rngs=rngs)
        self.o = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        b, t, _ = x.shape
        q, k, v = (f(x).reshape(b, t, HEADS, D // HEADS) for f in (self.q, self.k, self.v))
        s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D // HEADS)
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e30)
        y = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)
        return self.o(y.reshape(b, t, D))


class Block(nnx.Module):
    def __init__(self, rngs):
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = Attention(rngs)
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, MLP, rngs=rngs)
        self.down = nnx.Linear(MLP, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class TinyLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.blocks = nnx.List([Block(rngs), Block(rngs)])
        self.ln_f = nnx.LayerNorm(D, rngs=rngs)
        self.head = nnx.Linear(D, VOCAB, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def make_model(seed=0):
    model = TinyLM(nnx.Rngs(seed))
    # Structured embeddings: a rank-6 signal plus noise, and a few outlier feature directions
    # (large, consistently signed) that survive the layer norms, so the layer inputs are far from
    # isotropic and GPTQ's Hessian-aware rounding has something to fix.
    r = np.random.default_rng(seed)
    emb = r.normal(size=(VOCAB, 6)) @ r.normal(size=(6, D)) + 0.3 * r.normal(size=(VOCAB, D))
    outliers = [3, 17, 40]
    emb[:, outliers] = 6.0 + 4.0 * r.normal(size=(VOCAB, len(outliers)))
    model.embed.embedding[...] = jnp.asarray(emb / 3, jnp.float32)
    return model


def token_batches(n, seed):
    """Batches of Zipf-distributed token windows (a few frequent tokens, a long tail)."""
    r = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, VOCAB + 1) ** 1.1
    return [jnp.asarray(r.choice(VOCAB, size=(BATCH, SEQ), p=p / p.sum()), jnp.int32) for _ in range(n)]


RECIPE_GPTQ = partition([(r"head", identity()), (r".*", gptq(SPEC))])
RECIPE_RTN = partition([(r"head", identity()), (r".*", rtn(SPEC))])


@pytest.fixture(scope="module")
def setup():
    model = make_model()
    calib, held_out = token_batches(8, seed=1), token_batches(4, seed=2)
    ref = [model(t) for t in held_out]
    return dict(model=model, calib=calib, held_out=held_out, ref=ref,
                gptq=quantize_nnx(model, RECIPE_GPTQ, calib),
                rtn=quantize_nnx(model, RECIPE_RTN, calib))


def rel_err(model, held_out, ref):
    num = sum(float(jnp.sum((model(t) - y) ** 2)) for t, y in zip(held_out, ref))
    return np.sqrt(num / sum(float(jnp.sum(y ** 2)) for y in ref))


def qweight(module, path) -> QuantizedTensor:
    layer = find_linears(module).get(path)
    assert layer is None, f"{path} is still an nnx.Linear"
    node = module
    for k in path.split("/"):
        node = node[int(k)] if k.isdigit() else getattr(node, k)
    assert isinstance(node, QuantizedLinear)
    return node.weight.get_value()


def test_paths_and_replacement(setup):
    model, q = setup["model"], setup["gptq"]
    paths = set(find_linears(model))
    expected = {f"blocks/{i}/{p}" for i in range(2) for p in ("attn/q", "attn/k", "attn/v", "attn/o", "up", "down")}
    assert paths == expected | {"head"}
    assert set(find_linears(q)) == {"head"}            # the partition rule kept the head dense
    assert type(q.head) is nnx.Linear
    np.testing.assert_array_equal(q.head.kernel[...], model.head.kernel[...])
    for p in expected:
        assert isinstance(qweight(q, p), QuantizedTensor)
    assert isinstance(q.blocks[1].attn.o, QuantizedLinear) and q.blocks[1].attn.o.bias is not None
    # the user's module is untouched
    assert all(type(m) is nnx.Linear for m in find_linears(model).values()) and len(find_linears(model)) == 13
    np.testing.assert_array_equal(model(setup["held_out"][0]), setup["ref"][0])


def test_gptq_beats_rtn_on_held_out_outputs(setup):
    e_gptq = rel_err(setup["gptq"], setup["held_out"], setup["ref"])
    e_rtn = rel_err(setup["rtn"], setup["held_out"], setup["ref"])
    assert 0 < e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    one_shot = quantize_nnx(setup["model"], RECIPE_GPTQ, setup["calib"], sequential=False)
    e_one_shot = rel_err(one_shot, setup["held_out"], setup["ref"])
    assert e_one_shot < e_rtn, (e_one_shot, e_rtn)


def test_first_layer_calibrated_on_its_float_inputs_in_lowbit_layout(setup):
    """blocks/0/attn/q (and k, v: one group) see the float model's ln1(embed(tokens)), W = kernel.T."""
    model, calib = setup["model"], setup["calib"]
    t = gptq(SPEC)
    w = model.blocks[0].attn.q.kernel[...].T
    state = t.init({"q": w})
    for tok in calib:
        state, _ = t.update(state, {"q": model.blocks[0].ln1(model.embed(tok))})
    want = t.apply({"q": w}, state)[0]["q"]
    got = qweight(setup["gptq"], "blocks/0/attn/q")
    np.testing.assert_allclose(dequantize(got), dequantize(want), atol=1e-6)


def test_sequential_uses_quantized_earlier_layers(setup):
    one_shot = quantize_nnx(setup["model"], RECIPE_GPTQ, setup["calib"], sequential=False)
    seq = setup["gptq"]
    same = [jnp.array_equal(qweight(seq, p).data, qweight(one_shot, p).data)
            for p in ("blocks/0/attn/q", "blocks/0/attn/v")]
    assert all(same)                     # first group: both calibrated on float inputs
    # later layers: sequential mode calibrates on the outputs of the quantized earlier layers
    assert not jnp.array_equal(qweight(seq, "blocks/1/down").data, qweight(one_shot, "blocks/1/down").data)


def test_quantized_module_runs_under_jit(setup):
    q, tok = setup["gptq"], setup["held_out"][0]
    eager = q(tok)
    jitted = nnx.jit(lambda m, x: m(x))(q, tok)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
    graphdef, state = nnx.split(q)
    via_jax = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, tok)
    np.testing.assert_allclose(via_jax, eager, rtol=1e-5, atol=1e-5)
    # quantized weights are not nnx.Params (optimizers over nnx.Param leave them alone)
    params = jax.tree_util.tree_leaves(nnx.state(q, nnx.Param))
    assert all(p.dtype != jnp.uint32 for p in params)


def test_data_free_recipe_needs_no_batches(setup):
    model = setup["model"]
    q = quantize_nnx(model, rtn(SPEC), None)
    assert not find_linears(q)          # every layer, head included
    np.testing.assert_array_equal(dequantize(qweight(q, "blocks/1/up")),
                                  dequantize(quantize(model.blocks[1].up.kernel[...].T, SPEC)))
    np.testing.assert_allclose(q.head(jnp.ones((2, D))),
                               jnp.ones((2, D)) @ dequantize(qweight(q, "head")).T, rtol=1e-5, atol=1e-5)


class NoLinears(nnx.Module):
    def __init__(self):
        self.ln = nnx.LayerNorm(4, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.ln(x)


@pytest.mark.parametrize("case, match", [
    ("recipe", r"recipe: expected a lowbit Transform"),
    ("empty", r"calib_batches: empty"),
    ("generator", r"calib_batches: empty"),
    ("none_with_gptq", r"calib_batches: None"),
    ("no_linears", r"module: no nnx.Linear layers found in NoLinears"),
    ("not_a_module", r"module: expected a flax.nnx.Module"),
    ("nnx_jit_inside_forward", r"forward: an nnx.Linear ran on a copy of the module"),
    ("jax_jit_inside_forward", r"forward: the input of the nnx.Linear at 'blocks/0/attn/\w' is a tracer"),
])
def test_bad_inputs(setup, case, match):
    model, calib = setup["model"], setup["calib"][:1]
    args = {
        "recipe": (model, gptq, calib),
        "empty": (model, RECIPE_GPTQ, []),
        "generator": (model, RECIPE_GPTQ, (t for t in [])),
        "none_with_gptq": (model, RECIPE_GPTQ, None),
        "no_linears": (NoLinears(), RECIPE_GPTQ, [jnp.ones((2, 4))]),
        "not_a_module": ({"w": jnp.ones((4, 4))}, RECIPE_GPTQ, calib),
        "nnx_jit_inside_forward": (model, RECIPE_GPTQ, calib),
        "jax_jit_inside_forward": (model, RECIPE_GPTQ, calib),
    }[case]
    kw = {"nnx_jit_inside_forward": {"forward": lambda m, b: nnx.jit(lambda m, b: m(b))(m, b)},
          "jax_jit_inside_forward": {"forward": lambda m, b: jax.jit(lambda b: m(b))(b)}}.get(case, {})
    with pytest.raises(ValueError, match=match):
        quantize_nnx(*args, **kw)
    assert all(type(m) is nnx.Linear for m in find_linears(model).values())  # nothing leaked


class Odd(nnx.Module):
    """A shared layer (two attributes, one object), a layer in a plain list, one that never runs."""

    def __init__(self, rngs):
        self.a = nnx.Linear(8, 8, rngs=rngs)
        self.again = self.a
        self.extra = nnx.data([nnx.Linear(8, 8, rngs=rngs)])
        self.unused = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        return self.extra[0](self.again(self.a(x)))


def test_shared_listed_and_unused_layers():
    m = Odd(nnx.Rngs(0))
    assert set(find_linears(m)) == {"a", "extra/0", "unused"}          # "again" is the same layer as "a"
    x = [jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)), jnp.float32)]
    q = quantize_nnx(m, rtn(QuantSpec(bits=4, group_size=8)), x)
    assert isinstance(q.a, QuantizedLinear) and q.again is q.a and isinstance(q.extra[0], QuantizedLinear)
    assert isinstance(q.unused, QuantizedLinear)                      # data-free: quantized without inputs
    with pytest.raises(ValueError, match=r"params\['unused'\]: no calibration activations"):
        quantize_nnx(m, gptq(QuantSpec(bits=4, group_size=8)), x)     # GPTQ needs inputs: names the layer
    q = quantize_nnx(m, partition([("unused", identity()), (".*", gptq(QuantSpec(bits=4, group_size=8)))]), x)
    assert q.again is q.a and type(q.unused) is nnx.Linear
    np.testing.assert_allclose(q(x[0]), nnx.jit(lambda m, x: m(x))(q, x[0]), rtol=1e-5, atol=1e-5)
