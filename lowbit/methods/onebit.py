"""OneBit (Xu et al., NeurIPS 2024, "OneBit: Towards Extremely Low-bit Large Language Models"):
every linear weight becomes ``sign(W)`` (1 bit per weight) and two value vectors, initialised by
sign-value-independent decomposition (SVID) and trained by knowledge distillation from the float
model.

**What the reference does** (``xuyuzhuang11/OneBit``, read for this module; nothing copied):

* the layer (``transformers/.../models/bitnet.py``, ``BitLinear``)::

      y = LayerNorm_noaffine( ((x * b) @ sign(W_latent)^T) * a ),   eps 1e-5, no bias

  ``b`` (``input_factor``) has one value per input column, ``a`` (``weight_scale``) one per output
  row. The parameter-free LayerNorm over the output features (mean and biased variance per token,
  not an RMSNorm) **follows every OneBit linear**: the start checkpoint is therefore *not* an
  approximation of the float layer's output scale (the norm re-scales every token to unit
  variance) and only becomes a good model after distillation. :class:`OneBitWeight` carries the
  norm as a static flag (``norm=False`` gives the bare SVID product, for the "SVID, no training"
  ablation; we report both);
* sign with a straight-through gradient (``SignSTEFunc``): forward ``sign(w)``, backward
  ``grad * (1.001 - tanh(w)^2)`` (:data:`STE_C`; not the identity, not clipped);
* trainable: the latent weights, ``a`` and ``b``; RMSNorm weights, embeddings and ``lm_head``
  are frozen. Converted modules: the seven linears of every block (q, k, v, o, gate, up, down);
* the start checkpoint (``scripts/build_start_ckpt.py``): SVID by scikit-learn's
  ``NMF(n_components=1, init='random', random_state=0)`` on ``|W|`` (coordinate-descent solver,
  Frobenius loss, ``tol=1e-4``, ``max_iter=200``): ``a = W_nmf[:, 0]``, ``b = H_nmf[0]``; the latent
  weights are initialised to ``sign(W) * 0.01`` (:data:`LATENT_INIT`), not to ``W``;
* the loss (``llama_factory/.../kd.py``, with the training scripts' ``kd_alpha 1.0``,
  ``kd_loss_scale 0.01``, ``kd_beta 1``): ``0.01 * KL(teacher || student)`` with temperature 1 and
  ``reduction="batchmean"`` on ``(B, T, V)`` logits (summed over positions and vocabulary, divided
  by ``B`` only) + the *sum over layers* of the mean over tokens of ``|| h_s/|h_s| - h_t/|h_t| ||^2``
  for HF ``hidden_states[0 .. L-1]`` (the embedding output, identical for both, and the outputs of
  blocks ``0 .. L-2``; the last block's output is not compared); no label cross-entropy;
* optimizer: torch AdamW (``betas (0.9, 0.98)``, ``eps 1e-8``, weight decay 0.01, gradient
  clipping 1.0), cosine schedule after 500 warmup steps, lr 4e-4 (LLaMA-7B) / 1e-4 (LLaMA2-7B),
  128 sequences of 2048 tokens per step, 50 epochs of self-generated data (LLM-QAT's protocol:
  a random first token, a few greedy tokens, then sampling).

**How lowbit does it** (the constants above, and these deliberate deviations):

* SVID ``"nmf"`` (:func:`svid_nmf`) runs scikit-learn's rank-1 coordinate-descent NMF as a
  ``lax.while_loop``: the same random init (``numpy.random.RandomState(0)``, ``|N(0, 1)| *
  sqrt(mean|W|)``, H drawn before W), the same updates (for one component each coordinate step is
  the exact non-negative least-squares update ``a = max(|W| b / b.b, 0)``, then ``b``), the same
  stopping rule (projected-gradient violation relative to the first iteration ``<= tol``, at most
  ``max_iter``), in float32 (as scikit-learn on float32 input) with full-precision matrix-vector
  products (``Precision.HIGHEST``: no TF32 on GPUs). ``"svd"``
  (:func:`svid_svd`) takes the leading singular pair of ``|W|`` (non-negative by Perron-Frobenius),
  split evenly: ``a = |u| sqrt(s)``, ``b = |v| sqrt(s)``. Both give the same product ``a b^T`` at
  convergence (the best rank-1 approximation of ``|W|``); they differ in how the scale is split
  between ``a`` and ``b``, which changes Adam's per-parameter steps;
* ``sign(0) = +1`` in the training forward as in the packed model (the reference trains with
  ``torch.sign(0) = 0`` and packs 0 as +1); only an exactly-zero latent is affected, and the
  packed model then computes the trained function: bit for bit on the reference path (float32
  activations, or kernels off), up to bf16 rounding through the Pallas kernel (bf16 activations
  on a GPU), and up to the float16 rounding of ``a`` / ``b`` (:func:`round_vectors`) when the
  training computed in bfloat16;
* the KL term over the ``T - 1`` predicted positions of a window, averaged, times
  ``0.01 * T`` (:func:`onebit_kd_loss`): the reference's ``0.01 * sum_t KL_t / B`` up to the last
  position; the hidden-state term as the reference's sum over the ``L - 1`` compared block outputs
  (the zero embedding term left out);
* weight decay only on the 2-D latent weights (lowbit's optimizer decays ``ndim >= 2`` leaves; the
  reference also decays ``a`` and ``b``);
* the packed model stores ``a`` and ``b`` in float16 (the paper's "two FP16 value vectors"; the
  reference's released checkpoints keep float32): ``1 + 16 (out + in) / (out * in)`` bits per
  weight. :func:`pack` rounds them; :func:`round_vectors` gives the training form the same
  rounding, after which the two forwards are equal on the reference path. Bit convention: code 1
  is +1 (the reference's ``BitLinearInf`` export stores bit 0 as +1; only an export to its int8
  layout would flip them);
* the balance of the two loss terms follows the reference's formula, so it depends on the window
  length: the KL weight ``0.01 T`` is 8x smaller at ``T = 256`` than at the paper's 2048, against
  the same hidden-state term.

**Packed form.** :func:`pack` turns each trained :class:`OneBitWeight` into one whose ``w`` is a
:class:`~lowbit.core.qtensor.QuantizedTensor` of format ``"onebit"`` (1-bit codes packed in uint32
words, ``a`` as the per-row scale, ``b`` as ``col_scale``): :func:`lowbit.ops.linear` runs it
through the OneBit Pallas kernel where the device allows it (``kernels/onebit_matmul.py``:
``((x * b) @ sign(W)^T) * a``) and the jnp reference path elsewhere, then the norm.

**The method** ``onebit`` (``{method: onebit, quant: {bits: 1, format: onebit, group_size: null},
onebit: {svid: nmf}}``) turns every selected linear into a training-form :class:`OneBitWeight`
(data-free, like RTN); ``lowbit run`` rows with ``distill: true`` then train it (its ``training``
hook in the registry: trainable leaves, optimizer, loss; the experiment's ``distill:`` block), and
its ``finalize`` hook packs it before every evaluation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowbit import ops
from lowbit.core import transforms
from lowbit.core.nodes import register_node
from lowbit.core.qtensor import QuantizedMatrix, QuantizedTensor, QuantSpec
from lowbit.core.quantizers import bits_per_param as _qt_bits_per_param, check_matrix, svid_svd as _svid_svd
from lowbit.methods.registry import Training, register
from lowbit.core.checks import float_matrix, is_arraylike, is_int, is_real

__all__ = ["OneBitWeight", "OneBitOptions", "sign_ste", "svid", "svid_nmf", "svid_svd", "init_weight",
           "pack", "round_vectors", "onebit_linear", "onebit_kd_loss", "onebit_optim", "trainable_regex",
           "count_trainable", "LATENT_INIT", "STE_C", "NORM_EPS", "KL_SCALE", "ADAM_B1", "ADAM_B2",
           "WEIGHT_DECAY", "CLIP_NORM", "NMF_MAX_ITER", "NMF_TOL", "SVID_METHODS"]

#: latent weights start at ``sign(W) * LATENT_INIT`` (``build_start_ckpt.py``)
LATENT_INIT = 0.01
#: the STE's backward factor ``STE_C - tanh(w)^2`` (``SignSTEFunc``)
STE_C = 1.001
#: eps of the parameter-free LayerNorm after every OneBit linear (torch's default)
NORM_EPS = 1e-5
#: ``kd_loss_scale``: the weight of the batch-mean KL
KL_SCALE = 0.01
#: torch AdamW as the HF Trainer builds it for the reference's runs
ADAM_B1, ADAM_B2, ADAM_EPS, WEIGHT_DECAY, CLIP_NORM = 0.9, 0.98, 1e-8, 0.01, 1.0
#: scikit-learn NMF defaults (1.4.2)
NMF_MAX_ITER, NMF_TOL = 200, 1e-4
SVID_METHODS = ("nmf", "svd")


# ----------------------------------------------------------------------------- sign with STE


@jax.custom_vjp
def sign_ste(w):
    """``+1`` where ``w >= 0``, else ``-1`` (in ``w``'s dtype), with the reference's gradient
    ``g * (1.001 - tanh(w)^2)``."""
    return jnp.where(w >= 0, 1.0, -1.0).astype(w.dtype)


def _sign_fwd(w):
    return sign_ste(w), w


def _sign_bwd(w, g):
    t = jnp.tanh(w.astype(jnp.float32))
    return ((g.astype(jnp.float32) * (STE_C - t * t)).astype(w.dtype),)


sign_ste.defvjp(_sign_fwd, _sign_bwd)


# ----------------------------------------------------------------------------- SVID


def _nmf_normals(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The draws of scikit-learn's ``init='random'`` for one component: H (1, in) first, then W
    (out, 1), ``|N(0, 1)|`` from ``RandomState(seed)`` as float32 (they depend on the shape only; the
    init is ``sqrt(mean(X))`` times them)."""
    rng = np.random.RandomState(seed)
    h = np.abs(rng.standard_normal(size=(1, shape[1])).astype(np.float32))
    w = np.abs(rng.standard_normal(size=(shape[0], 1)).astype(np.float32))
    return w[:, 0], h[0]


def _cd_update(x, v, u):
    """One coordinate-descent sweep of scikit-learn's ``_update_cdnmf_fast`` for one component:
    update ``u`` (rows of ``x``) for fixed ``v``: ``grad = u * v.v - x v``; the projected gradient
    (``min(grad, 0)`` where ``u == 0``) sums into the violation; ``u = max(u - grad / v.v, 0)``
    (skipped when ``v.v == 0``)."""
    hi = jax.lax.Precision.HIGHEST
    vv = jnp.dot(v, v, precision=hi)
    xv = jnp.dot(x, v, precision=hi)
    grad = u * vv - xv
    pg = jnp.where(u == 0, jnp.minimum(grad, 0.0), grad)
    new = jnp.where(vv != 0, jnp.maximum(u - grad / jnp.where(vv != 0, vv, 1.0), 0.0), u)
    return new, jnp.sum(jnp.abs(pg))


@jax.jit
def _nmf_loop(x, na, nb, max_iter, tol):
    avg = jnp.sqrt(jnp.mean(x))
    a0, b0 = avg * na, avg * nb

    def body(c):
        a, b, it, v0, _ = c
        a, va = _cd_update(x, b, a)
        b, vb = _cd_update(x.T, a, b)
        v = va + vb
        v0 = jnp.where(it == 0, v, v0)
        return a, b, it + 1, v0, v

    def cond(c):
        _, _, it, v0, v = c
        stop = (it > 0) & ((v0 == 0) | (v / jnp.where(v0 == 0, 1.0, v0) <= tol))
        return (it < max_iter) & ~stop

    z = jnp.zeros((), jnp.float32)
    a, b, it, _, _ = jax.lax.while_loop(cond, body, (a0, b0, jnp.zeros((), jnp.int32), z, z))
    return a, b, it


def svid_nmf(w, *, max_iter: int = NMF_MAX_ITER, tol: float = NMF_TOL, seed: int = 0):
    """SVID by rank-1 NMF of ``|w|`` as the reference runs it (scikit-learn ``NMF(n_components=1,
    init='random', random_state=seed)``, coordinate descent; see the module docstring).
    Returns ``(a (out,), b (in,), iterations)``, float32, ``|w| ~ outer(a, b)``, ``a, b >= 0``.
    A zero row (column) of ``w`` gives ``a`` (``b``) 0 there; an all-zero ``w`` gives zeros."""
    a, b, it = _svid_nmf(w, max_iter, tol, seed)
    return a, b, int(it)


def _svid_nmf(w, max_iter: int, tol: float, seed: int = 0):
    """:func:`svid_nmf` without reading the iteration count back (jit-traceable)."""
    x = jnp.abs(jnp.asarray(w, jnp.float32))
    na, nb = _nmf_normals(x.shape, seed)
    return _nmf_loop(x, jnp.asarray(na), jnp.asarray(nb), jnp.int32(max_iter), jnp.float32(tol))


svid_svd = jax.jit(_svid_svd)   # the format "onebit"'s own SVID (lowbit.core.quantizers), jitted


def svid(w, method: str = "nmf", **kw):
    """``(a, b)`` of ``|w| ~ outer(a, b)`` by ``method`` (:data:`SVID_METHODS`)."""
    if method == "nmf":
        return svid_nmf(w, **kw)[:2]
    if method == "svd":
        return svid_svd(w)
    raise ValueError(f"svid={method!r}: expected one of {SVID_METHODS}")


# ----------------------------------------------------------------------------- the weight type


@dataclasses.dataclass(frozen=True)
class OneBitWeight(QuantizedMatrix):
    """A OneBit linear weight ``(out, in)`` (see the module docstring). A pytree:

    * training form: ``w`` the float latent weights ``(out, in)`` (only their signs reach the
      forward), ``a (out,)``, ``b (in,)`` float;
    * packed form (:func:`pack`): ``w`` a ``"onebit"`` :class:`QuantizedTensor` holding the sign
      bits and ``a`` / ``b`` (float16), ``a = b = None``.

    Static: ``norm`` (the parameter-free LayerNorm after the product, the reference's layer) and
    its ``eps``. :func:`lowbit.ops.linear` computes :func:`onebit_linear`.
    """

    w: Any
    a: Any = None
    b: Any = None
    norm: bool = True
    eps: float = NORM_EPS

    def __post_init__(self):
        if self.packed:
            if self.w.format != "onebit" or self.a is not None or self.b is not None:
                raise ValueError("OneBitWeight: a packed weight is a format-'onebit' QuantizedTensor with "
                                 f"a = b = None, got format {self.w.format!r}")
            return
        if not (is_arraylike(self.w) and is_arraylike(self.a) and is_arraylike(self.b)):
            return  # pytree placeholders (tree_unflatten, vmap specs)
        if self.w.ndim != 2 or self.a.shape != (self.w.shape[0],) or self.b.shape != (self.w.shape[1],):
            raise ValueError(f"OneBitWeight: latent {tuple(self.w.shape)}, a {tuple(self.a.shape)}, b "
                             f"{tuple(self.b.shape)}: expected (out, in), (out,), (in,)")

    @property
    def packed(self) -> bool:
        return isinstance(self.w, QuantizedTensor)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(d) for d in self.w.shape[-2:])

    @property
    def dtype(self):
        return jnp.float32

    @property
    def T(self):
        raise TypeError("OneBitWeight has no transpose; use lowbit.ops.linear")

    def ckpt_fields(self) -> tuple[dict, dict]:
        return {"w": self.w, "a": self.a, "b": self.b}, {"norm": bool(self.norm), "eps": float(self.eps)}

    @classmethod
    def from_ckpt(cls, fields: dict, meta: dict) -> "OneBitWeight":
        return cls(fields["w"], fields.get("a"), fields.get("b"), bool(meta["norm"]), float(meta["eps"]))

    def dequantize(self, dtype=jnp.float32):
        """The dense ``sign(W) * outer(a, b)`` (the product *before* the output norm: with
        ``norm=True`` the layer is not ``x @ dequantize().T``)."""
        if self.packed:
            from lowbit.core.quantizers import dequantize

            return dequantize(self.w, dtype)
        s = jnp.where(self.w >= 0, 1.0, -1.0)
        return (s * self.a.astype(jnp.float32)[:, None] * self.b.astype(jnp.float32)[None, :]).astype(dtype)

    def bits_per_param(self, scale_dtype: str = "float16") -> float:
        """Stored bits per weight of the packed form (1-bit codes in uint32 words + the two vectors
        in ``scale_dtype``; for the training form: what :func:`pack` would store)."""
        if self.packed:
            return _qt_bits_per_param(self.w)
        out, inp = self.shape
        words = -(-inp // 32)
        return (out * words * 32 + (out + inp) * 8 * jnp.dtype(scale_dtype).itemsize) / (out * inp)

    def describe(self) -> dict:
        """The per-layer report fields of the calibration driver."""
        return dict(format="onebit", bits=1, group_size=self.shape[1], act_order=False,
                    bits_per_param=self.bits_per_param(), norm=bool(self.norm))

    def __repr__(self):
        form = "packed" if self.packed else "latent"
        return f"OneBitWeight(shape={self.shape}, {form}, norm={self.norm})"


jax.tree_util.register_dataclass(OneBitWeight, data_fields=["w", "a", "b"], meta_fields=["norm", "eps"])
register_node("onebit", OneBitWeight)


def _layer_norm(y, eps: float):
    """Parameter-free LayerNorm over the last axis (mean and biased variance), in float32."""
    y32 = y.astype(jnp.float32)
    mu = jnp.mean(y32, axis=-1, keepdims=True)
    d = y32 - mu
    return (d * jax.lax.rsqrt(jnp.mean(d * d, axis=-1, keepdims=True) + eps)).astype(y.dtype)


def onebit_linear(x, w: OneBitWeight):
    """``LN(((x * b) @ sign(W)^T) * a)`` for ``x (..., in)`` (the norm only with ``w.norm``).

    Training form: the product as ``x @ (sign_ste(latent) * outer(a, b))^T`` in float32, the same
    computation as the packed form's reference path (dequantize, then one float32 matmul), so a
    packed model equals its training form with float16-rounded vectors (:func:`round_vectors`).
    Packed form: :func:`lowbit.ops.linear` on the QuantizedTensor (the OneBit kernel or the
    reference path), then the norm."""
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x: last axis {x.shape[-1]} does not match in_features {w.shape[1]} of {w!r}")
    if w.packed:
        y = ops.linear(x, w.w)
    else:
        s = sign_ste(w.w.astype(jnp.float32))
        weff = s * w.a.astype(jnp.float32)[:, None] * w.b.astype(jnp.float32)[None, :]
        y = jnp.einsum("...i,oi->...o", x.astype(jnp.float32), weff).astype(x.dtype)
    return _layer_norm(y, w.eps) if w.norm else y


ops.register_matmul(OneBitWeight, onebit_linear)


def init_weight(w, *, svid_method: str = "nmf", latent_init: float = LATENT_INIT, norm: bool = True,
                nmf_max_iter: int = NMF_MAX_ITER, nmf_tol: float = NMF_TOL, name: str = "w") -> OneBitWeight:
    """The reference's start point for one matrix: latent ``sign(W) * latent_init``, ``a``, ``b``
    from SVID of ``|W|`` (float32)."""
    w = check_matrix(w, name).astype(jnp.float32)   # 2-D, finite (else a ValueError naming ``name``)
    if svid_method == "nmf":
        a, b, _ = _svid_nmf(w, nmf_max_iter, nmf_tol)
    else:
        a, b = svid(w, svid_method)
    return OneBitWeight(jnp.sign(w) * jnp.float32(latent_init), a, b, bool(norm), NORM_EPS)


def _is_onebit(x) -> bool:
    return isinstance(x, OneBitWeight)


def _map(params, fn):
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=_is_onebit)
    return jax.tree_util.tree_unflatten(treedef, [fn(v) if _is_onebit(v) else v for v in leaves])


