"""Layer-sequential calibration driver: apply a :class:`~lowbit.transforms.Transform` to a model.

The driver streams the calibration windows through the model once, block by block (as the GPTQ
reference does)::

    X = embed(calibration tokens)                          (n, T, D) float32, one block's inputs
    for layer i:
        for each group of the block's linears (true-sequential order, or all at once):
            stats = recipe.init(group weights)
            for each batch of X: capture the group's inputs with the *current* block, update stats
            group weights = recipe.apply(group weights, stats)
        X = block_i(quantized layer)(X)                    feed the quantized outputs on

so memory is one block's parameters plus one block's activations, never the whole model's
statistics. Each group's statistics are built from inputs that already went through every quantized
weight before it (previous layers and, with ``true_sequential``, the earlier groups of this block):
``[q, k, v] -> [o] -> [gate, up] -> [down]``.

Only the linear weights of a block (paths ``layers/{i}/self_attn/q_proj`` ...) are handed to the
recipe; weights outside the blocks (``embed_tokens``, ``lm_head``) are handed to it at the end, with
the final normalised hidden states as ``lm_head``'s inputs. Route what must stay dense to
``identity()`` (:func:`default_recipe` skips ``embed_tokens`` and ``lm_head``). A data-free recipe
(e.g. RTN) needs no forward passes at all; the driver then only runs one batch per block to report
errors.

Per-weight report rows (``relative output error ||X (W - Q)^T|| / ||X W^T||`` on up to 2048
token rows of the first calibration batch, bits per parameter, seconds, plus whatever the transform
:func:`~lowbit.transforms.record`-ed, e.g. GPTQ's loss) are returned and passed to ``on_layer``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lowbit import transforms
from lowbit.models import llama
from lowbit.qtensor import QuantizedTensor
from lowbit.quantizers import bits_per_param, dequantize
from lowbit.transforms import Transform, flatten, identity, partition

__all__ = ["TRUE_SEQUENTIAL_GROUPS", "default_recipe", "quantize_model", "layer_inputs"]

TRUE_SEQUENTIAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"),
    ("self_attn/o_proj",),
    ("mlp/gate_proj", "mlp/up_proj"),
    ("mlp/down_proj",),
)
OUTSIDE_BLOCKS = ("embed_tokens", "lm_head")


def default_recipe(method: Transform) -> Transform:
    """``method`` on every linear of the blocks; embeddings and lm_head stay dense."""
    return partition([(r"^(embed_tokens|lm_head)$", identity()), (r"_proj$", method)])


def _needs_data(stats) -> bool:
    return bool(jax.tree_util.tree_leaves(stats))


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
    """:func:`_cap_rows` on every activation; inputs shared by several weights are capped once."""
    done: dict[int, Any] = {}
    out = {}
    for p, x in acts.items():
        if id(x) not in done:
            done[id(x)] = _cap_rows(x, jnp.float32(cap))
        out[p] = done[id(x)]
    return out


def _describe(q) -> dict:
    if isinstance(q, QuantizedTensor):
        return dict(format=q.format, bits=q.bits, group_size=q.group_size, act_order=q.perm is not None,
                    bits_per_param=bits_per_param(q))
    return dict(format="dense", bits=16, group_size=0, act_order=False, bits_per_param=16.0)


def layer_inputs(params, cfg, tokens, *, upto: int, batch_size: int = 8):
    """Hidden states entering layer ``upto`` for calibration ``tokens (n, T)`` (layers ``< upto``
    as they are in ``params``, e.g. already quantized): used to start or resume the driver."""
    tokens = jnp.asarray(tokens)
    X = jnp.concatenate([llama._embed_jit(params["embed_tokens"], tokens[b:b + batch_size], cfg)
                         for b in range(0, tokens.shape[0], batch_size)])
    for i in range(upto):
        X = _run_block(params["layers"][i], X, cfg, batch_size)
    return X


def _run_block(layer, X, cfg, batch_size):
    return jnp.concatenate([llama.block_jit(layer, X[b:b + batch_size], cfg)
                            for b in range(0, X.shape[0], batch_size)])


def _set(layer: dict, rel_path: str, value) -> dict:
    a, b = rel_path.split("/")
    return {**layer, a: {**layer[a], b: value}}


def quantize_model(params, cfg, recipe: Transform, tokens, *, batch_size: int = 8,
                   true_sequential: bool = True, skip_first: int = 0, token_cap: float | None = None,
                   start_layer: int = 0, inputs=None,
                   on_layer: Callable[[int, dict, list[dict]], Any] | None = None,
                   progress: bool = True) -> tuple[dict, list[dict]]:
    """Quantize ``params`` (a Llama-family pytree) layer by layer with ``recipe``.

    Args:
      tokens: calibration windows ``(n, T)`` int (e.g. :func:`lowbit.data.calibration_windows`).
      batch_size: windows per forward call.
      true_sequential: quantize the block's linears in :data:`TRUE_SEQUENTIAL_GROUPS` order, each
        group calibrated on inputs produced by the already-quantized groups; else all at once.
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
        raise ValueError(f"recipe: expected a lowbit.transforms.Transform, got {type(recipe).__name__}")
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"tokens: expected calibration windows shaped (n, seqlen) with n >= 1, got {tokens.shape}")
    if tokens.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"tokens: seqlen {tokens.shape[1]} exceeds the model's context {cfg.max_position_embeddings}")
    if token_cap is not None and not token_cap > 0:
        raise ValueError(f"token_cap={token_cap}: expected a positive multiple of the median token norm, or None")
    if not 0 <= skip_first < tokens.shape[1]:
        raise ValueError(f"skip_first={skip_first}: expected 0 <= skip_first < seqlen={tokens.shape[1]}")
    n_layers = len(params["layers"])
    if not 0 <= start_layer <= n_layers:
        raise ValueError(f"start_layer={start_layer}: expected 0..{n_layers}")
    groups: Sequence[Sequence[str]] = (TRUE_SEQUENTIAL_GROUPS if true_sequential
                                       else (tuple(p for grp in TRUE_SEQUENTIAL_GROUPS for p in grp),))
    layers = list(params["layers"])
    # A data-free recipe (RTN...) needs no calibration passes: keep only the first batch, for the
    # error report. eval_shape checks every layer's statistics without allocating them.
    data_free = not any(
        _needs_data(jax.eval_shape(recipe.init, {f"layers/{i}/{p}": w for p, w in _flat_linears(layers[i]).items()}))
        for i in range(start_layer, n_layers)) and not _needs_data(
        jax.eval_shape(recipe.init, {p: params[p] for p in OUTSIDE_BLOCKS if p in params}))
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
    bar = _progress(progress, n_layers - start_layer)
    for i in range(start_layer, n_layers):
        t_layer = time.perf_counter()
        layer = layers[i]
        layer_rows = []
        for group in groups:
            linears = _flat_linears(layer)
            paths = [p for p in group if p in linears]
            if not paths:
                continue
            full = {f"layers/{i}/{p}": linears[p] for p in paths}
            last = max(paths, key=llama.LINEARS.index)  # the block is only run up to this input
            stats = recipe.init(full)
            first_inputs = None
            batches = range(0, X.shape[0], batch_size) if _needs_data(stats) else (0,)  # (0,): report only
            for b in batches:
                _, captured = llama.block_jit(layer, X[b:b + batch_size], cfg, capture=True,
                                              capture_upto=last)
                acts = {f"layers/{i}/{p}": captured[p][:, skip_first:] for p in paths}
                if token_cap is not None:
                    acts = _cap_tokens(acts, token_cap)
                if first_inputs is None:
                    first_inputs = acts
                if _needs_data(stats):
                    stats = recipe.update(stats, acts)
            t0 = time.perf_counter()
            with transforms.collect() as recorded:
                new = recipe.apply(full, stats)
            jax.block_until_ready(jax.tree_util.tree_leaves(new))
            seconds = time.perf_counter() - t0
            extra = {r["path"]: r for r in recorded}
            for p in paths:
                key = f"layers/{i}/{p}"
                layer = _set(layer, p, new[key])
                row = dict(layer=i, path=key, shape=list(full[key].shape), **_describe(new[key]),
                           rel_out_err=_rel_out_err(first_inputs[key], full[key], new[key]))
                row.update({k: v for k, v in extra.get(key, {}).items() if k != "path"})
                row.setdefault("seconds", seconds / len(paths))
                layer_rows.append(row)
        layers[i] = layer
        X = _run_block(layer, X, cfg, batch_size)  # the quantized block's outputs feed the next one
        for r in layer_rows:
            r["layer_seconds"] = time.perf_counter() - t_layer
        rows += layer_rows
        new_params = {**params, "layers": list(layers)}  # a snapshot: later layers don't leak into it
        if on_layer is not None:
            on_layer(i, new_params, layer_rows)
        bar.advance(i, layer_rows)
    bar.close()

    # weights outside the blocks: lm_head sees the final normalised hidden states
    out_paths = [p for p in OUTSIDE_BLOCKS if p in params]
    new_params = {**params, "layers": layers}
    if out_paths:
        full = {p: params[p] for p in out_paths}
        stats = recipe.init(full)
        if _needs_data(stats) and "lm_head" in full:
            h = llama.rms_norm(X, params["norm"], cfg.rms_norm_eps, dtype=jnp.float32)
            for b in range(0, h.shape[0], batch_size):
                acts = {"lm_head": h[b:b + batch_size, skip_first:]}
                stats = recipe.update(stats, acts if token_cap is None else _cap_tokens(acts, token_cap))
        with transforms.collect():
            new = recipe.apply(full, stats)
        for p in out_paths:
            new_params[p] = new[p]
            if new[p] is not full[p]:
                rows.append(dict(layer=-1, path=p, shape=list(full[p].shape), **_describe(new[p])))
    return new_params, rows


def _flat_linears(layer: dict) -> dict:
    flat = flatten(layer)
    return {p: flat[p] for p in llama.LINEARS if p in flat}


class _progress:
    """A rich progress bar over layers (no-op when disabled or rich is missing)."""

    def __init__(self, enabled: bool, total: int):
        self._p = None
        if enabled and total:
            try:
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
                self._p = Progress(TextColumn("[bold]quantize[/] {task.description}"), BarColumn(),
                                   TextColumn("{task.completed}/{task.total} layers"), TimeElapsedColumn(),
                                   TimeRemainingColumn(), transient=False)
                self._p.start()
                self._task = self._p.add_task("", total=total)
            except ImportError:  # pragma: no cover
                self._p = None

    def advance(self, i, rows):
        if self._p is not None:
            err = np.mean([r["rel_out_err"] for r in rows]) if rows else float("nan")
            self._p.update(self._task, advance=1, description=f"layer {i} (mean rel. err {err:.4f})")

    def close(self):
        if self._p is not None:
            self._p.stop()
