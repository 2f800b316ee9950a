"""Linear algebra entry points that accept dense or quantized weights.

Convention: a linear weight ``w`` is shaped ``(out_features, in_features)`` (the PyTorch / GPTQ
paper convention) and ``linear(x, w) = x @ w.T``.

Quantized weights go through the Pallas kernels (``kernels/``, installed as ``lowbit.kernels``) when
the kernel mode allows it and the kernel's ``can_use`` guard holds, else through the jnp reference
path (:func:`lowbit.core.quantizers.qlinear`). Kernel modes (:func:`set_kernel_mode`, the
:func:`kernel_mode` context manager, or the environment variable ``LOWBIT_KERNELS``):

* ``"auto"`` (default): the Triton kernels on GPU, the Mosaic kernel on TPU, the reference path on
  CPU and wherever ``can_use`` fails (activations not bfloat16, unsupported bits/format/groups, ...).
* ``"off"``: always the reference path.
* ``"interpret"`` / ``"interpret_tpu"``: the GPU / TPU kernels in Pallas interpret mode on any
  backend (tests and debugging on CPU; slow).

The mode is read when ``linear`` is traced and is part of ``jax.jit``'s cache key (a
``jax.make_user_context``): a function jitted under one mode is re-traced when called under
another, never silently run with the stale path. ``$LOWBIT_KERNELS`` is read once, at import. A ``QuantizedTensor`` is
converted to the kernel layout on every call (an unpack + repack of the weight); convert once at
load time with :func:`lowbit.ops.kernel_format.prepare` and pass the resulting ``KernelWeight``.

Every weight node (:mod:`lowbit.core.nodes`) has its matmul registered here,
``register_matmul(type, fn)`` with ``fn(x, w) -> x @ W^T``, looked up by the weight's type (its class or
the nearest registered base): the kinds of the ground floor below, and each method's own node where
the method is defined (LLM.int8()'s ``Int8Weight``: :func:`lowbit.methods.llm_int8.int8_matmul`, an
XLA int8 x int8 -> int32 matmul plus a masked float matmul for the outlier columns, in every kernel
mode; OneBit's ``OneBitWeight``: its packed ``"onebit"`` QuantizedTensor through this dispatch, then
its output LayerNorm). Here:

* :class:`~lowbit.core.qtensor.QuantizedTensor`: a kernel when the mode and ``can_use`` allow, else
  :func:`lowbit.core.quantizers.qlinear`; a ``KernelWeight``: a kernel, else the kernels' reference;
* :class:`~lowbit.core.mixed.MixedWidthWeight`: the sum over its parts of ``linear`` on their columns;
* :class:`~lowbit.core.lora.LoraWeight` (a base weight of any kind plus a LoRA adapter): its base
  through the same dispatch (kernel or reference, unchanged) plus the adapter term
  ``scale * (dropout(x) @ a.T) @ b.T``, computed in the activation dtype (:func:`_lora_linear`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp

from lowbit.core.lora import LoraWeight
from lowbit.core.mixed import MixedWidthWeight
from lowbit.core.nodes import by_class
from lowbit.core.qtensor import QuantizedTensor
from lowbit.kernels.layout import KernelWeight

__all__ = ["linear", "register_matmul", "set_kernel_mode", "get_kernel_mode", "kernel_mode", "KERNEL_MODES",
           "select_kernel"]

KERNEL_MODES = ("auto", "off", "interpret", "interpret_tpu")
_ENV = "LOWBIT_KERNELS"


def _validate(mode: str, source: str) -> str:
    if mode not in KERNEL_MODES:
        raise ValueError(f"{source}={mode!r}: expected one of {KERNEL_MODES}")
    return mode


_ENV_MODE = _validate(os.environ.get(_ENV, "auto").strip().lower() or "auto", _ENV)
#: the active mode, in jit cache keys (None: ``$LOWBIT_KERNELS`` as read at import, else "auto")
_MODE = jax.make_user_context(default_value=None)


def get_kernel_mode() -> str:
    """The active kernel mode (:func:`kernel_mode` / :func:`set_kernel_mode`, else ``$LOWBIT_KERNELS``
    as read at import, else ``"auto"``)."""
    return _MODE.value if _MODE.value is not None else _ENV_MODE


def set_kernel_mode(mode: str | None) -> None:
    """Set the kernel mode for this process (``None``: back to ``$LOWBIT_KERNELS`` / ``"auto"``)."""
    _MODE.set_global(None if mode is None else _validate(mode, "mode"))


@contextlib.contextmanager
def kernel_mode(mode: str | None):
    """``with kernel_mode("interpret"): ...`` sets the mode for the block (thread-local)."""
    with _MODE(None if mode is None else _validate(mode, "mode")):
        yield


def _target() -> tuple[str, bool] | None:
    """(platform whose kernels to use, interpret) for the active mode, or None for the reference."""
    mode = get_kernel_mode()
    if mode == "off":
        return None
    if mode == "interpret":
        return "gpu", True
    if mode == "interpret_tpu":
        return "tpu", True
    from lowbit.kernels import compat

    backend = compat.default_backend()
    return (backend, False) if backend in ("gpu", "tpu") else None


def select_kernel(x, kw, target: tuple[str, bool] | None = None):
    """The kernel function (called as ``fn(x, kw, interpret=...)``) that would run ``x @ kw``, and
    its ``interpret`` flag; ``(None, False)`` when the reference path is used."""
    target = _target() if target is None else target
    if target is None:
        return None, False
    platform, interpret = target
    if platform == "gpu":
        from lowbit.kernels import onebit_matmul, quant_matmul

        for mod, fn in ((onebit_matmul, onebit_matmul.onebit_matmul), (quant_matmul, quant_matmul.quant_matmul)):
            if mod.can_use(x, kw, backend="gpu", interpret=interpret):
                return fn, interpret
    elif platform == "tpu":
        from lowbit.kernels import quant_matmul_tpu

        if quant_matmul_tpu.can_use(x, kw, backend="tpu", interpret=interpret):
            return quant_matmul_tpu.quant_matmul_tpu, interpret
    return None, False


def _quantized_linear(x, w):
    """``x @ dequantize(w).T`` for a QuantizedTensor: kernel when possible, else ``qlinear``."""
    from lowbit.core.quantizers import qlinear

    target = _target()
    if target is not None:
        from lowbit.ops import kernel_format

        if kernel_format.supports(w) and x.shape[-1] == w.shape[1]:
            conv = functools.partial(kernel_format.to_kernel_layout,
                                     scale_dtype=jnp.float32 if target[0] == "tpu" else None)
            fn, interpret = select_kernel(x, jax.eval_shape(conv, w), target)
            if fn is not None:
                return fn(x, conv(w), interpret=interpret)
    return qlinear(x, w)


def _kernel_weight_linear(x, w):
    """``x @ W`` for a KernelWeight: kernel when possible, else the kernels' jnp reference."""
    if x.shape[-1] != w.k:
        raise ValueError(f"x: last axis {x.shape[-1]} does not match in_features {w.k} of {w}")
    fn, interpret = select_kernel(x, w)
    if fn is not None:
        return fn(x, w, interpret=interpret)
    from lowbit.kernels.quant_matmul import quant_matmul_reference

    return quant_matmul_reference(x, w)


