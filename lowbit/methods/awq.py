"""AWQ: activation-aware weight quantization (Lin, Tang, Tang, Yang, Dang, Gan, Han; MLSys 2024).

AWQ protects the input channels that see large activations by an equivalence scaling: a linear
``y = x W^T`` fed by a producer (a norm, or another linear) becomes ``y = (x / s) (W s)^T`` with the
``1 / s`` folded into the producer, so only ``W s`` is quantized. Per block, following the
reference code (mit-han-lab/llm-awq, ``awq/quantize/auto_scale.py``, ``auto_clip.py``,
``pre_quant.py``):

**Scale search** (``auto_scale_block``), per group of linears sharing a producer
(:func:`lowbit.models.common.scale_groups`: ``input_layernorm -> q, k, v``; ``v_proj -> o_proj``;
the MLP norm ``-> gate, up``; ``up_proj -> down_proj``)::

    x_mean = mean over tokens of |x|              per input channel (the reference's get_act_scale)
    for r in 0, 1/20, ..., 19/20:
        s = clamp(x_mean ** r, min=1e-4);  s = s / sqrt(max(s) * min(s))
        W' = Q(W * s) / s   for every linear of the group (the rest of the block in float)
        loss(r) = mean((module(x; W) - module(x; W'))^2)      float32
    keep the first r with the smallest loss

where ``module`` is the sub-module the linears feed: the attention (q/k/v projections, RoPE,
attention and ``o_proj``) for q/k/v, the MLP (gate/up, activation, ``down_proj``) for gate/up, and
the linear itself for ``o_proj`` and ``down_proj``. ``o_proj`` is skipped when the ``v_proj`` and
``o_proj`` weights differ in shape (grouped-query attention, e.g. SmolLM2: 3 KV heads for 9
query heads; the reference's rule, llm-awq PR 67). All groups are searched on the block as it came
in, then every scale is applied (producer divided by ``s``: a norm weight as ``(offset + w) / s -
offset``, a producing linear's last ``len(s)`` rows and bias; the linears' columns multiplied by
``s``), and the captured inputs are divided by ``s`` for the clip search.

**Clip search** (``auto_clip_block``), per linear except the q/k projections (the reference skips
them: "due to qk bmm, it is hard to clip precisely"): per output row and input group, the
symmetric max-abs range is shrunk by ``1 - i/20, i = 0..9``; each candidate's weights
``clamp(W, -m, m)`` are fake-quantized and the error is the mean over tokens of the squared
*per-group partial output* ``sum_k x[t, g, k] W[o, g, k]`` on the scaled inputs, sub-sampled with the
stride ``n_tokens // 512``; the best ``m`` per (row, group) clamps the weights.

Both searches are jitted: the ratio grid and the shrink grid are ``lax.map`` loops and the
calibration windows are mapped in batches inside the same program (one compilation per distinct
group shape, reused by every block).

**Calibration and data flow.** :func:`awq` is a :class:`~lowbit.core.transforms.Transform` with a
``prepare`` stage: the calibration driver (:mod:`lowbit.calib.driver`) captures, in one pass of the
*float* block over every calibration window, the inputs of the block's linears and hands them to
``prepare``, which returns the scaled and clipped float block. The quantizer that follows in the
:func:`~lowbit.core.transforms.chain` then runs on that block: ``awq`` + RTN (the reference's real
quantization) or ``awq`` + GPTQ, whose Hessian is built from the inputs of the scaled block, i.e.
``x / s``. With RTN the next block's inputs are the float block's outputs (the reference); with
GPTQ they are the quantized block's outputs (GPTQ's convention).

**Deviations from the reference**, chosen and stated:

- the fake quantizer in both searches is lowbit's, with the row's ``QuantSpec`` (asymmetric int:
  the GPTQ-style range ``[min(w, 0), max(w, 0)]``), i.e. exactly what the final weights are
  quantized with; the reference's ``pseudo_quantize_tensor`` uses ``[min(w), max(w)]`` without
  including 0 and clamps the scale at 1e-5. Other formats (NF4, FP4, symmetric int) work the same;
- calibration: the experiment's calibration windows (the same ones as every other method; the
  reference samples 128 x 512 tokens of pile-val). ``skip_first`` / ``token_cap`` do not apply to
  AWQ's searches (they see whole windows);
- a partial last group (``partial_groups``: SmolLM2's 576 inputs in groups of 128) is zero-padded
  in the clip search (the reference asserts divisibility); the clip search's token stride is at
  least 1 (the reference's ``n // 512`` is 0 below 512 tokens);
- the clip search runs on all output rows at once (the reference batches rows by 64 / 256 only to
  save GPU memory: same result).

Per linear, the driver's report rows (``layers.csv``) gain ``awq_ratio`` (the chosen ``r``),
``awq_loss`` and ``awq_loss_r0`` (the module-output loss at the chosen ratio and at ``r = 0``, plain
fake quantization: ``awq_loss <= awq_loss_r0`` always) and ``awq_clip`` (mean chosen shrink factor).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lowbit import ops
from lowbit.core.checks import float_matrix, is_int
from lowbit.core.qtensor import QuantizedTensor, QuantSpec
from lowbit.core.quantizers import fake_quant, grouped, resolve_group_size
from lowbit.core.transforms import Context, Transform, chain, get_path, set_path, unflatten
from lowbit.methods.registry import register

__all__ = ["AWQOptions", "awq", "search_scale", "search_clip", "fold_scale", "N_GRID", "CLIP_GRID",
           "CLIP_MAX_SHRINK", "CLIP_TOKENS", "SCALE_MIN", "NO_CLIP"]

N_GRID = 20            # ratios r = i / 20, i = 0..19
SCALE_MIN = 1e-4       # s = clamp(x_mean ** r, min=1e-4)
CLIP_GRID = 20         # shrink factors 1 - i / 20 ...
CLIP_MAX_SHRINK = 0.5  # ... for i < 0.5 * 20 = 10
CLIP_TOKENS = 512      # tokens sampled (by stride) for the clip search
NO_CLIP = ("q_proj", "k_proj")   # the reference's "q_", "k_" (and query/key/Wqkv) names


@dataclasses.dataclass(frozen=True)
class AWQOptions:
    """Options of the ``awq`` method (the reference's constants by default).

    ``then``: the quantizer that runs on the scaled block (``rtn``: the reference; ``gptq``: AWQ +
    GPTQ, with ``act_order`` and ``damp`` for it); ``clip``: run the clip search (llm-awq's
    ``mse_range``); ``search_batch``: calibration windows per vectorized module forward inside the
    searches (memory only, no effect on the result).
    """
    then: str = "rtn"
    n_grid: int = N_GRID
    clip: bool = True
    clip_grid: int = CLIP_GRID
    clip_max_shrink: float = CLIP_MAX_SHRINK
    clip_tokens: int = CLIP_TOKENS
    search_batch: int = 4
    act_order: bool = False
    damp: float = 0.01

    def __post_init__(self):
        if self.then not in ("rtn", "gptq"):
            raise ValueError(f"then={self.then!r}: expected 'rtn' or 'gptq' (the quantizer after the scaling)")
        for name in ("clip", "act_order"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a bool")
        for name in ("n_grid", "clip_grid", "clip_tokens", "search_batch"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"{name}={v!r}: expected a positive int")
        if not 0.0 <= float(self.clip_max_shrink) < 1.0:
            raise ValueError(f"clip_max_shrink={self.clip_max_shrink!r}: expected 0 <= value < 1")
        if not (isinstance(self.damp, (int, float)) and 0.0 < float(self.damp) < 1.0):
            raise ValueError(f"damp={self.damp!r}: expected a float in (0, 1)")


@register("awq", options=AWQOptions,
          help="AWQ: activation-aware scaling + clipping (Lin et al. 2024), then RTN or GPTQ")
def _awq_method(spec: QuantSpec, opts: AWQOptions) -> Transform:
    if opts.then == "gptq":
        from lowbit.methods.gptq import gptq

        return chain(awq(spec, opts), gptq(spec, act_order=opts.act_order, damp=opts.damp))
    from lowbit.methods.rtn import rtn

    return chain(awq(spec, opts), rtn(spec))


# ----------------------------------------------------------------------------- the searches

def _scales(x_mean, ratio):
    s = jnp.maximum(x_mean ** ratio, SCALE_MIN)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("module_fn", "name", "paths", "spec", "n_grid", "batch"))
def _search_scale(layer, h, *, module_fn, name, paths, spec, n_grid, batch):
    """Losses of every ratio and the best scales (see the module docstring)."""
    hf = h.astype(jnp.float32)
    x_mean = jnp.mean(jnp.abs(hf).reshape(-1, h.shape[-1]), axis=0)

    def run(lyr):
        if name is None:          # the linear itself (o_proj, down_proj): one matmul over every token
            return ops.linear(h, get_path(lyr, paths[0]))
        return jax.lax.map(lambda hb: module_fn(lyr, name, hb[None])[0], h, batch_size=batch)

    org = run(layer).astype(jnp.float32)

    def loss(ratio):
        s = _scales(x_mean, ratio)
        lyr = layer
        for p in paths:
            w = get_path(layer, p).astype(jnp.float32)
            lyr = set_path(lyr, p, (fake_quant(w * s[None, :], spec) / s[None, :]).astype(get_path(layer, p).dtype))
        return jnp.mean((org - run(lyr).astype(jnp.float32)) ** 2)

    ratios = jnp.arange(n_grid, dtype=jnp.float32) / n_grid
    losses = jax.lax.map(loss, ratios)
    best = jnp.argmin(losses)          # the first minimum, as the reference's strict "<"
    return losses, best, _scales(x_mean, ratios[best])


def search_scale(layer, h, paths: tuple[str, ...], name: str | None, spec: QuantSpec, *, module_fn=None,
                 n_grid: int = N_GRID, batch: int = 4):
    """AWQ's scale search for the linears ``paths`` (relative to ``layer``) sharing the input ``h``
    (``(windows, T, in)``; for ``name=None`` any ``(n, in)``-shaped rows): returns ``(losses (n_grid,),
    index of the best ratio, scales (in,))``. ``name``: the sub-module compared (``"self_attn"`` /
    ``"mlp"`` through ``module_fn(layer, name, h)``), or None for the single linear's own output."""
    if name is not None and module_fn is None:
        raise ValueError(f"module_fn: needed to search the scales of {paths} on the {name!r} output")
    if name is None and len(paths) != 1:
        raise ValueError(f"paths={paths}: a search on a linear's own output takes exactly one linear")
    return _search_scale(layer, h, module_fn=module_fn, name=name, paths=tuple(paths), spec=spec,
                         n_grid=int(n_grid), batch=int(batch))


@functools.partial(jax.jit, static_argnames=("spec", "n_grid", "max_shrink"))
def _search_clip(w, x, *, spec, n_grid, max_shrink):
    rows, cols = w.shape
    g = resolve_group_size(spec, cols)
    w = w.astype(jnp.float32)
    wg, _ = grouped(w, g)                                   # (rows, ng, g), zero-padded
    xg, _ = grouped(x.astype(jnp.float32), g)               # (n, ng, g)
    org_max = jnp.max(jnp.abs(wg), axis=-1, keepdims=True)  # (rows, ng, 1)
    org_out = jnp.einsum("rgk,ngk->rng", wg, xg)

    def err(i):
        m = org_max * (1.0 - i / n_grid)
        cw = jnp.clip(wg, -m, m).reshape(rows, -1)[:, :cols]
        qg, _ = grouped(fake_quant(cw, spec), g)
        return jnp.mean((jnp.einsum("rgk,ngk->rng", qg, xg) - org_out) ** 2, axis=1)   # (rows, ng)

    errs = jax.lax.map(err, jnp.arange(int(max_shrink * n_grid), dtype=jnp.float32))
    best = jnp.argmin(errs, axis=0)                                                     # first minimum
    return org_max[..., 0] * (1.0 - best.astype(jnp.float32) / n_grid), org_max[..., 0]


def search_clip(w, x, spec: QuantSpec, *, n_grid: int = CLIP_GRID, max_shrink: float = CLIP_MAX_SHRINK,
                n_tokens: int = CLIP_TOKENS):
    """AWQ's clip search: the max-abs bound per (output row, input group) of ``w (out, in)`` that
    minimises the squared error of the group's partial outputs on the rows of ``x (..., in)``
    (sub-sampled with stride ``max(n // n_tokens, 1)``). Returns ``(max_val, org_max)``, both
    ``(out, n_groups)``."""
    x = jnp.asarray(x).reshape(-1, w.shape[1])
    x = x[:: max(x.shape[0] // int(n_tokens), 1)]
    return _search_clip(jnp.asarray(w), x, spec=spec, n_grid=int(n_grid), max_shrink=float(max_shrink))


def _apply_clip(w, max_val, spec: QuantSpec):
    rows, cols = w.shape
    wg, _ = grouped(jnp.asarray(w, jnp.float32), resolve_group_size(spec, cols))
    m = max_val[..., None]
    return jnp.clip(wg, -m, m).reshape(rows, -1)[:, :cols].astype(w.dtype)


# ----------------------------------------------------------------------------- folding

def _bias_path(producer: str) -> str | None:
    return producer[: -len("_proj")] + "_bias" if producer.endswith("_proj") else None


def fold_scale(block: dict, producer: str, linears, s, norm_offset: float = 0.0) -> dict:
    """Fold ``x -> x / s`` into ``block`` (``{path: leaf}``): the producer divided by ``s`` (a norm
    weight as ``(offset + w) / s - offset``; a producing linear's last ``len(s)`` rows and its bias)
    and the columns of every consumer in ``linears`` multiplied by ``s``."""
    out = dict(block)
    p = out.get(producer)
    if p is None:
        raise ValueError(f"block[{producer!r}]: the scale producer of {list(linears)} is not in the block")
    if isinstance(p, QuantizedTensor):
        raise ValueError(f"block[{producer!r}]: already quantized; AWQ scales a float model")
    s = jnp.asarray(s, jnp.float32)
    if p.ndim == 1:
        out[producer] = ((norm_offset + p.astype(jnp.float32)) / s - norm_offset).astype(p.dtype)
    elif p.ndim == 2:
        n = s.shape[0]
        rows = p.astype(jnp.float32)
        out[producer] = rows.at[-n:].divide(s[:, None]).astype(p.dtype)
        b = _bias_path(producer)
        if b is not None and out.get(b) is not None:
            out[b] = out[b].astype(jnp.float32).at[-n:].divide(s).astype(out[b].dtype)
    else:
        raise ValueError(f"block[{producer!r}]: a scale folds into a norm weight (1-D) or a linear (2-D), "
                         f"got shape {p.shape}")
    for lin in linears:
        w = out[lin]
        if isinstance(w, QuantizedTensor):
            raise ValueError(f"block[{lin!r}]: already quantized; AWQ scales a float model")
        out[lin] = (w.astype(jnp.float32) * s[None, :]).astype(w.dtype)
    return out


# ----------------------------------------------------------------------------- the transform

def awq(spec: QuantSpec, opts: AWQOptions = AWQOptions()) -> Transform:
    """AWQ's scaling and clipping as a :class:`~lowbit.core.transforms.Transform` whose ``prepare``
    rewrites each float block (see the module docstring); ``apply`` leaves the weights to the next
    member of a :func:`~lowbit.core.transforms.chain` (RTN or GPTQ: the ``awq`` method builds it)."""
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"spec: expected a QuantSpec, got {type(spec).__name__}")
    if not isinstance(opts, AWQOptions):
        raise ValueError(f"opts: expected AWQOptions, got {type(opts).__name__}")

    def prepare(block, inputs, context: Context):
        pre = context.prefix
        owned = set(inputs)
        for p in sorted(owned):
            if p not in block:
                raise ValueError(f"params[{p!r}]: not in the block AWQ is handed")
            float_matrix(p, block[p], "AWQ")
        grouped_paths = {pre + lin for _, lins, _ in context.scale_groups for lin in lins}
        orphans = sorted(owned - grouped_paths)
        if orphans:
            raise ValueError(f"params[{orphans[0]!r}]: the model family declares no scale producer for this "
                             "linear (lowbit.models.protocol: scale_groups), so AWQ cannot scale it; exclude it "
                             "from the method (skip: ...)")
        layer = unflatten(context.layer, {p[len(pre):]: v for p, v in block.items()})  # as earlier members left it
        metrics: dict = {}
        found = []
        for producer, lins, module in context.scale_groups:
            paths = tuple(pre + lin for lin in lins)
            if not all(p in owned for p in paths):
                for p in paths:
                    if p in owned:
                        raise ValueError(f"params[{p!r}]: AWQ scales {list(paths)} together (they share the "
                                         f"input produced by {pre + str(producer)!r}); route all of them or none "
                                         "to awq")
                continue
            if producer is None:
                raise ValueError(f"params[{paths[0]!r}]: the model family declares no scale producer for it")
            prod = block.get(pre + producer)
            if prod is None:
                raise ValueError(f"params[{paths[0]!r}]: its scale producer {pre + producer!r} is not in the block")
            if getattr(prod, "ndim", 0) == 2 and prod.shape[0] != block[paths[0]].shape[1]:
                # grouped-query attention: v_proj's kv_heads * d rows cannot take o_proj's D scales
                # (the reference skips o_proj when the v_proj and o_proj weights differ in shape)
                for p in paths:
                    metrics[p] = {"awq_ratio": float("nan")}
                continue
            h = inputs[paths[0]]
            if module is None:
                h = h.reshape(-1, h.shape[-1])
            losses, best, s = search_scale(layer, h, lins, module, spec, module_fn=context.module_fn,
                                           n_grid=opts.n_grid, batch=opts.search_batch)
            if not bool(jnp.all(jnp.isfinite(losses))):
                raise FloatingPointError(f"AWQ scale search of {list(paths)}: non-finite losses {np.asarray(losses)}")
            found.append((pre + producer, paths, s))
            for p in paths:
                metrics[p] = {"awq_ratio": best / opts.n_grid, "awq_loss": losses[best], "awq_loss_r0": losses[0]}
        inputs = dict(inputs)
        for producer, paths, s in found:    # every scale searched on the incoming block, then applied
            block = fold_scale(block, producer, paths, s, context.norm_offset)
            for p in paths:
                inputs[p] = inputs[p] / s.astype(inputs[p].dtype)
        if opts.clip:
            for p in sorted(owned):
                if any(p.endswith(n) for n in NO_CLIP):
                    continue
                max_val, org_max = search_clip(block[p], inputs[p], spec, n_grid=opts.clip_grid,
                                               max_shrink=opts.clip_max_shrink, n_tokens=opts.clip_tokens)
                block[p] = _apply_clip(block[p], max_val, spec)
                ratio = jnp.mean(jnp.where(org_max > 0, max_val / jnp.where(org_max > 0, org_max, 1.0), 1.0))
                metrics.setdefault(p, {})["awq_clip"] = ratio
        return block, metrics

    # the llm-awq reference calibrates every block of the float model: when nothing after the scaling
    # collects statistics (AWQ + RTN), the next block sees the float block's outputs
    return Transform(init=lambda params: (), apply=lambda params, state: ({}, {}), prepare=prepare, float_inputs=True)