def _vector_dtype(scale_dtype: str):
    if scale_dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"scale_dtype={scale_dtype!r}: expected float16, bfloat16 or float32")
    return jnp.dtype(scale_dtype)


def round_vectors(params, scale_dtype: str = "float16"):
    """Training-form OneBitWeights with ``a`` / ``b`` rounded to ``scale_dtype`` (kept float32): the
    function the packed model computes."""
    dt = _vector_dtype(scale_dtype)
    return _map(params, lambda v: v if v.packed else dataclasses.replace(
        v, a=v.a.astype(dt).astype(jnp.float32), b=v.b.astype(dt).astype(jnp.float32)))


def pack(params, scale_dtype: str = "float16"):
    """Every training-form :class:`OneBitWeight` of ``params`` -> its packed form (sign bits packed
    32 per uint32 word, ``a`` / ``b`` in ``scale_dtype``). Raises naming the first weight whose
    vectors are not finite (or overflow ``scale_dtype``)."""
    from lowbit.core.pack import pack as pack_bits

    dt = _vector_dtype(scale_dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_onebit)
    out = []
    for kp, v in leaves:
        if _is_onebit(v) and not v.packed:
            a, b = v.a.astype(dt), v.b.astype(dt)
            if not (bool(jnp.all(jnp.isfinite(a))) and bool(jnp.all(jnp.isfinite(b)))):
                raise ValueError(f"{transforms.path_str(kp)}: OneBit value vectors are not finite in {scale_dtype} "
                                 "(diverged training, or values beyond the dtype's range)")
            codes = (v.w >= 0).astype(jnp.uint8)
            qt = QuantizedTensor(data=pack_bits(codes, 1), scales=a[:, None], col_scale=b, shape=v.shape, bits=1,
                                 group_size=v.shape[1], format="onebit")
            v = OneBitWeight(qt, None, None, v.norm, v.eps)
        out.append(v)
    return jax.tree_util.tree_unflatten(treedef, out)


