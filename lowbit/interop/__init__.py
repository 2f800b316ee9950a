"""Bridges between lowbit and other JAX model libraries.

* :mod:`lowbit.interop.nnx` — quantize the ``nnx.Linear`` layers of any Flax NNX module with a lowbit
  :class:`~lowbit.core.transforms.Transform` (:func:`~lowbit.interop.nnx.quantize_nnx`), calibrated
  layer by layer on the module's own forward pass; the layers become
  :class:`~lowbit.interop.nnx.QuantizedLinear` modules that run under ``nnx.jit`` / ``jax.jit``.

The submodules are imported on demand (``from lowbit.interop.nnx import quantize_nnx``), so importing
this package costs nothing.
"""
