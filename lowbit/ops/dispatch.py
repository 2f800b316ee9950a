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

A :class:`lowbit.train.lora.LoraWeight` (a base weight of any of these kinds plus a LoRA adapter)
runs its base through the same dispatch (kernel or reference, unchanged) and adds the adapter term
``scale * (dropout(x) @ a.T) @ b.T``, computed in the activation dtype (:func:`_lora_linear`).

A method's weight node (:class:`lowbit.core.qtensor.QuantizedMatrix`) computes itself
(``w.matmul(x)``): LLM.int8()'s ``Int8Weight`` runs :func:`lowbit.methods.llm_int8.int8_matmul` in
every kernel mode (an XLA int8 x int8 -> int32 matmul plus a masked float matmul for the outlier
columns; no Pallas kernel); OneBit's ``OneBitWeight`` (:mod:`lowbit.methods.onebit`) runs its packed
``"onebit"`` QuantizedTensor through this dispatch (the OneBit kernel or the reference path), then
its output LayerNorm.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import jax
import jax.numpy as jnp

__all__ = ["linear", "set_kernel_mode", "get_kernel_mode", "kernel_mode", "KERNEL_MODES", "select_kernel"]

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


def _lora_type():
    """:class:`lowbit.train.lora.LoraWeight` when that module is loaded, else None (no LoraWeight can
    exist before it is imported; this keeps ``linear`` from importing the training library)."""
    mod = sys.modules.get("lowbit.train.lora")
    return None if mod is None else mod.LoraWeight


def linear(x, w, bias=None):
    """``y = x @ w.T (+ bias)`` for ``x (..., in)`` and ``w (out, in)`` dense, QuantizedTensor,
    KernelWeight, a method's QuantizedMatrix node (LLM.int8(), OneBit), or a LoraWeight over any of them (see the module docstring
    for when the Pallas kernels run)."""
    from lowbit.ops.kernel_format import KernelWeight
    from lowbit.core.qtensor import QuantizedMatrix, QuantizedTensor  # local: qtensor imports numerics only

    lora = _lora_type()
    if lora is not None and isinstance(w, lora):
        y = _lora_linear(x, w)
    elif isinstance(w, QuantizedMatrix):   # a method's weight node: LLM.int8(), OneBit
        y = w.matmul(x)
    elif isinstance(w, QuantizedTensor):
        y = _quantized_linear(x, w)
    elif isinstance(w, KernelWeight):
        y = _kernel_weight_linear(x, w)
    else:
        if w.ndim != 2:
            raise ValueError(f"w: expected a 2-D (out, in) weight, got shape {w.shape}")
        if x.shape[-1] != w.shape[1]:
            raise ValueError(f"x: last axis {x.shape[-1]} does not match w in_features {w.shape[1]}")
        y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y
