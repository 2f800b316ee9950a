"""Pallas kernels for packed low-bit matmul (installed as ``lowbit.kernels``; imports jax only).

Modules (each: layout docstring, ``BlockSizes``, kernel body, jitted wrapper with ``interpret``,
``can_use`` / ``check`` guard, pure-jnp ``*_reference``):

* :mod:`.layout`: the "blocked planes" weight layout and the :class:`~.layout.KernelWeight` bundle.
* :mod:`.quant_matmul`: GPU (Triton) ``x @ W`` for 1/2/3/4/8-bit int / table (NF4, FP4, codebooks) /
  sign weights with grouped scales; GEMV + split-K path for small M, tensor-core path for large M.
* :mod:`.onebit_matmul`: GPU (Triton) OneBit ``((x * b) @ sign(W)^T) * a``.
* :mod:`.quant_matmul_tpu`: TPU (Mosaic) variant of :mod:`.quant_matmul`.
* :mod:`.compat`: the Pallas API differences between jax 0.10 and 0.11.

Submodules are not imported here, so ``import lowbit.kernels.layout`` stays light.
"""
