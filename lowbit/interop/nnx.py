"""Quantize the ``nnx.Linear`` layers of any Flax NNX module with a lowbit recipe.

::

    from lowbit.core.qtensor import QuantSpec
    from lowbit.core.transforms import identity, partition
    from lowbit.methods.gptq import gptq
    from lowbit.interop.nnx import quantize_nnx

    recipe = partition([(r"head", identity()), (r".*", gptq(QuantSpec(bits=3, group_size=32)))])
    qmodel = quantize_nnx(model, recipe, calib_batches)          # model: any nnx.Module
    logits = nnx.jit(lambda m, x: m(x))(qmodel, tokens)

**What it does.**

1. *Find the layers.* Every ``nnx.Linear`` anywhere in the module's graph (attributes, ``nnx.List``,
   ``nnx.Dict``, lists and dicts held with ``nnx.data``) is found, under its ``"/"``-joined nnx path
   (``"blocks/0/attn/q"``; see :func:`find_linears`). The recipe sees ``{path: W}`` with ``W`` in
   lowbit's ``(out, in)`` layout, i.e. ``W = kernel.T`` (nnx stores ``(in, out)``), so
   ``partition`` rules match nnx paths. Only exact ``nnx.Linear`` instances are taken: a subclass may
   compute something else in ``__call__`` (LoRA, ...) and is left alone.
2. *Capture the inputs.* ``forward(module, batch)`` (default ``module(batch)``) is run eagerly on the
   calibration batches while the targeted layers are *tapped*: for the duration of the pass their
   class is swapped for a subclass of ``nnx.Linear`` whose ``__call__`` records its input first
   (restored in a ``finally``). Nothing else of the module changes, so ``isinstance`` checks and
   attribute reads (``self.q.kernel``, ``self.q.in_features``) in user code keep working. A pass
   stops (by an internal exception derived from ``BaseException``, so ``except Exception`` in user
   code does not swallow it) as soon as every targeted layer has been called as often as in the
   reference pass, so later layers are not computed needlessly.
3. *Quantize.* ``recipe.init({path: W})``, ``recipe.update(state, {path: x})`` for each call (one
   dict per round of calls: with ``q``, ``k``, ``v`` fed the same array, one dict holds all three and
   GPTQ reduces their shared ``X^T X`` once), then ``recipe.apply``. A ``QuantizedTensor`` result
   replaces the ``nnx.Linear`` by a :class:`QuantizedLinear` (at every place the layer is referenced,
   so shared layers stay shared); the unchanged dense ``W`` (e.g. from ``identity()``) leaves the
   ``nnx.Linear`` as it is; a new dense matrix is written back into its kernel (``new.T``).

**Sequential calibration** (``sequential=True``, the default, as GPTQ's layer-sequential driver). A
first pass on ``calib_batches[0]`` with the float module records the execution order of the layers
(order of their first call). Layers are then quantized group by group in that order, a group being
consecutive layers whose first calls received the *same input array* (``q``/``k``/``v``;
``gate``/``up``): since their input existed before the first of them ran, quantizing one cannot
change the others' inputs. For each group, every calibration batch is run through the *current*
module, in which all earlier groups are already :class:`QuantizedLinear` layers, and the pass stops
after the group's inputs are captured. So each layer is calibrated on the inputs it will see in the
quantized model (the quantization error of earlier layers included). The cost is one (partial)
forward per group and batch: ``O(groups x batches)`` eager forwards, which is fine for research-size
models (the tests' 2-block transformer, 12 layers in 8 groups, 8 batches: about 1 s on CPU once
GPTQ is compiled), not for billions of parameters (use :mod:`lowbit.calib.driver` there). ``sequential=False`` captures every layer in one
pass per batch on the float module and applies the recipe once to all layers (the non-sequential
"one shot" variant; the recipe sees all paths in a single ``init``/``apply``).

Layers that the forward never calls are quantized last with no activations: a data-free recipe
(RTN) handles them; GPTQ raises its "no calibration activations reached this weight" error naming the
path (exclude them with ``partition(..., identity())``). A data-free recipe needs no forward passes
at all; ``calib_batches`` may then be ``None``.

**Limitations.** ``forward`` runs eagerly and must call the layers with concrete arrays: layers
called inside ``jax.jit`` / ``nnx.jit`` / ``nnx.scan`` / ``nnx.vmap`` within ``forward`` see tracers,
which is reported as an error (jit the *returned* module instead). Recipes that ``require`` a block
forward or producers (AWQ-style searches, :class:`~lowbit.core.transforms.Context`) are rejected: an
arbitrary NNX module has no block protocol. The tapping swaps classes on the (cloned) module, so it
is not thread-safe across concurrent calls on the same layers. A layer called several times per
forward is calibrated on all its calls, all captured while it is still float.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from lowbit.core.qtensor import QuantizedTensor
from lowbit.core.transforms import Transform, merge_metrics, needs_data
from lowbit.ops.dispatch import linear as _linear

__all__ = ["quantize_nnx", "QuantizedLinear", "QuantizedWeight", "find_linears"]


def _get(var):
    """The value of an nnx Variable (``get_value`` on flax >= 0.11, ``.value`` before)."""
    getter = getattr(var, "get_value", None)
    return getter() if getter is not None else var.value


def _set_value(var, value) -> None:
    setter = getattr(var, "set_value", None)
    if setter is not None:
        setter(value)
    else:
        var.value = value


class QuantizedWeight(nnx.Variable):
    """An nnx Variable holding a :class:`~lowbit.core.qtensor.QuantizedTensor` (a pytree of integer
    codes and scales). Deliberately not an ``nnx.Param``: ``nnx.state(m, nnx.Param)`` and
    ``nnx.Optimizer(m, tx, wrt=nnx.Param)`` leave the quantized weights alone."""


class QuantizedLinear(nnx.Module):
    """Drop-in replacement of an ``nnx.Linear`` with a quantized weight.

    ``y = x @ dequantize(weight).T + bias`` through :func:`lowbit.ops.linear` (the Pallas kernels on
    GPU/TPU when they apply, else the jnp reference). ``weight`` is a :class:`QuantizedWeight`
    variable holding the ``QuantizedTensor`` in ``(out, in)`` layout, ``bias`` the original
    ``nnx.Param`` (or ``None``). The output dtype is the input's, or ``dtype`` when given (the
    ``nnx.Linear``'s ``dtype`` is carried over).
    """

    def __init__(self, weight: QuantizedTensor, bias=None, *, dtype=None):
        if not isinstance(weight, QuantizedTensor):
            raise ValueError(f"weight: expected a QuantizedTensor, got {type(weight).__name__}")
        if bias is not None and not isinstance(bias, nnx.Variable):
            bias = nnx.Param(jnp.asarray(bias))
        if bias is not None and tuple(_get(bias).shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(_get(bias).shape)}")
        self.weight = QuantizedWeight(weight)
        self.bias = bias
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype

    def __call__(self, inputs):
        x = inputs if self.dtype is None else jnp.asarray(inputs, self.dtype)
        bias = None if self.bias is None else _get(self.bias)
        return _linear(x, _get(self.weight), bias)


# ----------------------------------------------------------------------------- finding the layers


class _Found:
    """One ``nnx.Linear``: its canonical path and every ``(parent, key)`` that references it."""

    def __init__(self, layer, path):
        self.layer, self.path, self.refs = layer, path, []


def _walk(root) -> dict[str, _Found]:
    """``{path: _Found}`` for the exact ``nnx.Linear`` nodes under ``root`` (first path wins, as in
    ``nnx.iter_graph``; every reference is recorded so a shared layer is replaced everywhere)."""
    by_id: dict[int, _Found] = {}
    seen = {id(root)}

    def visit(node, path):
        impl = nnx.graph.get_node_impl(node)
        if impl is None:
            return
        for key, child in impl.node_dict(node).items():
            if type(child) is nnx.Linear:
                if id(child) not in by_id:
                    by_id[id(child)] = _Found(child, "/".join(map(str, (*path, key))))
                by_id[id(child)].refs.append((node, key))
            elif nnx.graph.is_node(child) and id(child) not in seen:
                seen.add(id(child))
                visit(child, (*path, key))

    visit(root, ())
    return {f.path: f for f in by_id.values()}


def find_linears(module) -> dict[str, Any]:
    """``{path: layer}`` for every ``nnx.Linear`` in ``module`` (paths ``"/"``-joined nnx paths such
    as ``"blocks/0/attn/q"``; a layer referenced twice is listed once, under its first path)."""
    if not isinstance(module, nnx.Module):
        raise ValueError(f"module: expected a flax.nnx.Module, got {type(module).__name__}")
    return {p: f.layer for p, f in _walk(module).items()}


def _replace(found: _Found, new) -> None:
    for parent, key in found.refs:
        if isinstance(parent, nnx.Module):
            setattr(parent, key, new)
        elif isinstance(parent, tuple):
            raise ValueError(f"module: the nnx.Linear at {found.path!r} is held in a tuple and cannot be "
                             "replaced; hold it in an nnx.List (or a list with nnx.data)")
        else:  # nnx.List / nnx.Dict / list / dict
            parent[key] = new


# ----------------------------------------------------------------------------- capturing inputs


class _StopForward(BaseException):
    """Ends a capture pass once the targeted layers have all been seen (not an ``Exception``, so
    that user code catching ``Exception`` does not swallow it)."""


class _Recorder:
    def __init__(self, targets: dict[int, str], stop_after: dict[str, int] | None):
        self.targets = targets
        self.stop_after = stop_after
        self.calls: list[tuple[str, Any]] = []
        self.counts: dict[str, int] = {}

    def record(self, layer, x):
        path = self.targets.get(id(layer))
        if path is None:
            if self.targets:  # only targets are tapped: this is a copy of one (the graph was split/merged)
                raise ValueError("forward: an nnx.Linear ran on a copy of the module (made by nnx.jit / "
                                 "nnx.scan / nnx.vmap / nnx.clone inside forward); quantize_nnx runs forward "
                                 "eagerly on the module it is given and captures concrete inputs, so call the "
                                 "module directly in forward (jit the result instead)")
            return
        if isinstance(x, jax.core.Tracer):
            raise ValueError(f"forward: the input of the nnx.Linear at {path!r} is a tracer; quantize_nnx "
                             "runs forward eagerly and captures concrete inputs, so do not call the layers "
                             "inside jax.jit / nnx.jit / nnx.scan / nnx.vmap in forward (jit the result instead)")
        self.calls.append((path, x))
        self.counts[path] = self.counts.get(path, 0) + 1
        if self.stop_after and all(self.counts.get(p, 0) >= n for p, n in self.stop_after.items()):
            raise _StopForward()


_ACTIVE: list[_Recorder] = []


class _TappedLinear(nnx.Linear):
    """``nnx.Linear`` that reports its input to the active recorder before computing."""

    def __call__(self, inputs, *args, **kwargs):
        if _ACTIVE:
            _ACTIVE[-1].record(self, inputs)
        return super().__call__(inputs, *args, **kwargs)


@contextlib.contextmanager
def _tapping(layers, recorder: _Recorder):
    swapped = []
    _ACTIVE.append(recorder)
    try:
        for layer in layers:
            layer.__class__ = _TappedLinear
            swapped.append(layer)
        yield
    finally:
        for layer in swapped:
            layer.__class__ = nnx.Linear
        _ACTIVE.pop()


def _capture(forward, module, batch, found: list[_Found], stop_after) -> list[tuple[str, Any]]:
    rec = _Recorder({id(f.layer): f.path for f in found}, stop_after)
    with _tapping([f.layer for f in found], rec):
        try:
            forward(module, batch)
        except _StopForward:
            pass
    return rec.calls


def _rounds(calls) -> list[dict[str, Any]]:
    """Calls in order -> one activation dict per round (round j: the j-th call of every layer)."""
    per: dict[str, list] = {}
    for p, x in calls:
        per.setdefault(p, []).append(x)
    n = max((len(v) for v in per.values()), default=0)
    return [{p: xs[j] for p, xs in per.items() if j < len(xs)} for j in range(n)]


def _groups(calls) -> list[list[str]]:
    """Layers in order of first call, consecutive first calls on the same input array grouped."""
    firsts, seen = [], set()
    for p, x in calls:
        if p not in seen:
            seen.add(p)
            firsts.append((p, x))
    groups: list[list[str]] = []
    prev = None
    for p, x in firsts:
        if groups and x is prev:
            groups[-1].append(p)
        else:
            groups.append([p])
        prev = x
    return groups


# ----------------------------------------------------------------------------- the entry point


def _check_inputs(module, recipe, calib_batches, forward):
    if not isinstance(module, nnx.Module):
        raise ValueError(f"module: expected a flax.nnx.Module, got {type(module).__name__}")
    if not isinstance(recipe, Transform):
        raise ValueError(f"recipe: expected a lowbit Transform (lowbit.core.transforms.Transform, e.g. "
                         f"gptq(spec) or partition([...])), got {type(recipe).__name__}")
    if recipe.requires:
        raise ValueError(f"recipe: requires {sorted(recipe.requires)}, which quantize_nnx cannot provide for "
                         "an arbitrary NNX module (it hands the recipe layer inputs only)")
    if forward is not None and not callable(forward):
        raise ValueError(f"forward: expected a callable forward(module, batch), got {type(forward).__name__}")
    if calib_batches is None:
        return None
    if isinstance(calib_batches, (str, bytes)) or not isinstance(calib_batches, Iterable):
        raise ValueError(f"calib_batches: expected an iterable of batches, got {type(calib_batches).__name__}")
    batches = list(calib_batches)
    if not batches:
        raise ValueError("calib_batches: empty; pass at least one calibration batch (an exhausted "
                         "generator is empty too)")
    return batches


def quantize_nnx(module, recipe: Transform, calib_batches: Iterable | None, *,
                 forward: Callable[[Any, Any], Any] | None = None, sequential: bool = True,
                 return_metrics: bool = False):
    """Quantize the ``nnx.Linear`` layers of ``module`` with ``recipe``; returns a new module.

    Args:
      module: a ``flax.nnx.Module`` with ``nnx.Linear`` layers anywhere in its graph. It is not
        modified: the work happens on ``nnx.clone(module)``.
      recipe: a lowbit :class:`~lowbit.core.transforms.Transform` over ``{path: W (out, in)}`` with
        nnx paths (``"blocks/0/attn/q"``), e.g. ``partition([(r"head", identity()), (r".*", gptq(spec))])``
        or ``lowbit.methods.build("gptq", spec)``.
      calib_batches: an iterable of inputs for ``forward`` (materialised into a list: it is traversed
        once per layer group). ``None`` is accepted only for a data-free recipe (RTN).
      forward: ``forward(module, batch)`` running the module on one batch (its output is ignored);
        default ``module(batch)``. Runs eagerly (see the module docstring).
      sequential: calibrate each layer group on the inputs produced by the already-quantized
        earlier layers (default); ``False``: one capture pass on the float module, one ``apply``.
      return_metrics: also return the recipe's metrics ``{path: {name: value}}`` (GPTQ's loss and
        dampening, ...).
    Returns:
      the quantized module (``nnx.Linear`` layers whose weight the recipe quantized replaced by
      :class:`QuantizedLinear`), or ``(module, metrics)`` with ``return_metrics=True``.
    Raises:
      ValueError: naming the bad input (``module``, ``recipe``, ``calib_batches``, ``forward``).
    """
    batches = _check_inputs(module, recipe, calib_batches, forward)
    if isinstance(module, nnx.Linear):
        raise ValueError("module: is itself an nnx.Linear; wrap it in a Module (or use lowbit.quantize on kernel.T)")
    qmod = nnx.clone(module)
    found = _walk(qmod)
    if not found:
        raise ValueError(f"module: no nnx.Linear layers found in {type(module).__name__} (subclasses of "
                         "nnx.Linear are not quantized)")
    forward = forward if forward is not None else (lambda m, b: m(b))
    weights = {p: _get(f.layer.kernel).T for p, f in found.items()}
    metrics: dict = {}

    def run_group(paths: list[str], stop_after: dict[str, int] | None):
        nonlocal metrics
        ws = {p: weights[p] for p in paths}
        state = recipe.init(ws)
        if needs_data(state) and stop_after:
            targets = [found[p] for p in paths if p in stop_after]
            for batch in batches:
                for acts in _rounds(_capture(forward, qmod, batch, targets, stop_after)):
                    state, _ = recipe.update(state, acts, None)
        new, m = recipe.apply(ws, state)
        metrics = merge_metrics(metrics, m)
        for p in paths:
            _install(found[p], weights[p], new.get(p, weights[p]))

    data_free = not needs_data(jax.eval_shape(recipe.init, weights))
    if data_free:
        run_group(list(found), None)
    else:
        if batches is None:
            raise ValueError("calib_batches: None, but the recipe collects statistics (e.g. GPTQ's "
                             "Hessians) and needs calibration batches")
        trace = _capture(forward, qmod, batches[0], list(found.values()), None)
        if not trace:
            raise ValueError(f"forward: ran on calib_batches[0] without calling any of the module's "
                             f"{len(found)} nnx.Linear layers (e.g. {next(iter(found))!r})")
        counts: dict[str, int] = {}
        for p, _ in trace:
            counts[p] = counts.get(p, 0) + 1
        groups = _groups(trace)
        del trace  # keep no float activations alive during quantization
        uncalled = [p for p in found if p not in counts]
        if sequential:
            for g in groups:
                run_group(g, {p: counts[p] for p in g})
            if uncalled:
                run_group(uncalled, None)
        else:
            run_group(list(found), counts)
    return (qmod, metrics) if return_metrics else qmod


def _install(f: _Found, w, new) -> None:
    if isinstance(new, QuantizedTensor):
        if new.shape != tuple(w.shape):
            raise ValueError(f"recipe: returned a QuantizedTensor of shape {new.shape} for {f.path!r}, "
                             f"expected {tuple(w.shape)}")
        _replace(f, QuantizedLinear(new, f.layer.bias, dtype=f.layer.dtype))
    elif new is w:
        return
    elif hasattr(new, "shape") and hasattr(new, "dtype") and tuple(new.shape) == tuple(w.shape):
        kernel = _get(f.layer.kernel)
        _set_value(f.layer.kernel, jnp.asarray(new).T.astype(kernel.dtype))
    else:
        raise ValueError(f"recipe: returned {new!r:.80} for {f.path!r}; quantize_nnx installs a "
                         f"QuantizedTensor or a dense (out, in) matrix of shape {tuple(w.shape)}")
