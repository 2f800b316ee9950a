"""Frozen dataclasses <-> plain (YAML / JSON) dicts, the one conversion every config, recipe and
options block of lowbit goes through; and :class:`QuantCfg`, the YAML form of a
:class:`~lowbit.core.qtensor.QuantSpec`.

* :func:`from_dict` builds a dataclass from a mapping, recursively (nested dataclasses, tuples,
  ``X | None``, ints accepted for floats); an unknown key, a missing required key or a value of the
  wrong type raises a ValueError naming its full key path (``methods.2.quant.bits``);
* :func:`to_dict` is the inverse (tuples become lists), :func:`config_hash` a short digest of it;
* a dataclass that needs its own plain form (a method row, whose options live under the method's
  name) defines ``from_plain(d, where)`` (classmethod) and ``to_plain()``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any

from lowbit.core.qtensor import QuantSpec

__all__ = ["QuantCfg", "from_dict", "from_fields", "to_dict", "config_hash"]


@dataclasses.dataclass(frozen=True)
class QuantCfg:
    """Arguments of :class:`lowbit.QuantSpec` (group_size null = per output channel). Partial last
    groups are on by default here, as in the GPTQ reference code (SmolLM2's 576 = 4 x 128 + 64)."""
    bits: int = 4
    group_size: int | None = 128
    partial_groups: bool = True
    symmetric: bool = False
    format: str = "int"
    clip: bool = False
    double_quant: bool = False
    dq_map: str = "linear"        # "dynamic": bitsandbytes' double quantization (QLoRA)
    scale_dtype: str = "float16"  # storage dtype of the scales (QLoRA / bitsandbytes: float32)

    def spec(self) -> QuantSpec:
        """The :class:`QuantSpec` these fields describe (its own checks apply)."""
        return QuantSpec(**dataclasses.asdict(self))

    @classmethod
    def of(cls, spec: QuantSpec) -> "QuantCfg":
        """The fields of ``spec`` that a QuantCfg holds."""
        return cls(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(cls)})


def _convert(tp, value, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if isinstance(value, (str, int, float)) or value is None:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(item, v, f"{where}.{i}") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ValueError(f"{where}={value!r}: expected {tp.__name__}")
    return value


def from_dict(cls, d: Any, where: str = ""):
    """Build dataclass ``cls`` from a mapping, recursively; unknown keys raise naming their path."""
    if isinstance(d, cls):
        return d
    custom = getattr(cls, "from_plain", None)
    if custom is not None:
        return custom(d, where)
    return from_fields(cls, d, where)


def from_fields(cls, d: Any, where: str = ""):
    """:func:`from_dict` by ``cls``'s fields alone (what a ``from_plain`` builds on)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{where + '.' if where else ''}{unknown[0]}: unknown key (expected one of {sorted(fields)})")
    kw = {k: _convert(hints[k], v, f"{where + '.' if where else ''}{k}") for k, v in d.items()}
    missing = [n for n, f in fields.items() if n not in kw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{where + '.' if where else ''}{missing[0]}: required key is missing")
    return cls(**kw)


def _plain(x):
    custom = getattr(x, "to_plain", None)
    if custom is not None and not isinstance(x, type):
        return _plain(custom())
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def to_dict(cfg) -> dict:
    """Plain, JSON/YAML-able dict of a config dataclass or dict (tuples become lists)."""
    return json.loads(json.dumps(_plain(cfg)))


def config_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]
