"""The method registry: a name -> (options dataclass, Transform factory) table that configs, the
runner and the CLI derive from.

Adding a method is one module and its tests::

    # lowbit/methods/mymethod.py (or your own code, imported before the config is loaded)
    @dataclasses.dataclass(frozen=True)
    class MyOptions:
        strength: float = 1.0

    @register("mymethod", options=MyOptions, help="what it does, in one line")
    def mymethod(spec: QuantSpec, opts: MyOptions) -> Transform:
        return Transform(init=..., update=..., apply=...)

Then ``methods: [{name: mine-w4, method: mymethod, quant: {bits: 4}, mymethod: {strength: 2}}]`` in
a YAML config, ``lowbit quantize --method mymethod`` and ``lowbit quantize --help`` all know it (a
method's options live under the key named after the method).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from lowbit.core.qtensor import QuantSpec
from lowbit.core.transforms import Transform

__all__ = ["Method", "register", "get", "names", "build", "METHODS"]


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A method without options."""


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    #: ``factory(spec, options) -> Transform`` (``None`` for methods that leave the model as is)
    factory: Callable[[QuantSpec | None, Any], Transform | None]
    options: type = NoOptions
    help: str = ""
    #: False for ``fp``: the row is the unquantized model, no ``quant`` spec
    quantizes: bool = True


METHODS: dict[str, Method] = {}


def register(name: str, *, options: type = NoOptions, help: str = "", quantizes: bool = True):
    """Decorator registering ``factory(spec, options) -> Transform`` under ``name``."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"method name {name!r}: expected letters, digits, '-' or '_'")
    if not dataclasses.is_dataclass(options):
        raise ValueError(f"method {name!r}: options must be a dataclass type, got {options!r}")

    def deco(factory):
        if name in METHODS and METHODS[name].factory is not factory:
            raise ValueError(f"method {name!r} is already registered (by {METHODS[name].factory.__module__})")
        METHODS[name] = Method(name, factory, options, help or (factory.__doc__ or "").strip().split("\n")[0],
                               quantizes)
        return factory

    return deco


def names() -> tuple[str, ...]:
    return tuple(METHODS)


def get(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method {name!r}: unknown; registered methods: {list(METHODS)}")
    return METHODS[name]


def build(name: str, spec: QuantSpec | None, options: Any = None) -> Transform | None:
    """The Transform of method ``name`` (``options``: an instance of its options dataclass)."""
    m = get(name)
    if options is None:
        options = m.options()
    if not isinstance(options, m.options):
        raise ValueError(f"method {name!r}: options must be a {m.options.__name__}, got {type(options).__name__}")
    return m.factory(spec, options)
