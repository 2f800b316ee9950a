"""Mixed-precision recipes: which quantization format each linear of a model gets, as a readable
YAML file that ``lowbit quantize --recipe FILE`` and ``lowbit run`` rows (``recipe: FILE``) accept.
It is the output format of bit allocation (issue "learned bit allocation") and a hand-written
mixed-precision plan alike::

    format: lowbit-recipe
    version: 1
    method: gptq                      # the registered method applied to every listed linear
    gptq: {act_order: false}          # its options (optional; key = the method's name)
    weights:                          # path -> QuantCfg fields (the defaults of a config's quant:)
      layers/0/self_attn/q_proj: {bits: 4, group_size: 128}
      layers/0/mlp/down_proj: {bits: 3, group_size: 128}
      layers/29/mlp/down_proj: dense  # kept in 16 bit
      layers/3/mlp/up_proj: {bits: [2, 4, 3, 3, 8], group_size: 128}   # a width per column group

A list of ``bits`` gives each group of ``group_size`` input columns its own width (a
:class:`MixedSpec`, stored as a :class:`lowbit.core.mixed.MixedWidthWeight`; methods with a
``mixed`` hook in the registry: ``gptq`` -- error feedback across groups of different widths -- and
``rtn``).

Linears the recipe does not list stay as they are (dense). A path the model does not have is an
error naming it (with the model's linear paths), so a recipe made for one model cannot silently
half-apply to another. :func:`spec_bytes` is the exact storage cost of a spec on a matrix shape
(codes, scales, zeros, nested scales: the arrays :func:`lowbit.quantize` returns), the same count
as :func:`lowbit.core.quantizers.bits_per_param`; a ``dense`` entry costs 2 bytes per weight.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import yaml

from lowbit import methods
from lowbit.core.config import QuantCfg, from_dict, to_dict
from lowbit.core.mixed import check_widths
from lowbit.core.qtensor import QuantSpec
from lowbit.core.sizes import DENSE_BYTES, MixedSpec, code_bits, spec_bytes
from lowbit.core.transforms import Transform, flatten, identity, partition
from lowbit.io.records import write_text

__all__ = ["Recipe", "MixedSpec", "load_recipe", "save_recipe", "spec_bytes", "code_bits", "DENSE", "DENSE_BYTES",
           "RECIPE_FORMAT", "RECIPE_VERSION"]

RECIPE_FORMAT, RECIPE_VERSION = "lowbit-recipe", 1
#: a weights entry that keeps the linear in 16 bit
DENSE = "dense"


def _spec_of(entry, where: str) -> QuantSpec | MixedSpec | None:
    if entry == DENSE or entry is None:
        return None
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected '{DENSE}' or a mapping of quant fields (bits, group_size, ...), "
                         f"got {entry!r}")
    if isinstance(entry.get("bits"), list):   # a width per column group
        widths = entry["bits"]
        if not widths or not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 8 for b in widths):
            raise ValueError(f"{where}.bits: expected a non-empty list of widths in 1..8 (one per column group), "
                             f"got {widths!r}")
        spec = _spec_of({**entry, "bits": max(widths)}, where)
        check_widths(widths, spec, name=f"{where}.bits")
        return MixedSpec(spec, tuple(widths))
    return from_dict(QuantCfg, entry, where).spec()


def _entry_of(spec: QuantSpec | MixedSpec | None):
    if spec is None:
        return DENSE
    if isinstance(spec, MixedSpec):
        return {**_entry_of(spec.spec), "bits": list(spec.widths)}
    d = dataclasses.asdict(QuantCfg.of(spec))
    defaults = QuantCfg()
    return {k: v for k, v in d.items() if k in ("bits", "group_size") or v != getattr(defaults, k)}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """``weights``: linear path -> :class:`QuantSpec` (``None``: keep dense), quantized by the
    registered ``method`` with ``options`` (its options dataclass; ``None``: the defaults)."""

    weights: dict
    method: str = "gptq"
    options: Any = None

    def __post_init__(self):
        m = methods.get(self.method)
        if not m.quantizes:
            raise ValueError(f"recipe method={self.method!r}: does not quantize; expected one of "
                             f"{methods.with_names(lambda mm: mm.quantizes)}")
        if self.options is None:
            object.__setattr__(self, "options", m.options())
        elif not isinstance(self.options, m.options):
            raise ValueError(f"recipe options: expected {m.options.__name__}, got {type(self.options).__name__}")
        if not isinstance(self.weights, dict) or not self.weights:
            raise ValueError("recipe weights: expected a non-empty mapping of linear paths to specs")
        for p, s in self.weights.items():
            if not isinstance(p, str) or not p:
                raise ValueError(f"recipe weights: path {p!r} is not a non-empty string")
            if s is not None and not isinstance(s, (QuantSpec, MixedSpec)):
                raise ValueError(f"recipe weights[{p!r}]: expected a QuantSpec, MixedSpec or None (dense), got {s!r}")
        mixed = [p for p, s in self.weights.items() if isinstance(s, MixedSpec)]
        if mixed:
            if m.mixed is None:
                have = methods.with_names(lambda mm: mm.mixed is not None)
                raise ValueError(f"recipe weights[{mixed[0]!r}]: a width per column group needs method "
                                 f"{' or '.join(have)}, not {self.method!r}")
            s = self.weights[mixed[0]]
            m.mixed(s.spec, self.options, {mixed[0]: s.widths})   # the method's own checks of its options

    def check(self, params) -> dict[str, tuple[int, int]]:
        """The shapes of the recipe's linears in ``params``; a ValueError naming every path the
        params do not have (or that is not a 2-D matrix), with the params' linear paths."""
        flat = flatten(params)
        linears = {p: tuple(int(d) for d in v.shape) for p, v in flat.items() if getattr(v, "ndim", 0) == 2}
        unknown = [p for p in self.weights if p not in linears]
        if unknown:
            shown = ", ".join(sorted(linears)[:12]) + (" ..." if len(linears) > 12 else "")
            raise ValueError(f"recipe: unknown weight paths {unknown[:8]}{' ...' if len(unknown) > 8 else ''} "
                             f"(not 2-D weights of this model); the model's matrices are: {shown}")
        for p, s in self.weights.items():
            if isinstance(s, MixedSpec):
                check_widths(s.widths, s.spec, linears[p][1], f"recipe weights[{p!r}].bits")
        return {p: linears[p] for p in self.weights}

    def nbytes(self, params) -> int:
        """Exact bytes of the recipe's linears once quantized (dense entries at 2 bytes/weight)."""
        return sum(spec_bytes(self.weights[p], shape) for p, shape in self.check(params).items())

    def bits_per_param(self, params) -> float:
        shapes = self.check(params)
        return 8.0 * self.nbytes(params) / sum(r * c for r, c in shapes.values())

    def transform(self) -> Transform:
        """The recipe as one Transform: the method with each listed spec on exactly its paths (paths
        sharing a spec share one transform, so shared inputs are reduced once), everything else
        passed through."""
        groups: dict[QuantSpec, list[str]] = {}
        mixed: dict[QuantSpec, dict[str, tuple]] = {}
        for p, s in self.weights.items():
            if isinstance(s, MixedSpec):
                mixed.setdefault(s.spec, {})[p] = s.widths
            elif s is not None:
                groups.setdefault(s, []).append(p)
        rules = [(_exact(ps), methods.build(self.method, s, self.options)) for s, ps in groups.items()]
        rules += [(_exact(widths), methods.build(self.method, s, self.options, widths=widths))
                  for s, widths in mixed.items()]
        return partition(rules + [(".*", identity())])

    def to_dict(self) -> dict:
        d = {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "method": self.method}
        opts = to_dict(self.options)
        if opts:
            d[self.method] = opts
        d["weights"] = {p: _entry_of(s) for p, s in self.weights.items()}
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "recipe") -> "Recipe":
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a mapping (format: {RECIPE_FORMAT}), got {type(d).__name__}")
        if d.get("format") != RECIPE_FORMAT or d.get("version") != RECIPE_VERSION:
            raise ValueError(f"{where}: format={d.get('format')!r}, version={d.get('version')!r}: expected "
                             f"format: {RECIPE_FORMAT}, version: {RECIPE_VERSION}")
        method = d.get("method", "gptq")
        m = methods.get(method)
        known = {"format", "version", "method", "weights", method}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"{where}: unknown keys {extra} (known: {sorted(known)})")
        opts = from_dict(m.options, d.get(method) or {}, f"{where}.{method}")
        weights = d.get("weights")
        if not isinstance(weights, dict):
            raise ValueError(f"{where}.weights: expected a mapping of linear paths to specs")
        return cls({str(p): _spec_of(e, f"{where}.weights[{p!r}]") for p, e in weights.items()}, method, opts)


def _exact(paths) -> str:
    return "^(" + "|".join(re.escape(p) for p in paths) + ")$"


def load_recipe(path: str) -> Recipe:
    """Read a recipe file (see the module docstring); errors name the file and the key."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe {path}: no such file")
    try:
        with open(path) as f:
            d = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {path}: not valid YAML ({e})") from None
    return Recipe.from_dict(d, f"recipe {path}")


def save_recipe(recipe: Recipe, path: str, comment: str = "") -> str:
    """Write ``recipe`` to ``path`` atomically (YAML; ``comment`` lines on top); returns ``path``."""
    head = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
    write_text(path, head + yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    return path
