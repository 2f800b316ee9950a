"""Runtime of quantized weights: :func:`linear` dispatches a dense array, a
:class:`~lowbit.core.qtensor.QuantizedTensor` or a kernel-layout weight to the Pallas kernels
(GPU / TPU, :mod:`lowbit.kernels`) or to the XLA path (:mod:`lowbit.ops.dispatch`);
:mod:`lowbit.ops.kernel_format` converts QuantizedTensors to the kernels' operands once, at load."""

from lowbit.ops.dispatch import (KERNEL_MODES, get_kernel_mode, kernel_mode, linear, select_kernel,
                                 set_kernel_mode)

__all__ = ["linear", "set_kernel_mode", "get_kernel_mode", "kernel_mode", "KERNEL_MODES", "select_kernel"]
