"""Bit allocation: which format each part of a model gets.

* :mod:`.recipe` -- :class:`Recipe`, the mixed-precision plan (linear path -> QuantSpec or dense) as
  a readable YAML file (``lowbit quantize --recipe``, ``recipe:`` rows of ``lowbit run``), and
  :func:`spec_bytes`, the exact storage cost of a spec on a matrix shape.
* :mod:`.learned` -- :func:`~lowbit.alloc.learned.allocate`: candidates per weight matrix, a
  softmax relaxation trained by gradient descent on a user's jittable task cost, the size budget
  enforced by a Lagrange multiplier (dual ascent), a discretisation that never exceeds the budget;
  returns a :class:`Recipe`.
* :mod:`.baselines` -- the same problem by proxies and search: HAWQ-style (Hutchinson Hessian
  traces x quantization error, knapsack), HIGGS-style (per-layer noise sensitivity x relative
  error, dynamic programming), uniform; :func:`~lowbit.alloc.problem.knapsack` is the exact
  multiple-choice knapsack both use.
"""

from lowbit.alloc.recipe import DENSE, Recipe, load_recipe, save_recipe, spec_bytes

__all__ = ["Recipe", "load_recipe", "save_recipe", "spec_bytes", "DENSE"]
