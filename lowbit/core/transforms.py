"""Composable quantization transforms over parameter trees (optax-shaped).

A :class:`Transform` is three pure functions over a **flat** parameter dict ``{path: leaf}`` (paths
like ``"layers/3/self_attn/q_proj"``, see :func:`flatten`)::

    state          = t.init(params)                     # calibration state (a pytree; () if data-free)
    state, acts    = t.update(state, acts, context)     # acts: {path: inputs of that linear (..., in)}
    params, metrics = t.apply(params, state)            # the params with leaves replaced

* ``update`` folds a batch of input activations into the state and **returns the activations the
  next member of a** :func:`chain` **sees**: an equivalence transform (AWQ / SmoothQuant scales)
  hands on ``x / s`` so that a later GPTQ builds its Hessian from the scaled inputs; every other
  transform returns ``acts`` unchanged.
* ``apply`` is pure and returns ``(params, metrics)`` with ``metrics = {path: {name: array}}``
  (e.g. GPTQ's loss and dampening): no side channel, no timing, no host sync, so an array-only
  method's ``apply`` runs under ``jax.jit``. The calibration driver times it and turns the metrics
  into report rows.
* ``requires`` names what a transform needs from the driver beyond activations, passed as
  ``context`` to ``update`` (a :class:`Context`): ``"block_fn"`` (a forward function of the block,
  for searches on block outputs such as AWQ's) and ``"producers"`` (which norm or linear produces
  each linear's input, where a scale is folded). Data-free quantizers ignore ``update``.
* ``prepare`` (optional) rewrites a whole block in float **before** any of its weights is
  calibrated: ``block, metrics = t.prepare(block, inputs, context)`` with ``block`` every leaf of
  the block (``{flat path: leaf}``: linears, norms, biases), ``inputs`` the float block's inputs
  ``(windows, T, in)`` of the linears this transform owns (the keys it may scale) and
  ``context`` a :class:`Context` with the sub-module forward and the scale groups. Equivalence
  transforms that fold a scale into the *producer* of an input (AWQ: a norm weight, or the rows of
  ``v_proj`` / ``up_proj``) and clip weights live here, so every later member of a :func:`chain`
  calibrates on the rewritten block (GPTQ's Hessian is built from ``x / s``, because the norm was
  divided by ``s``).

* ``float_inputs``: the layer-sequential driver normally calibrates block ``i + 1`` on the outputs
  of the *quantized* block ``i`` (GPTQ's convention); a transform that asks for ``float_inputs``
  (AWQ followed by round-to-nearest, the llm-awq reference) gets the *float* block's outputs
  instead, as long as no member of the recipe collects statistics. ``chain`` / ``partition`` ask
  when any member does.

``chain`` runs transforms one after the other (each calibrated on what the previous ones hand on);
``partition`` routes each leaf to the first rule whose regex matches its path (``re.search``),
leaving unmatched leaves untouched::

    recipe = partition([(r"lm_head|embed", identity()),
                        (r"self_attn", rtn(QuantSpec(bits=4, group_size=64))),
                        (r".*", rtn(QuantSpec(bits=8, group_size=None)))])
    qparams = quantize_params(params, recipe)

Laws (tested with hypothesis): ``identity()`` is neutral in ``chain``; ``partition([(".*", t)])``
equals ``t``; ``chain(a, b)`` equals applying ``a`` and then ``b`` calibrated on ``a``'s outputs.
Methods (RTN, GPTQ, ...) live in :mod:`lowbit.methods`, one module each, registered by name.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax

from lowbit.core.nodes import is_opaque

__all__ = ["Transform", "Context", "identity", "chain", "partition", "flatten", "unflatten", "get_path", "set_path",
           "quantize_params", "calibrate", "path_str", "needs_data", "merge_metrics", "per_input", "fold_inputs"]

Params = Mapping[str, Any]
Metrics = dict[str, dict[str, Any]]


class Context(NamedTuple):
    """What the calibration driver knows about the weights being calibrated (see ``requires``).

    ``block_fn(flat_params, x) -> y``: the forward of the block the weights belong to with some of
    its weights replaced (``flat_params``: ``{path: leaf}`` overrides), on the block's input ``x``;
    ``block_input``: the current batch of block inputs; ``producers``: ``{path: producer path or
    None}`` (:mod:`lowbit.models.protocol`).

    For ``prepare``: ``prefix`` (``"layers/{i}/"``), ``layer`` (the block's nested params),
    ``module_fn(layer, name, h)`` (a sub-module's output on its input: a pure, jittable function,
    the same object for every block of one shape, so a search jitted over it compiles once),
    ``scale_groups`` (``(producer, linears, module name or None)`` with relative paths) and
    ``norm_offset`` (a norm multiplies by ``norm_offset + w``).
    """
    block_fn: Callable | None = None
    block_input: Any = None
    producers: Mapping[str, str | None] = {}
    prefix: str = ""
    layer: Any = None
    module_fn: Callable | None = None
    scale_groups: tuple = ()
    norm_offset: float = 0.0


def _no_update(state, acts, context=None):
    del context
    return state, acts


class Transform(NamedTuple):
    init: Callable[[Params], Any]
    update: Callable[..., tuple[Any, Params]] = _no_update
    apply: Callable[[Params, Any], tuple[dict, Metrics]] = None
    requires: frozenset = frozenset()
    #: ``prepare(block, inputs, context) -> (block, metrics)`` or None (see the module docstring)
    prepare: Callable | None = None
    #: the layer-sequential driver feeds the next block the *float* block's outputs (see the module
    #: docstring), when no member collects statistics
    float_inputs: bool = False


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


def flatten(tree) -> dict[str, Any]:
    """Nested params -> ``{path: leaf}`` (opaque weight nodes count as leaves: QuantizedTensors,
    method nodes, ...; a LoRA adapter is walked into, :mod:`lowbit.core.nodes`)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_opaque)
    return {path_str(kp): v for kp, v in leaves}


