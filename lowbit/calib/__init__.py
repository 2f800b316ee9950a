"""Calibration: the layer-sequential driver (:mod:`.driver`) that feeds a model's calibration
activations to a method's :class:`~lowbit.core.transforms.Transform`, block by block, through the
architecture protocol of :mod:`lowbit.models` (any family that implements it)."""
