"""Weight nodes: the one protocol of every kind of weight that stands where a dense ``(out, in)``
matrix stood.

A weight node is a pytree (its arrays are the children, its static metadata the aux data) with
``shape == (out, in)`` and no ``.T``. Every kind -- :class:`~lowbit.core.qtensor.QuantizedTensor`,
:class:`~lowbit.core.mixed.MixedWidthWeight`, LLM.int8()'s ``Int8Weight``, OneBit's
``OneBitWeight``, the LoRA adapter :class:`~lowbit.core.lora.LoraWeight`, the kernel layout
``KernelWeight`` -- registers here once, under a short kind name::

    register_node("int8", Int8Weight)            # fields / build default to the class's
                                                 # ckpt_fields() / from_ckpt(fields, meta)
    register_matmul(Int8Weight, int8_matmul)     # lowbit.ops: how lowbit.ops.linear computes it

and is then, everywhere, one thing:

* **checkpoint** (:mod:`lowbit.io.checkpoint`): ``fields(node) -> (children, meta)`` (named children:
  arrays, nested nodes, tuples; ``None`` for absent ones; JSON-able static ``meta``) and
  ``build(children, meta) -> node``. A manifest names the kind (``"int8"``), never a module or a
  class: loading resolves only registered kinds, and a file naming anything else is an error that
  names it, before anything is imported;
* **matmul** (:func:`lowbit.ops.register_matmul`): ``lowbit.ops.linear(x, node) = x @ W^T``, kernels
  or XLA, looked up by type (core never imports ops);
* **transforms**: an *opaque* kind (every kind but LoRA adapters) is one leaf of
  :func:`lowbit.core.transforms.flatten` (a unit a method quantized; ``describe()`` gives the
  calibration report's fields); a *composite* kind (``LoraWeight``) is a node whose children are
  parameters in their own right (the frozen base, the trainable adapters), walked into by
  ``flatten``.

Importing :mod:`lowbit` registers every built-in kind (the methods' kinds with
:mod:`lowbit.methods`), so any checkpoint lowbit wrote can be read once ``lowbit`` is imported.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

__all__ = ["NodeKind", "register_node", "kind_of", "is_node", "is_opaque", "get_kind", "kind_names", "by_class"]


@dataclasses.dataclass(frozen=True)
class NodeKind:
    name: str
    cls: type
    #: ``fields(node) -> (children: {name: child or None}, meta: JSON-able dict)``
    fields: Callable[[Any], tuple[dict, dict]]
    #: ``build(children, meta) -> node``
    build: Callable[[dict, dict], Any]
    #: False for a node whose children are parameters in their own right (LoRA adapters)
    opaque: bool = True


_KINDS: dict[str, NodeKind] = {}
_BY_CLASS: dict[type, NodeKind] = {}


def register_node(name: str, cls: type, *, fields: Callable | None = None, build: Callable | None = None,
                  opaque: bool = True) -> type:
    """Register weight-node class ``cls`` under kind ``name`` (see the module docstring); returns ``cls``.
    ``fields`` / ``build`` default to ``cls.ckpt_fields`` / ``cls.from_ckpt``."""
    if not (isinstance(name, str) and name.replace("_", "").replace("-", "").isalnum()):
        raise ValueError(f"node kind {name!r}: expected letters, digits, '-' or '_'")
    if not isinstance(cls, type):
        raise ValueError(f"node kind {name!r}: expected a class, got {cls!r}")
    kind = NodeKind(name, cls, fields or (lambda node: node.ckpt_fields()), build or cls.from_ckpt, bool(opaque))
    old = _KINDS.get(name)
    if old is not None and old.cls is not cls and old.cls.__qualname__ != cls.__qualname__:
        raise ValueError(f"node kind {name!r} is already registered for {old.cls.__module__}.{old.cls.__qualname__}")
    _KINDS[name] = kind
    _BY_CLASS[cls] = kind
    return cls


def by_class(table: dict, x):
    """``table[c]`` for the first class ``c`` of ``type(x).__mro__`` in ``table`` (a node's own entry,
    else its nearest registered base), or None."""
    for c in type(x).__mro__:
        v = table.get(c)
        if v is not None:
            return v
    return None


def kind_of(x) -> NodeKind | None:
    """The registered kind of ``x`` (by its class or the nearest registered base), or None."""
    return by_class(_BY_CLASS, x)


def is_node(x) -> bool:
    """Whether ``x`` is a weight node of a registered kind."""
    return kind_of(x) is not None


def is_opaque(x) -> bool:
    """Whether ``x`` is a weight node that :func:`lowbit.core.transforms.flatten` keeps whole."""
    k = kind_of(x)
    return k is not None and k.opaque


def get_kind(name: str, where: str = "node kind") -> NodeKind:
    """The kind registered as ``name``; a ValueError naming it and the registered kinds otherwise."""
    k = _KINDS.get(name) if isinstance(name, str) else None
    if k is None:
        raise ValueError(f"{where} {name!r}: not a registered weight-node kind (registered: {sorted(_KINDS)})")
    return k


def kind_names() -> tuple[str, ...]:
    return tuple(sorted(_KINDS))