def _lora_linear(x, w):
    """``linear(x, w.base) + scale * (dropout(x) @ a.T) @ b.T`` for a LoraWeight ``w``.

    The base goes through :func:`linear` (kernel / reference dispatch and on-the-fly dequantization
    as for the base alone). The adapter term runs in the activation dtype (``a`` and ``b`` cast to
    ``x.dtype``, as a dense weight is). Dropout (PEFT's ``lora_dropout``) applies to the adapter's
    input only, inverted (kept entries scaled by ``1 / (1 - rate)``), and only when the node
    carries a ``dropout_key`` (training); without one the term is deterministic.
    """
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x: last axis {x.shape[-1]} does not match in_features {w.shape[1]} of {w!r}")
    y = linear(x, w.base)
    h = x
    if w.dropout > 0 and w.dropout_key is not None:
        keep = 1.0 - float(w.dropout)
        mask = jax.random.bernoulli(w.dropout_key, keep, x.shape)
        h = jnp.where(mask, (x.astype(jnp.float32) / keep).astype(x.dtype), jnp.zeros((), x.dtype))
    t = jnp.einsum("...i,ri->...r", h, w.a.astype(x.dtype))
    d = jnp.einsum("...r,or->...o", t, w.b.astype(x.dtype)) * jnp.asarray(w.scale, x.dtype)
    return y + d.astype(y.dtype)


def _mixed_linear(x, w):
    """``x @ W^T`` for a MixedWidthWeight: ``linear`` of each part on the columns it holds, summed in float32."""
    y = None
    for b, part in zip(w.part_widths, w.parts):
        yb = linear(jnp.take(x, w.columns(b), axis=-1), part).astype(jnp.float32)
        y = yb if y is None else y + yb
    return y.astype(x.dtype)


_MATMULS: dict[type, Callable] = {}


def register_matmul(cls: type, fn: Callable) -> None:
    """``linear(x, w)`` computes ``fn(x, w)`` for every ``w`` of type ``cls`` (or of a subclass without a
    matmul of its own): the matmul half of the weight-node protocol (:mod:`lowbit.core.nodes`)."""
    if not isinstance(cls, type) or not callable(fn):
        raise ValueError(f"register_matmul: expected a class and a function, got {cls!r}, {fn!r}")
    _MATMULS[cls] = fn


register_matmul(QuantizedTensor, _quantized_linear)
register_matmul(KernelWeight, _kernel_weight_linear)
register_matmul(MixedWidthWeight, _mixed_linear)
register_matmul(LoraWeight, _lora_linear)


def linear(x, w, bias=None):
    """``y = x @ w.T (+ bias)`` for ``x (..., in)`` and ``w (out, in)``: a dense array, or any weight node
    with a registered matmul (QuantizedTensor, KernelWeight, MixedWidthWeight, LoraWeight over any of
    them, a method's node: see the module docstring for when the Pallas kernels run)."""
    fn = by_class(_MATMULS, w)
    if fn is not None:
        y = fn(x, w)
    else:
        if getattr(w, "ndim", None) != 2:
            raise ValueError(f"w: expected a 2-D (out, in) weight or a weight node with a registered matmul "
                             f"(lowbit.ops.register_matmul), got {type(w).__name__} of shape {getattr(w, 'shape', None)}")
        if x.shape[-1] != w.shape[1]:
            raise ValueError(f"x: last axis {x.shape[-1]} does not match w in_features {w.shape[1]}")
        y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y
