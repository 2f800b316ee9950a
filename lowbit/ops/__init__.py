"""Runtime of quantized weights: :func:`linear` dispatches a dense array or any weight node (its
matmul registered with :func:`register_matmul`) to the Pallas kernels
(GPU / TPU, :mod:`lowbit.kernels`) or to the XLA path (:mod:`lowbit.ops.dispatch`);
:mod:`lowbit.ops.kernel_format` converts QuantizedTensors to the kernels' operands once, at load."""

from lowbit.ops import kernel_format  # noqa: F401  (registers the "kernel" weight-node kind)
from lowbit.ops.dispatch import (KERNEL_MODES, get_kernel_mode, kernel_mode, linear, register_matmul, select_kernel,
                                 set_kernel_mode)

__all__ = ["linear", "register_matmul", "set_kernel_mode", "get_kernel_mode", "kernel_mode", "KERNEL_MODES",
           "select_kernel", "kernel_format"]
