"""Composable quantization transforms over parameter trees (optax-shaped).

A :class:`Transform` is three pure functions over a **flat** parameter dict ``{path: leaf}`` (paths
like ``"layers/3/self_attn/q_proj"``, see :func:`flatten`)::

    stats  = t.init(params)                    # calibration state (a pytree; () if data-free)
    stats  = t.update(stats, activations)      # activations: {path: inputs of that linear (..., in)}
    params = t.apply(params, stats)            # returns the params with leaves replaced

Data-free quantizers ignore ``update``; Hessian-based methods (GPTQ) accumulate statistics in it.
``chain`` runs transforms one after the other; ``partition`` routes each leaf to the first rule
whose regex matches its path (``re.search``), leaving unmatched leaves untouched::

    recipe = partition([(r"lm_head|embed", identity()),
                        (r"self_attn", rtn(QuantSpec(bits=4, group_size=64))),
                        (r".*", rtn(QuantSpec(bits=8, group_size=None)))])
    qparams = quantize_params(params, recipe)
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax

from lowbit.qtensor import QuantizedTensor, QuantSpec
from lowbit.quantizers import quantize

__all__ = ["Transform", "identity", "rtn", "chain", "partition", "flatten", "unflatten",
           "quantize_params", "calibrate", "path_str", "record", "collect"]

Params = Mapping[str, Any]


_COLLECTOR: contextvars.ContextVar[list | None] = contextvars.ContextVar("lowbit_collector", default=None)


def record(path: str, **metrics) -> None:
    """Report per-weight metrics from inside ``apply`` (e.g. GPTQ's loss and time).

    A no-op unless a caller is inside :func:`collect`; drivers use it for per-layer CSVs without
    widening the :class:`Transform` interface.
    """
    rows = _COLLECTOR.get()
    if rows is not None:
        rows.append({"path": path, **metrics})


@contextlib.contextmanager
def collect():
    """``with collect() as rows: ...`` gathers every :func:`record` call made inside the block."""
    rows: list[dict] = []
    token = _COLLECTOR.set(rows)
    try:
        yield rows
    finally:
        _COLLECTOR.reset(token)


class Transform(NamedTuple):
    init: Callable[[Params], Any]
    update: Callable[[Any, Params], Any]
    apply: Callable[[Params, Any], dict]


def path_str(keypath) -> str:
    parts = []
    for k in keypath:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _is_leaf(x) -> bool:
    return isinstance(x, QuantizedTensor)


def flatten(tree) -> dict[str, Any]:
    """Nested params -> ``{path: leaf}`` (QuantizedTensors count as leaves)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
    return {path_str(kp): v for kp, v in leaves}


def unflatten(like, flat: Mapping[str, Any]):
    """Put ``flat`` leaves back into the structure of ``like`` (leaves may change type)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like, is_leaf=_is_leaf)
    missing = [path_str(kp) for kp, _ in leaves if path_str(kp) not in flat]
    if missing:
        raise ValueError(f"flat: missing paths {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return jax.tree_util.tree_unflatten(treedef, [flat[path_str(kp)] for kp, _ in leaves])


def _no_update(stats, activations):
    del activations
    return stats


def identity() -> Transform:
    """Leave parameters untouched (e.g. to skip embeddings and lm_head)."""
    return Transform(init=lambda params: (), update=_no_update, apply=lambda params, stats: dict(params))


def rtn(spec: QuantSpec) -> Transform:
    """Round-to-nearest (data-free) quantization of every matrix it is given."""

    def apply(params, stats):
        del stats
        out = {}
        for path, w in params.items():
            if isinstance(w, QuantizedTensor):
                raise ValueError(f"params[{path!r}]: already quantized; rtn needs a float matrix")
            if getattr(w, "ndim", 0) != 2:
                raise ValueError(f"params[{path!r}]: rtn quantizes 2-D (out, in) matrices, got shape "
                                 f"{getattr(w, 'shape', None)}; exclude it with partition()")
            try:
                out[path] = quantize(w, spec)
            except ValueError as e:
                raise ValueError(f"params[{path!r}]: {e}") from None
            record(path, method="rtn")
        return out

    return Transform(init=lambda params: (), update=_no_update, apply=apply)


def chain(*transforms: Transform) -> Transform:
    """Apply transforms in sequence; each keeps its own statistics."""

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(stats, activations):
        return tuple(t.update(s, activations) for t, s in zip(transforms, stats))

    def apply(params, stats):
        out = dict(params)
        for t, s in zip(transforms, stats):
            out = {**out, **t.apply(out, s)}
        return out

    return Transform(init, update, apply)


def partition(rules: Sequence[tuple[str, Transform]]) -> Transform:
    """Route each path to the first rule whose regex matches it (``re.search``); others pass through."""
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[1], Transform)):
            raise ValueError(f"rules[{i}]: expected (regex, Transform), got {rule!r}")
        try:
            compiled.append((re.compile(rule[0]), rule[1]))
        except re.error as e:
            raise ValueError(f"rules[{i}]: bad regex {rule[0]!r}: {e}") from None

    def route(paths: Iterable[str]) -> list[list[str]]:
        groups: list[list[str]] = [[] for _ in compiled]
        for p in paths:
            for i, (rx, _) in enumerate(compiled):
                if rx.search(p):
                    groups[i].append(p)
                    break
        return groups

    def select(d, paths):
        return {p: d[p] for p in paths if p in d}

    def init(params):
        return tuple(t.init(select(params, ps)) for (_, t), ps in zip(compiled, route(params)))

    def update(stats, activations):
        return tuple(t.update(s, select(activations, ps))
                     for (_, t), s, ps in zip(compiled, stats, route(activations)))

    def apply(params, stats):
        out = dict(params)
        for (_, t), s, ps in zip(compiled, stats, route(params)):
            out.update(t.apply(select(params, ps), s))
        return out

    return Transform(init, update, apply)


def calibrate(transform: Transform, params: Params, activations: Iterable[Params]):
    """Fold a stream of activation dicts into the transform's statistics."""
    stats = transform.init(params)
    for acts in activations:
        stats = transform.update(stats, acts)
    return stats


def quantize_params(params, transform: Transform, stats=None):
    """Apply ``transform`` to a nested parameter tree; returns a tree of the same structure."""
    flat = flatten(params)
    if stats is None:
        stats = transform.init(flat)
    return unflatten(params, transform.apply(flat, stats))
