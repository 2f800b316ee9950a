"""The LoRA adapter as a weight node: :class:`LoraWeight` = a base weight (dense, or any opaque
weight node: QuantizedTensor, ...) plus ``scale * b @ a``. Its training utilities (adding,
merging, stripping adapters, the QLoRA recipe) are :mod:`lowbit.train.lora`; its matmul is
registered in :mod:`lowbit.ops` (the base through the same dispatch, then the adapter term)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lowbit.core.checks import is_arraylike
from lowbit.core.nodes import register_node
from lowbit.core.qtensor import MatrixLike, QuantizedTensor

__all__ = ["LoraWeight", "strip_lora"]


@dataclasses.dataclass(frozen=True)
class LoraWeight(MatrixLike):
    """A linear weight ``(out, in)`` with a LoRA adapter: ``base + scale * b @ a`` (see the module
    docstring). A pytree: children ``base``, ``a (rank, in)``, ``b (out, rank)``, ``dropout_key``
    (None, or a typed key for one step); static ``scale`` (``alpha / rank``), ``rank``, ``dropout``.

    Like a :class:`~lowbit.core.qtensor.QuantizedTensor` it has ``shape == (out, in)`` and no ``T``:
    use :func:`lowbit.ops.linear`, or :func:`merge_lora` for a dense matrix.
    """

    base: Any
    a: jax.Array
    b: jax.Array
    dropout_key: jax.Array | None = None
    # static metadata
    scale: float = 1.0
    rank: int = 1
    dropout: float = 0.0

    def __post_init__(self):
        # As in QuantizedTensor: JAX rebuilds nodes from placeholders in tree_unflatten (None,
        # object(), vmap specs); only check when the adapters are arrays.
        if not (is_arraylike(self.a) and is_arraylike(self.b)):
            return
        if self.a.ndim != 2 or self.b.ndim != 2 or self.a.shape[0] != self.rank or self.b.shape[1] != self.rank:
            raise ValueError(f"LoraWeight: a {tuple(self.a.shape)} / b {tuple(self.b.shape)} do not match rank "
                             f"{self.rank} (expected a (rank, in), b (out, rank))")
        base_shape = getattr(self.base, "shape", None)
        if isinstance(base_shape, tuple) and len(base_shape) == 2 and base_shape != self.shape:
            raise ValueError(f"LoraWeight: base shape {base_shape} != (out, in) {self.shape} of b @ a")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoraWeight: dropout={self.dropout!r}: expected a rate in [0, 1)")

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.b.shape[-2]), int(self.a.shape[-1]))

    @property
    def dtype(self):
        return getattr(self.base, "dtype", jnp.float32)

    @property
    def T(self):
        raise TypeError("LoraWeight has no transpose; use lowbit.ops.linear, or merge_lora() for a dense matrix")

    def ckpt_fields(self) -> tuple[dict, dict]:
        """The node protocol (:mod:`lowbit.core.nodes`): base and adapters; the per-step dropout key is
        transient and never saved."""
        return ({"base": self.base, "a": self.a, "b": self.b},
                {"scale": float(self.scale), "rank": int(self.rank), "dropout": float(self.dropout)})

    @classmethod
    def from_ckpt(cls, fields: dict, meta: dict) -> "LoraWeight":
        return cls(fields["base"], fields["a"], fields["b"], None, float(meta["scale"]), int(meta["rank"]),
                   float(meta["dropout"]))

    def __repr__(self):
        key = " +dropout_key" if self.dropout_key is not None else ""
        return (f"LoraWeight(shape={self.shape}, rank={self.rank}, scale={self.scale:g}, dropout={self.dropout:g}"
                f"{key}, base={self.base if isinstance(self.base, QuantizedTensor) else type(self.base).__name__})")


jax.tree_util.register_dataclass(LoraWeight, data_fields=["base", "a", "b", "dropout_key"],
                                 meta_fields=["scale", "rank", "dropout"])
# composite: its children (the frozen base, the trainable adapters) are parameters in their own right
register_node("lora", LoraWeight, opaque=False)


def strip_lora(params):
    """``params`` with every :class:`LoraWeight` replaced by its base (the adapters dropped)."""
    return jax.tree_util.tree_map(lambda v: v.base if isinstance(v, LoraWeight) else v, params,
                                  is_leaf=lambda v: isinstance(v, LoraWeight))