def trainable_regex() -> str:
    """Paths of the trainable leaves of training-form OneBitWeights: ``<linear>/w``, ``/a``, ``/b``
    (norms, embeddings and lm_head stay frozen, as in the reference)."""
    return r"_proj/(w|a|b)$"


def count_trainable(params) -> int:
    """Number of trainable OneBit parameters (latent weights + vectors)."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=_is_onebit)
    return int(sum(v.w.size + v.a.size + v.b.size for v in leaves if _is_onebit(v) and not v.packed))


# ----------------------------------------------------------------------------- training recipe


def onebit_kd_loss(cfg, teacher_cfg, seqlen: int, n_layers: int, remat: bool = True):
    """The reference's distillation loss for windows of ``seqlen`` tokens of an ``n_layers`` model,
    as :func:`lowbit.train.losses.distill_loss` weights (module docstring)::

        0.01 * T * mean_t KL_t(teacher || student)  +  sum_{i < L-1} mean_t || n(h_s,i) - n(h_t,i) ||^2

    temperature 1, no label cross-entropy."""
    from lowbit.train.losses import distill_loss

    if n_layers < 2:
        raise ValueError(f"n_layers={n_layers}: OneBit's hidden-state loss compares blocks 0..L-2; needs L >= 2")
    return distill_loss(cfg, teacher_cfg, temperature=1.0, kl_weight=KL_SCALE * int(seqlen), ce_weight=0.0,
                        mse_weight=float(n_layers - 1), layers=tuple(range(n_layers - 1)), remat=remat)


def onebit_optim(lr: float = 4e-4, warmup_steps: int = 0):
    """The reference's optimizer: AdamW (0.9, 0.98), eps 1e-8, weight decay 0.01 (2-D leaves), clip
    1.0, linear warmup then cosine to 0. The reference uses lr 4e-4 (LLaMA-7B) and 500 warmup steps."""
    from lowbit.train.optim import OptimCfg

    return OptimCfg(lr=lr, warmup_steps=warmup_steps, schedule="cosine", min_lr_ratio=0.0,
                    weight_decay=WEIGHT_DECAY, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS, clip_norm=CLIP_NORM)


# ----------------------------------------------------------------------------- the method


@dataclasses.dataclass(frozen=True)
class OneBitOptions:
    """``svid``: ``"nmf"`` (the reference) or ``"svd"``; ``norm``: the LayerNorm after every OneBit
    linear (the reference's layer; ``false``: the bare SVID product); ``latent_init``: latent
    weights start at ``sign(W) * latent_init``; ``nmf_max_iter`` / ``nmf_tol``: scikit-learn's."""
    svid: str = "nmf"
    norm: bool = True
    latent_init: float = LATENT_INIT
    nmf_max_iter: int = NMF_MAX_ITER
    nmf_tol: float = NMF_TOL

    def __post_init__(self):
        if self.svid not in SVID_METHODS:
            raise ValueError(f"onebit.svid={self.svid!r}: expected one of {SVID_METHODS}")
        if not isinstance(self.norm, bool):
            raise ValueError(f"onebit.norm={self.norm!r}: expected a bool")
        li = self.latent_init
        if not is_real(li) or not math.isfinite(li) or li <= 0:
            raise ValueError(f"onebit.latent_init={li!r}: expected a finite number > 0")
        if not is_int(self.nmf_max_iter) or self.nmf_max_iter < 1:
            raise ValueError(f"onebit.nmf_max_iter={self.nmf_max_iter!r}: expected a positive int")
        if not is_real(self.nmf_tol) or not self.nmf_tol >= 0:
            raise ValueError(f"onebit.nmf_tol={self.nmf_tol!r}: expected a number >= 0")


@register("onebit", options=OneBitOptions,
          help="OneBit: sign(W) and two value vectors from SVID (NMF or SVD); distill: true trains it",
          data_free=True,
          # evaluated, sized and stored packed (1-bit codes + the two vectors in the row's scale dtype)
          finalize=lambda params, spec: pack(params, spec.scale_dtype),
          training=Training(trainable=trainable_regex, optim=onebit_optim, loss=onebit_kd_loss, count=count_trainable))
def _onebit_method(spec: QuantSpec, opts: OneBitOptions) -> transforms.Transform:
    if spec is None or spec.format != "onebit" or spec.bits != 1 or spec.group_size is not None:
        got = None if spec is None else f"bits={spec.bits}, format={spec.format!r}, group_size={spec.group_size}"
        raise ValueError(f"onebit: the row's quant must be {{bits: 1, format: onebit, group_size: null}}, got {got}")
    return onebit(opts)


def onebit(opts: OneBitOptions = OneBitOptions()) -> transforms.Transform:
    """Data-free Transform: every 2-D float matrix it is given -> a training-form :class:`OneBitWeight`."""

    def apply(params, state):
        del state
        out = {}
        for path, w in params.items():
            float_matrix(path, w, "OneBit", hint="resume a OneBit run from a OneBit checkpoint, or start from "
                                                  "the float model")
            out[path] = init_weight(w, svid_method=opts.svid, latent_init=opts.latent_init, norm=opts.norm,
                                    nmf_max_iter=opts.nmf_max_iter, nmf_tol=opts.nmf_tol, name=f"params[{path!r}]")
        return out, {}

    return transforms.Transform(init=lambda params: (), apply=apply)
