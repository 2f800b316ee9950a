"""The method registry: a name -> :class:`Method` table that configs, the pipeline, the runner and
the CLI derive from. Nothing outside ``lowbit/methods/`` compares a method's name: what a method
does beyond its Transform is said here, by hooks and capabilities.

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

Hooks and capabilities (all optional; ``register(..., finalize=..., training=...)``):

* ``finalize(params, spec) -> params``: the model as stored and evaluated after calibration (and
  after training): OneBit packs its training-form weights;
* ``training``: a :class:`Training`, the method's own training stage (rows with ``distill: true``
  train the method's weights from the float model as teacher: OneBit's distillation); LoRA
  fine-tuning (``finetune: true``) is a stage every method has;
* ``report(spec) -> {"bits": ..., "group_size": ...}``: what a row's ``metrics.json`` and tables say
  of the quantization (default: the spec's ``bits`` and ``group_size``; LLM.int8() has one scale per
  row whatever the group size);
* ``mixed(spec, options, widths) -> Transform``: the method with a bit width per column group for
  the paths in ``widths`` (``{path: widths}``): recipes with per-group widths need it;
* ``export(record) -> dict``: the method's fields of an HF ``quantize_config.json`` from a
  checkpoint's ``extra["quantize"]`` record (GPTQ: ``damp_percent``, ``static_groups``, ...);
* ``data_free``: the Transform collects no statistics (``lowbit merge --requantize`` then needs no
  calibration data); ``quantizes=False``: the row is the model as loaded (``fp``, the reference).

Whether the next block of the layer-sequential driver is calibrated on the float or the quantized
block's outputs is a property of the Transform (:attr:`lowbit.core.transforms.Transform.float_inputs`),
set by the method that needs it (AWQ followed by RTN, the llm-awq reference).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from lowbit.core.qtensor import QuantSpec
from lowbit.core.transforms import Transform

__all__ = ["Method", "Training", "register", "get", "names", "with_names", "build", "METHODS"]


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A method without options."""


@dataclasses.dataclass(frozen=True)
class Training:
    """A method's own training stage (see the module docstring): what the training loop needs to
    train the method's weights by distillation from the float model.

    ``trainable()``: regex of the trainable leaves (:func:`lowbit.train.step.partition_params`);
    ``optim(lr, warmup_steps)``: the :class:`~lowbit.train.optim.OptimCfg`; ``loss(compute_cfg,
    teacher_cfg, seqlen, n_layers, remat)``: the train-step loss, called with the teacher's params
    as ``consts``; ``count(params)``: the number of trained parameters."""
    trainable: Callable[[], str]
    optim: Callable[[float, int], Any]
    loss: Callable[..., Callable]
    count: Callable[[Any], int]


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    #: ``factory(spec, options) -> Transform`` (``None`` for methods that leave the model as is)
    factory: Callable[[QuantSpec | None, Any], Transform | None]
    options: type = NoOptions
    help: str = ""
    #: False for ``fp``: the row is the unquantized model, no ``quant`` spec
    quantizes: bool = True
    #: the Transform collects no statistics (needs no calibration data)
    data_free: bool = False
    finalize: Callable[[Any, QuantSpec], Any] | None = None
    training: Training | None = None
    report: Callable[[QuantSpec], dict] | None = None
    mixed: Callable[[QuantSpec, Any, dict], Transform] | None = None
    export: Callable[[dict], dict] | None = None

    def report_fields(self, spec: QuantSpec | None) -> dict:
        """``{"bits", "group_size"}`` of a row quantized with ``spec`` (None for a row that does not quantize)."""
        if not self.quantizes or spec is None:
            return {"bits": None, "group_size": None}
        if self.report is not None:
            return self.report(spec)
        return {"bits": spec.bits, "group_size": spec.group_size}

    def finalized(self, params, spec: QuantSpec | None):
        """``params`` as this method stores and evaluates them (``finalize``, or as they are)."""
        return params if self.finalize is None else self.finalize(params, spec)


METHODS: dict[str, Method] = {}


def register(name: str, *, options: type = NoOptions, help: str = "", quantizes: bool = True,
             data_free: bool = False, finalize=None, training: Training | None = None, report=None, mixed=None,
             export=None):
    """Decorator registering ``factory(spec, options) -> Transform`` under ``name`` with its hooks
    (module docstring)."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"method name {name!r}: expected letters, digits, '-' or '_'")
    if not dataclasses.is_dataclass(options):
        raise ValueError(f"method {name!r}: options must be a dataclass type, got {options!r}")
    if training is not None and not isinstance(training, Training):
        raise ValueError(f"method {name!r}: training must be a lowbit.methods.registry.Training, got {training!r}")

    def deco(factory):
        if name in METHODS and METHODS[name].factory is not factory:
            raise ValueError(f"method {name!r} is already registered (by {METHODS[name].factory.__module__})")
        METHODS[name] = Method(name, factory, options, help or (factory.__doc__ or "").strip().split("\n")[0],
                               quantizes, data_free, finalize, training, report, mixed, export)
        return factory

    return deco


def names() -> tuple[str, ...]:
    return tuple(METHODS)


def get(name: str) -> Method:
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method {name!r}: unknown; registered methods: {list(METHODS)}")
    return METHODS[name]


def with_names(pred: Callable[[Method], bool]) -> list[str]:
    """The registered methods for which ``pred(method)`` holds, e.g. ``with_names(lambda m: m.quantizes)``."""
    return [n for n, m in METHODS.items() if pred(m)]


def build(name: str, spec: QuantSpec | None, options: Any = None, *, widths: dict | None = None) -> Transform | None:
    """The Transform of method ``name`` (``options``: an instance of its options dataclass);
    ``widths`` (``{path: a width per column group}``): through the method's ``mixed`` hook."""
    m = get(name)
    if options is None:
        options = m.options()
    if not isinstance(options, m.options):
        raise ValueError(f"method {name!r}: options must be a {m.options.__name__}, got {type(options).__name__}")
    if widths:
        if m.mixed is None:
            raise ValueError(f"method {name!r}: has no bit width per column group; methods that have one: "
                             f"{with_names(lambda mm: mm.mixed is not None)}")
        return m.mixed(spec, options, widths)
    return m.factory(spec, options)