def unflatten(like, flat: Mapping[str, Any]):
    """Put ``flat`` leaves back into the structure of ``like`` (leaves may change type)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like, is_leaf=is_opaque)
    missing = [path_str(kp) for kp, _ in leaves if path_str(kp) not in flat]
    if missing:
        raise ValueError(f"flat: missing paths {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return jax.tree_util.tree_unflatten(treedef, [flat[path_str(kp)] for kp, _ in leaves])


def per_input(fn: Callable) -> Callable:
    """``fn(x, ...)`` computed once per input *array object*: the linears of a block that read one
    activation array (q/k/v, gate/up share it in the driver's ``acts``) get one result, e.g. one
    ``X^T X``. A fresh memo per call of ``per_input`` (make one per ``update`` pass); identity, not
    equality, so two equal but distinct arrays are computed twice."""
    done: list[tuple[Any, Any]] = []

    def call(x, *args):
        for xx, r in done:
            if xx is x:
                return r
        r = fn(x, *args)
        done.append((x, r))
        return r

    return call


def fold_inputs(stats: Mapping[str, Any], acts: Mapping[str, Any], batch_stat: Callable, fold: Callable,
                in_features: Callable[[Any], int]) -> dict:
    """The ``update`` of a method that keeps one statistic per linear: ``fold(stat, *batch_stat(x))``
    for every path of ``stats`` whose inputs ``x`` are in ``acts`` (an input array shared by several
    linears -- q/k/v, gate/up -- reduced once, :func:`per_input`); the others keep their statistic.
    ``in_features(stat)`` is the width the inputs must have (an error names the path otherwise)."""
    out = dict(stats)
    reduce = per_input(batch_stat)
    for path, stat in stats.items():
        if path not in acts:
            continue
        x = acts[path]
        if x.shape[-1] != in_features(stat):
            raise ValueError(f"activations[{path!r}]: last axis {x.shape[-1]} != in_features {in_features(stat)}")
        out[path] = fold(stat, *reduce(x))
    return out


def get_path(tree: Mapping, path: str):
    """The node at ``"a/b/c"`` of nested dicts."""
    for k in path.split("/"):
        tree = tree[k]
    return tree


def set_path(tree: Mapping, path: str, value) -> dict:
    """A copy of nested dicts ``tree`` with the node at ``"a/b/c"`` replaced (only the dicts along
    the path are copied)."""
    head, _, rest = path.partition("/")
    return {**tree, head: value if not rest else set_path(tree[head], rest, value)}


def needs_data(state) -> bool:
    """Whether a transform's (initial) state holds statistics, i.e. ``update`` must see data."""
    return bool(jax.tree_util.tree_leaves(state))


def merge_metrics(*ms: Metrics) -> Metrics:
    out: Metrics = {}
    for m in ms:
        for path, d in m.items():
            out[path] = {**out.get(path, {}), **d}
    return out


def identity() -> Transform:
    """Leave parameters untouched (e.g. to skip embeddings and lm_head)."""
    return Transform(init=lambda params: (), apply=lambda params, state: (dict(params), {}))


def chain(*transforms: Transform) -> Transform:
    """Apply transforms in sequence. Each keeps its own state and is calibrated on the activations
    the previous members hand on; ``apply`` runs them in order on the previous members' outputs."""

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(state, acts, context=None):
        new = []
        for t, s in zip(transforms, state):
            s, acts = t.update(s, acts, context)
            new.append(s)
        return tuple(new), acts

    def apply(params, state):
        out, metrics = dict(params), {}
        for t, s in zip(transforms, state):
            changed, m = t.apply(out, s)
            out = {**out, **changed}
            metrics = merge_metrics(metrics, m)
        return out, metrics

    preparers = [t.prepare for t in transforms if t.prepare is not None]

    def prepare(block, inputs, context):
        metrics: Metrics = {}
        for fn in preparers:
            block, m = fn(block, inputs, context)
            metrics = merge_metrics(metrics, m)
        return block, metrics

    return Transform(init, update, apply, frozenset().union(*(t.requires for t in transforms)),
                     prepare if preparers else None, any(t.float_inputs for t in transforms))


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

    def update(state, acts, context=None):
        out_acts, new = dict(acts), []
        for (_, t), s, ps in zip(compiled, state, route(acts)):
            s, handed = t.update(s, select(acts, ps), context)
            out_acts.update(handed)
            new.append(s)
        return tuple(new), out_acts

    def apply(params, state):
        out, metrics = dict(params), {}
        for (_, t), s, ps in zip(compiled, state, route(params)):
            changed, m = t.apply(select(params, ps), s)
            out.update(changed)
            metrics = merge_metrics(metrics, m)
        return out, metrics

    def prepare(block, inputs, context):
        metrics: Metrics = {}
        for (_, t), ps in zip(compiled, route(inputs)):   # each member may only scale the linears it owns
            if t.prepare is not None and ps:
                block, m = t.prepare(block, select(inputs, ps), context)
                metrics = merge_metrics(metrics, m)
        return block, metrics

    return Transform(init, update, apply, frozenset().union(*(t.requires for _, t in compiled)),
                     prepare if any(t.prepare is not None for _, t in compiled) else None,
                     any(t.float_inputs for _, t in compiled))


def calibrate(transform: Transform, params: Params, activations: Iterable[Params], context: Context | None = None):
    """Fold a stream of activation dicts into the transform's state (what the driver does per group)."""
    state = transform.init(params)
    for acts in activations:
        state, _ = transform.update(state, acts, context)
    return state


def quantize_params(params, transform: Transform, state=None, *, return_metrics: bool = False):
    """Apply ``transform`` to a nested parameter tree; returns a tree of the same structure (and
    ``apply``'s metrics with ``return_metrics=True``)."""
    flat = flatten(params)
    if state is None:
        state = transform.init(flat)
    new, metrics = transform.apply(flat, state)
    tree = unflatten(params, {**flat, **new})
    return (tree, metrics) if return_metrics else tree
