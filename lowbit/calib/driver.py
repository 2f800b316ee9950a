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

Per-weight report rows (``relative output error ||X (W - Q)^T|| / ||X W^T||`` on up to 2048
token rows of the first calibration batch, bits per parameter, seconds of ``apply`` (timed here,
shared equally by the weights of a group), plus the metrics ``apply`` returned, e.g. GPTQ's loss)
are returned and passed to ``on_layer``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.core.qtensor import QuantizedTensor
from lowbit.core.quantizers import bits_per_param, dequantize
from lowbit.core.transforms import Context, Transform, flatten, identity, needs_data, partition
from lowbit.models.protocol import family_of
from lowbit.progress import Bar

__all__ = ["default_recipe", "quantize_model", "layer_inputs", "REPORT_ROWS"]


def default_recipe(method: Transform) -> Transform:
    """``method`` on every linear of the blocks; embeddings and lm_head stay dense."""
    return partition([(r"^(embed_tokens|lm_head)$", identity()), (r"_proj$", method)])


REPORT_ROWS = 2048  # token rows of the first batch used for the per-weight error report


@jax.jit
def _rel_err(x, w, wq):
    return jnp.linalg.norm(x @ (w - wq).T) / jnp.maximum(jnp.linalg.norm(x @ w.T), 1e-30)


def _rel_out_err(x, w, q) -> float:
    """``||X (W - Q)^T|| / ||X W^T||`` on (at most :data:`REPORT_ROWS` evenly spaced rows of) ``x``."""
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] > REPORT_ROWS:
        x = x[:: -(-x.shape[0] // REPORT_ROWS)]
    wq = dequantize(q) if isinstance(q, QuantizedTensor) else q
    return float(_rel_err(x.astype(jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(wq, jnp.float32)))


@jax.jit
def _cap_rows(x, cap):
    n = jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
    limit = cap * jnp.median(n)
    return (x * jnp.minimum(1.0, limit / jnp.maximum(n, 1e-30))).astype(x.dtype)


def _cap_tokens(acts: dict, cap: float) -> dict:
    """:func:`_cap_rows` on every activation; an input array shared by several weights (the same
    object, held alive in ``acts``) is capped once and stays shared."""
    done: list[tuple[Any, Any]] = []
    out = {}
    for p, x in acts.items():
        capped = next((c for xx, c in done if xx is x), None)
        if capped is None:
            capped = _cap_rows(x, jnp.float32(cap))
            done.append((x, capped))
        out[p] = capped
    return out


def _describe(q) -> dict:
    if isinstance(q, QuantizedTensor):
        return dict(format=q.format, bits=q.bits, group_size=q.group_size, act_order=q.perm is not None,
                    bits_per_param=bits_per_param(q))
    return dict(format="dense", bits=16, group_size=0, act_order=False, bits_per_param=16.0)


def _batched(fn, X, batch_size):
    return jnp.concatenate([fn(X[b:b + batch_size]) for b in range(0, X.shape[0], batch_size)])


def layer_inputs(params, cfg, tokens, *, upto: int, batch_size: int = 8):
    """Hidden states entering layer ``upto`` for calibration ``tokens (n, T)`` (layers ``< upto``
    as they are in ``params``, e.g. already quantized): used to start or resume the driver."""
    fam = family_of(cfg)
    emb = fam.embed_params(params)
    X = _batched(lambda t: fam.embed_jit(emb, t, cfg), jnp.asarray(tokens), batch_size)
    for i in range(upto):
        X = _run_block(fam, fam.layers(params)[i], X, cfg, i, batch_size)
    return X


def _run_block(fam, layer, X, cfg, i, batch_size):
    kw = fam.layer_kwargs(cfg, i)
    return _batched(lambda x: fam.block_jit(layer, x, cfg, **kw), X, batch_size)


def _set(layer: dict, rel_path: str, value) -> dict:
    head, _, rest = rel_path.partition("/")
    if not rest:
        return {**layer, head: value}
    return {**layer, head: _set(layer[head], rest, value)}


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
            new = _set(new, path[len(prefix):] if path.startswith(prefix) else path, v)
        return fam.block_jit(new, xb, cfg, **kw)

    producers = {prefix + k: (prefix + v if v is not None else None) for k, v in fam.producers(cfg).items()}
    return Context(block_fn=block_fn, block_input=x, producers=producers)


def _to_float(v):
    a = np.asarray(v)
    return float(a) if a.ndim == 0 else a.tolist()


def quantize_model(params, cfg, recipe: Transform, tokens, *, batch_size: int = 8,
                   true_sequential: bool = True, skip_first: int = 0, token_cap: float | None = None,
                   start_layer: int = 0, inputs=None,
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
      start_layer, inputs: resume: layers ``< start_layer`` of ``params`` are taken as final and
        ``inputs`` are the hidden states entering ``start_layer`` (computed with
        :func:`layer_inputs` when ``None``).
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
    if data_free:
        tokens = tokens[:batch_size]
    X = inputs if inputs is not None else layer_inputs(params, cfg, tokens, upto=start_layer, batch_size=batch_size)
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
                xb = X[b:b + batch_size]
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
                layer = _set(layer, p, new[key])
                row = dict(layer=i, path=key, shape=list(full[key].shape), **_describe(new[key]),
                           rel_out_err=_rel_out_err(first_inputs[key], full[key], new[key]),
                           seconds=seconds / len(paths))
                row.update({k: _to_float(v) for k, v in metrics.get(key, {}).items()})
                layer_rows.append(row)
        layers[i] = layer
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
                acts = {"lm_head": h[b:b + batch_size, skip_first:]}
                state, _ = recipe.update(state, acts if token_cap is None else _cap_tokens(acts, token_cap))
        new, _ = recipe.apply(full, state)
        for p in out_paths:
            new_params[p] = new[p]
            if new[p] is not full[p]:
                rows.append(dict(layer=-1, path=p, shape=list(full[p].shape), **_describe(new[p])))
    return new_params, rows
