"""The numeric and input checks every layer shares (one place, one wording).

* :func:`is_int` / :func:`is_real` / :func:`is_arraylike`: type predicates (a ``bool`` is never an int
  or a real here; numpy scalars are);
* :func:`float_matrix`: the check a method runs on each weight it is handed (a float ``(out, in)``
  matrix, not an already-quantized node and not a vector), with the error the user sees.
"""

from __future__ import annotations

import jax
import numpy as np

__all__ = ["is_int", "is_real", "is_arraylike", "float_matrix"]


def is_int(v) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_real(v) -> bool:
    """A real number (Python or numpy int / float), not a bool."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def is_arraylike(x) -> bool:
    """An array or an abstract one (``jax.ShapeDtypeStruct``): what a pytree node's children are
    outside ``tree_unflatten``'s placeholders (None, ``object()``, vmap axis specs)."""
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def float_matrix(path: str, w, method: str, *, hint: str = "") -> None:
    """Refuse what ``method`` cannot quantize at ``params[path]``: a weight node (already quantized:
    a QuantizedTensor, a method's node, a LoRA adapter) or anything but a 2-D ``(out, in)`` array.
    ``hint``: a method's own advice, appended to the already-quantized message."""
    from lowbit.core.nodes import is_node

    if is_node(w):
        raise ValueError(f"params[{path!r}]: already quantized ({type(w).__name__}); {method} quantizes float 2-D "
                         f"(out, in) matrices{'; ' + hint if hint else ''}")
    if getattr(w, "ndim", 0) != 2:
        raise ValueError(f"params[{path!r}]: {method} quantizes float 2-D (out, in) matrices, got "
                         f"{type(w).__name__} of shape {getattr(w, 'shape', None)}; exclude it with partition()")
