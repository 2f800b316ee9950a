"""Version shims: the one place that knows which Pallas names exist in which jax version.

The kernels run on jax 0.10.x (CPU dev machines, interpret mode) and 0.11.x (GPU machines). What
moved between versions and is handled here:

* Triton compiler params: ``pallas.triton.CompilerParams`` (jax >= 0.6), formerly
  ``pallas.gpu.TritonCompilerParams``. Passing them explicitly also selects the Triton lowering on
  jax 0.11, where ``jax_pallas_use_mosaic_gpu`` may default the GPU lowering to Mosaic GPU. jax 0.11
  deprecates the Pallas Triton backend (a ``DeprecationWarning`` at lowering time); it still works.
* Masked loads/stores: ``pallas.triton.load/store`` (jax >= 0.7), formerly ``pl.load/pl.store``.
* ``pl.dot`` moved to ``pallas.triton.dot`` in 0.10.2: the kernels use ``jnp.dot(...,
  preferred_element_type=f32)``, which lowers on Triton, Mosaic TPU and in interpret mode alike.
* TPU: ``pltpu.CompilerParams`` (formerly ``TPUCompilerParams``); TPU-faithful interpretation via
  ``pltpu.InterpretParams()`` (formerly ``pltpu.TPUInterpretParams``), else plain ``interpret=True``.
"""

from __future__ import annotations

import warnings

import jax
from jax.experimental import pallas as pl

try:  # the GPU (Triton) Pallas API; importable on CPU-only installs too
    from jax.experimental.pallas import triton as _plt
except ImportError:  # pragma: no cover - very old or stripped jax
    _plt = None

try:
    from jax.experimental.pallas import tpu as _pltpu
except ImportError:  # pragma: no cover
    _pltpu = None

__all__ = ["JAX_VERSION", "triton_params", "tpu_params", "tpu_vmem", "tpu_interpret_params",
           "masked_load", "masked_store", "default_backend", "silence_triton_deprecation"]


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


JAX_VERSION = _version_tuple(jax.__version__)


def triton_params(num_warps: int, num_stages: int):
    """Compiler params that select the Pallas Triton lowering."""
    cls = getattr(_plt, "CompilerParams", None) if _plt is not None else None
    if cls is None:  # jax < 0.6
        from jax.experimental.pallas import gpu as plgpu  # type: ignore

        cls = plgpu.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def tpu_params(dimension_semantics, vmem_limit_bytes: int | None = None):
    """Mosaic TPU compiler params with the grid's dimension semantics."""
    cls = getattr(_pltpu, "CompilerParams", None) or getattr(_pltpu, "TPUCompilerParams")
    kw = {"dimension_semantics": tuple(dimension_semantics)}
    if vmem_limit_bytes is not None:
        kw["vmem_limit_bytes"] = vmem_limit_bytes
    return cls(**kw)


def tpu_vmem(shape, dtype):
    """A VMEM scratch buffer spec."""
    return _pltpu.VMEM(tuple(shape), dtype)


def tpu_interpret_params():
    """The most TPU-faithful interpret mode this jax offers (``True`` as the generic fallback)."""
    cls = getattr(_pltpu, "InterpretParams", None) or getattr(_pltpu, "TPUInterpretParams", None)
    return cls() if cls is not None else True


def _triton_fn(name):
    fn = getattr(_plt, name, None) if _plt is not None else None
    return fn if fn is not None else getattr(pl, name)  # jax < 0.7 had pl.load / pl.store


def masked_load(ref, mask, other=0):
    """``ref[...]`` where ``mask`` holds, ``other`` elsewhere (Triton lowering and interpret mode)."""
    return _triton_fn("load")(ref, mask=mask, other=other)


def masked_store(ref, value, mask=None):
    """``ref[...] = value`` where ``mask`` holds (all of it for ``None``), without reading ``ref``
    first (``ref[...] = v`` is a swap, which on Triton also loads the old value)."""
    _triton_fn("store")(ref, value, mask=mask)


def default_backend() -> str:
    """``"gpu"`` (CUDA or ROCm), ``"tpu"`` or ``"cpu"``."""
    b = jax.default_backend()
    return "gpu" if b in ("gpu", "cuda", "rocm") else b


def silence_triton_deprecation() -> None:
    """Hide jax 0.11's 'Pallas Triton backend is deprecated' warning (benchmarks, logs)."""
    warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*",
                            category=DeprecationWarning)
