"""Layer-sequential calibration driver: apply a :class:`~lowbit.core.transforms.Transform` to a model
of any family that implements the architecture protocol (:mod:`lowbit.models.protocol`).

The driver streams the calibration windows through the model once, block by block (as the GPTQ
reference does)::

    X = embed(calibration tokens)                          (n, T, D) float32, one block's inputs
    for layer i:
        for each group of the block's linears (fam.sequential_groups, or all at once):
            stats = recipe.init(group weights)
            for each batch of X: capture the group's inputs with the *current* block, update stats
            group weights = recipe.apply(group weights, stats)
        X = block_i(quantized layer)(X)                    feed the quantized outputs on

so memory is one block's parameters plus one block's activations, never the whole model's
statistics. Each group's statistics are built from inputs that already went through every quantized
weight before it (previous layers and, with ``true_sequential``, the earlier groups of this block;
for Llama ``[q, k, v] -> [o] -> [gate, up] -> [down]``).

Only the linear weights of a block (paths ``layers/{i}/self_attn/q_proj`` ...) are handed to the
recipe; weights outside the blocks (``fam.outside``: ``embed_tokens``, ``lm_head``) are handed to it
at the end, with the final normalised hidden states as ``lm_head``'s inputs. A recipe that
``requires`` a block forward (AWQ's search on block outputs) gets a
:class:`~lowbit.core.transforms.Context` with it in ``update``. Route what must stay dense to
``identity()`` (:func:`default_recipe` skips ``embed_tokens`` and ``lm_head``). A data-free recipe
(e.g. RTN) needs no forward passes at all; the driver then only runs one batch per block to report
errors.

On a mesh (:func:`lowbit.dist.use_mesh`) every batch of windows is split over its ``data`` axis
(:func:`lowbit.dist.place_batch`): the block forwards run data-parallel and the statistics' sums
over tokens become all-reduces; a method may spread its solves over the devices (GPTQ does).

Per-weight report rows (``relative output error ||X (W - Q)^T|| / ||X W^T||`` on up to 2048
token rows of the first calibration batch, bits per parameter, seconds of ``apply`` (timed here,
shared equally by the weights of a group), plus the metrics ``apply`` returned, e.g. GPTQ's loss)
are returned and passed to ``on_layer``.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lowbit import dist
from lowbit.core.nodes import is_node
from lowbit.core.qtensor import QuantizedTensor
from lowbit.core.quantizers import dequantize
from lowbit.core.transforms import (Context, Transform, flatten, identity, needs_data, partition, per_input,
                                    set_path, unflatten)
from lowbit.models.protocol import FAMILIES, family_of
from lowbit.progress import Bar

__all__ = ["default_recipe", "quantize_model", "layer_inputs", "perturb_ulp", "REPORT_ROWS"]


def default_recipe(method: Transform) -> Transform:
    """``method`` on every linear of the blocks; embeddings and lm_head stay dense."""
    return partition([(r"^(embed_tokens|lm_head)$", identity()), (r"_proj$", method)])


REPORT_ROWS = 2048  # token rows of the first batch used for the per-weight error report


@jax.jit
def _rel_err(x, w, wq):
    return jnp.linalg.norm(x @ (w - wq).T) / jnp.maximum(jnp.linalg.norm(x @ w.T), 1e-30)


@jax.jit
def _rel_err_linear(x, w, q):
    from lowbit.ops import linear

    y = x @ w.T
    return jnp.linalg.norm(y - linear(x, q)) / jnp.maximum(jnp.linalg.norm(y), 1e-30)


def _rel_out_err(x, w, q) -> float:
    """``||X (W - Q)^T|| / ||X W^T||`` on (at most :data:`REPORT_ROWS` evenly spaced rows of) ``x``;
    for a method's weight node (LLM.int8(), OneBit, mixed widths) ``||X W^T - linear(X, Q)|| / ||X W^T||``
    (the whole layer: LLM.int8()'s activation quantization and outlier decomposition, OneBit's output
    LayerNorm, included)."""
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] > REPORT_ROWS:
        x = x[:: -(-x.shape[0] // REPORT_ROWS)]
    if isinstance(q, QuantizedTensor) or not is_node(q):
        wq = dequantize(q) if isinstance(q, QuantizedTensor) else q
        return float(_rel_err(x.astype(jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(wq, jnp.float32)))
    return float(_rel_err_linear(x.astype(jnp.float32), jnp.asarray(w, jnp.float32), q))


@jax.jit
def _cap_rows(x, cap):
    n = jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
    limit = cap * jnp.median(n)
    return (x * jnp.minimum(1.0, limit / jnp.maximum(n, 1e-30))).astype(x.dtype)


def _cap_tokens(acts: dict, cap: float) -> dict:
    """:func:`_cap_rows` on every activation; an input array shared by several weights (the same
    object, held alive in ``acts``) is capped once and stays shared."""
    capped = per_input(lambda x: _cap_rows(x, jnp.float32(cap)))
    return {p: capped(x) for p, x in acts.items()}


def _describe(q) -> dict:
    if is_node(q):   # QuantizedTensor, a method's weight node (LLM.int8(), OneBit, mixed widths)
        return q.describe()
    return dict(format="dense", bits=16, group_size=0, act_order=False, bits_per_param=16.0)


def _batched(fn, X, batch_size):
    return jnp.concatenate([fn(dist.place_batch(X[b:b + batch_size])) for b in range(0, X.shape[0], batch_size)])


def perturb_ulp(x, seed: int):
    """``x`` with each entry moved by one ulp towards +inf, -inf or not at all (a third each, drawn
    from ``seed``): a float-level perturbation, the size of a change of summation order."""
    r = jax.random.randint(jax.random.key(seed), x.shape, -1, 2)
    away = jnp.nextafter(x, jnp.where(r > 0, jnp.inf, -jnp.inf).astype(x.dtype))
    return jnp.where(r == 0, x, away)


def layer_inputs(params, cfg, tokens, *, upto: int, batch_size: int = 8, perturb: int = 0):
    """Hidden states entering layer ``upto`` for calibration ``tokens (n, T)`` (layers ``< upto``
    as they are in ``params``, e.g. already quantized): used to start or resume the driver.
    ``perturb``: :func:`perturb_ulp` of the embeddings with that seed (0: none)."""
    fam = family_of(cfg)
    emb = fam.embed_params(params)
    X = _batched(lambda t: fam.embed_jit(emb, t, cfg), jnp.asarray(tokens), batch_size)
    if perturb:
        X = perturb_ulp(X, perturb)
    for i in range(upto):
        X = _run_block(fam, fam.layers(params)[i], X, cfg, i, batch_size)
    return X


def _run_block(fam, layer, X, cfg, i, batch_size):
    kw = fam.layer_kwargs(cfg, i)
    return _batched(lambda x: fam.block_jit(layer, x, cfg, **kw), X, batch_size)


def _flat_linears(fam, cfg, layer: dict) -> dict:
    flat = flatten(layer)
    return {p: flat[p] for p in fam.linears(cfg) if p in flat}


def _context(fam, cfg, i, layer, prefix, x, recipe) -> Context | None:
    if not recipe.requires:
        return None
    kw = fam.layer_kwargs(cfg, i)

    def block_fn(overrides, xb):
        new = layer
        for path, v in overrides.items():
            new = set_path(new, path[len(prefix):] if path.startswith(prefix) else path, v)
        return fam.block_jit(new, xb, cfg, **kw)

    producers = {prefix + k: (prefix + v if v is not None else None) for k, v in fam.producers(cfg).items()}
    return Context(block_fn=block_fn, block_input=x, producers=producers)


@functools.lru_cache(maxsize=64)
def _module_fn(family: str, cfg, kw_items: tuple) -> Callable | None:
    """``fn(layer, name, h)``: the family's sub-module forward with ``cfg`` and the block's static
    options bound; one object per (family, config, options), so searches jitted over it compile once."""
    fam = FAMILIES[family]
    if fam.module_fn is None:
        return None
    kw = dict(kw_items)

    def fn(layer, name, h):
        return fam.module_fn(layer, name, h, cfg, **kw)

    return fn


def _prepare_block(fam, cfg, i, layer, prefix, X, recipe, batch_size):
    """Run ``recipe.prepare`` on block ``i``: one pass of the float block over every calibration
    window captures each linear's input (full windows: ``skip_first`` / ``token_cap`` do not apply)
    and the float outputs. Returns ``(prepared layer, its metrics, float outputs of the block)``."""
    kw = fam.layer_kwargs(cfg, i)
    linears = list(_flat_linears(fam, cfg, layer))
    parts: dict[str, list] = {p: [] for p in linears}
    outs = []
    for b in range(0, X.shape[0], batch_size):
        y, captured = fam.block_jit(layer, dist.place_batch(X[b:b + batch_size]), cfg, capture=True, **kw)
        outs.append(y)
        for p in linears:
            parts[p].append(captured[p])
    joined: dict[tuple, Any] = {}   # q/k/v (and gate/up) share one input array: concatenate it once
    inputs = {}
    for p in linears:
        key = tuple(id(a) for a in parts[p])
        if key not in joined:
            joined[key] = jnp.concatenate(parts[p])
        inputs[prefix + p] = joined[key]
    context = Context(producers={prefix + k: (prefix + v if v is not None else None)
                                 for k, v in fam.producers(cfg).items()},
                      prefix=prefix, layer=layer, module_fn=_module_fn(fam.name, cfg, tuple(sorted(kw.items()))),
                      scale_groups=tuple(fam.scale_groups(cfg)), norm_offset=fam.norm_offset)
    block = {prefix + p: v for p, v in flatten(layer).items()}
    new, metrics = recipe.prepare(block, inputs, context)
    layer = unflatten(layer, {p[len(prefix):]: v for p, v in new.items()})
    return layer, metrics, jnp.concatenate(outs)


def _to_float(v):
    a = np.asarray(v)
    return float(a) if a.ndim == 0 else a.tolist()


def quantize_model(params, cfg, recipe: Transform, tokens, *, batch_size: int = 8,
                   true_sequential: bool = True, skip_first: int = 0, token_cap: float | None = None,
                   perturb: int = 0, start_layer: int = 0, inputs=None, reference=None,
                   on_layer: Callable[[int, dict, list[dict]], Any] | None = None,
                   progress: bool = True) -> tuple[dict, list[dict]]:
    """Quantize ``params`` (a pytree of a registered model family) layer by layer with ``recipe``.

    Args:
      tokens: calibration windows ``(n, T)`` int (e.g. :func:`lowbit.data.calibration_windows`).
      batch_size: windows per forward call.
      true_sequential: quantize the block's linears group by group in the family's
        ``sequential_groups`` order, each group calibrated on inputs produced by the
        already-quantized groups; else all at once from one capture pass.
      skip_first: leave the first ``skip_first`` positions of every window out of the statistics
        (and of the error report). Position 0 of a window is an attention sink with massive
        activations in many LLMs (SmolLM2: down_proj inputs up to ~565x the median token norm,
        ``experiments/activation_outliers.py``), and such a token dominates ``X^T X``; 0 (the
        default) is the reference behaviour.
      token_cap: scale every token's input row down to at most ``token_cap`` times the median row
        norm of its batch before it enters the statistics (``None``: off, the reference behaviour).
        Keeps a few massive-activation tokens (attention sinks) from dominating ``X^T X`` while
        still counting them. On SmolLM2, act-order is what recovers GPTQ's 4-bit loss to RTN
        (paper/); neither this nor ``skip_first`` did in demo-scale trials.
      perturb: measure float-order noise: the embeddings entering layer 0 moved by one ulp
        (:func:`perturb_ulp`, with this seed; 0: no perturbation, the reference behaviour).
      start_layer, inputs: resume: layers ``< start_layer`` of ``params`` are taken as final and
        ``inputs`` are the hidden states entering ``start_layer`` (computed with
        :func:`layer_inputs` when ``None``: from ``params``, or from ``reference`` for a recipe whose
        blocks feed their float outputs on, see below).
      reference: the unquantized params, needed to resume (``start_layer > 0``) a recipe with a
        ``prepare`` stage and no statistics of its own (AWQ + RTN), whose next block sees the
        *float* block's outputs.

    A recipe with a ``prepare`` stage (AWQ) gets every block rewritten in float before its groups
    are calibrated (:func:`_prepare_block`). A recipe that asks for ``float_inputs`` (AWQ does: the
    llm-awq reference) and in which nothing collects statistics (AWQ + RTN) feeds the next block the
    float block's outputs, as in the reference; otherwise (AWQ + GPTQ) the next block's inputs are
    the quantized block's outputs, GPTQ's convention.
      on_layer: called as ``on_layer(i, new_params, rows_of_layer_i)`` after each layer (checkpointing).
    Returns:
      ``(new_params, rows)``: the same structure with leaves replaced, and per-weight report rows.
    """
    if not isinstance(recipe, Transform):
        raise ValueError(f"recipe: expected a lowbit.core.transforms.Transform, got {type(recipe).__name__}")
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, (bool, np.bool_)) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
    fam = family_of(cfg)
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"tokens: expected calibration windows shaped (n, seqlen) with n >= 1, got {tokens.shape}")
    if tokens.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"tokens: seqlen {tokens.shape[1]} exceeds the model's context {cfg.max_position_embeddings}")
    if token_cap is not None and not token_cap > 0:
        raise ValueError(f"token_cap={token_cap}: expected a positive multiple of the median token norm, or None")
    if not 0 <= skip_first < tokens.shape[1]:
        raise ValueError(f"skip_first={skip_first}: expected 0 <= skip_first < seqlen={tokens.shape[1]}")
    layers = list(fam.layers(params))
    n_layers = len(layers)
    if not 0 <= start_layer <= n_layers:
        raise ValueError(f"start_layer={start_layer}: expected 0..{n_layers}")
    linears = fam.linears(cfg)
    groups: Sequence[Sequence[str]] = (fam.sequential_groups(cfg) if true_sequential
                                       else (tuple(p for grp in fam.sequential_groups(cfg) for p in grp),))
    # A data-free recipe (RTN...) needs no calibration passes: keep only the first batch, for the
    # error report. eval_shape checks every layer's statistics without allocating them.
    data_free = not any(
        needs_data(jax.eval_shape(recipe.init, {f"layers/{i}/{p}": w
                                                for p, w in _flat_linears(fam, cfg, layers[i]).items()}))
        for i in range(start_layer, n_layers)) and not needs_data(
        jax.eval_shape(recipe.init, {p: params[p] for p in fam.outside if p in params}))
    prepares = recipe.prepare is not None
    float_inputs = recipe.float_inputs and data_free   # the next block sees the float block's outputs (AWQ + RTN)
    if prepares and fam.module_fn is None:
        raise ValueError(f"recipe: its prepare stage (AWQ) needs the model family {fam.name!r} to declare "
                         "module_fn and scale_groups (lowbit.models.protocol); it does not")
    if float_inputs and start_layer > 0 and inputs is None and reference is None:
        raise ValueError("reference: resuming a recipe whose blocks feed their float outputs on (AWQ + RTN) "
                         "needs the unquantized params (reference=) to recompute the inputs of layer "
                         f"{start_layer}")
    data_free = data_free and not prepares   # prepare sees every calibration window
    if data_free:
        tokens = tokens[:batch_size]
    src = reference if float_inputs and reference is not None else params
    X = inputs if inputs is not None else layer_inputs(src, cfg, tokens, upto=start_layer, batch_size=batch_size,
                                                       perturb=perturb)
    if data_free:
        X = X[:batch_size]
    if X.shape[:2] != tokens.shape:  # after the data-free cut, both hold the first batch
        raise ValueError(f"inputs: expected hidden states for {tokens.shape} windows, got shape {X.shape}")
    rows: list[dict] = []

    if data_free:  # no statistics: one capture pass per block serves the error report of every group
        groups = (tuple(p for grp in groups for p in grp),)
    bar = Bar(n_layers - start_layer, "quantize", progress, unit="layers")
    for i in range(start_layer, n_layers):
        t_layer = time.perf_counter()
        layer = layers[i]
        kw = fam.layer_kwargs(cfg, i)
        prefix = f"layers/{i}/"
        layer_rows = []
        prep_metrics, X_float = {}, None
        if prepares:
            layer, prep_metrics, X_float = _prepare_block(fam, cfg, i, layer, prefix, X, recipe, batch_size)
        for group in groups:
            present = _flat_linears(fam, cfg, layer)
            paths = [p for p in group if p in present]
            if not paths:
                continue
            full = {prefix + p: present[p] for p in paths}
            last = max(paths, key=linears.index)  # the block is only run up to this input
            state = recipe.init(full)
            first_inputs = None
            batches = range(0, X.shape[0], batch_size) if needs_data(state) else (0,)  # (0,): report only
            for b in batches:
                xb = dist.place_batch(X[b:b + batch_size])
                _, captured = fam.block_jit(layer, xb, cfg, capture=True, capture_upto=last, **kw)
                acts = {prefix + p: captured[p][:, skip_first:] for p in paths}
                if token_cap is not None:
                    acts = _cap_tokens(acts, token_cap)
                if first_inputs is None:
                    first_inputs = acts
                if needs_data(state):
                    state, _ = recipe.update(state, acts, _context(fam, cfg, i, layer, prefix, xb, recipe))
            t0 = time.perf_counter()
            new, metrics = recipe.apply(full, state)
            jax.block_until_ready(jax.tree_util.tree_leaves((new, metrics)))
            seconds = time.perf_counter() - t0
            for p in paths:
                key = prefix + p
                layer = set_path(layer, p, new[key])
                row = dict(layer=i, path=key, shape=list(full[key].shape), **_describe(new[key]),
                           rel_out_err=_rel_out_err(first_inputs[key], full[key], new[key]),
                           seconds=seconds / len(paths))
                row.update({k: _to_float(v) for k, v in {**prep_metrics.get(key, {}),
                                                         **metrics.get(key, {})}.items()})
                layer_rows.append(row)
        layers[i] = layer
        if float_inputs:
            X = X_float   # AWQ + RTN: the float block's outputs, as the llm-awq reference feeds them on
        else:
            X = _run_block(fam, layer, X, cfg, i, batch_size)  # the quantized block's outputs feed the next one
        for r in layer_rows:
            r["layer_seconds"] = time.perf_counter() - t_layer
        rows += layer_rows
        new_params = {**params, "layers": list(layers)}  # a snapshot: later layers don't leak into it
        if on_layer is not None:
            on_layer(i, new_params, layer_rows)
        err = np.mean([r["rel_out_err"] for r in layer_rows]) if layer_rows else float("nan")
        bar.advance(1, f"layer {i} (mean rel. err {err:.4f})")
    bar.close()

    # weights outside the blocks: lm_head sees the final normalised hidden states
    out_paths = [p for p in fam.outside if p in params]
    new_params = {**params, "layers": layers}
    if out_paths:
        full = {p: params[p] for p in out_paths}
        state = recipe.init(full)
        if needs_data(state) and "lm_head" in full:
            h = fam.head_inputs(params, X, cfg)
            for b in range(0, h.shape[0], batch_size):
                acts = {"lm_head": dist.place_batch(h[b:b + batch_size, skip_first:])}
                state, _ = recipe.update(state, acts if token_cap is None else _cap_tokens(acts, token_cap))
        new, _ = recipe.apply(full, state)
        for p in out_paths:
            new_params[p] = new[p]
            if new[p] is not full[p]:
                rows.append(dict(layer=-1, path=p, shape=list(full[p].shape), **_describe(new[p])))
    return new_params, rows
