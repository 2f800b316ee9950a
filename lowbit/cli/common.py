"""What the sub-commands share: the command table, argument types, the calibration / output /
device flags, and the device setup (:func:`devices`) every command runs under."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from typing import Callable

__all__ = ["Command", "COMMANDS", "register", "positive_int", "calibration_args", "checkpoint_out_args", "device_args",
           "join", "devices", "method_option_flags", "method_options"]


@dataclasses.dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register(name: str, help: str, add_arguments, run) -> None:
    """Add a sub-command (see :mod:`lowbit.cli`)."""
    if name in COMMANDS:
        raise ValueError(f"sub-command {name!r} is already registered")
    COMMANDS[name] = Command(help, add_arguments, run)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--batch-size 0`` is an argument error, not a crash later)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return v


def calibration_args(p: argparse.ArgumentParser, *, calib_default, calib_help: str) -> None:
    """The calibration-data flags shared by ``quantize`` and ``merge --requantize``."""
    p.add_argument("--calib", default=calib_default, help=calib_help)
    p.add_argument("--calib-split", default="calib")
    p.add_argument("--nsamples", type=positive_int, default=128)
    p.add_argument("--seqlen", type=positive_int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=8, help="calibration windows per forward pass")


def checkpoint_out_args(p: argparse.ArgumentParser) -> None:
    """``--out`` / ``--overwrite`` of the commands that write a lowbit checkpoint."""
    p.add_argument("--out", required=True,
                   help="output checkpoint directory (written atomically); an existing one is replaced only if "
                        "it is a lowbit checkpoint (never if it holds files lowbit did not write)")
    p.add_argument("--overwrite", action="store_true",
                   help="also replace another kind of lowbit output (e.g. an HF export) at --out")


def method_option_flags(p: argparse.ArgumentParser) -> None:
    """One flag per field of every registered method's options dataclass (derived, not listed)."""
    import typing

    from lowbit import methods

    seen: dict[str, list[str]] = {}
    fields = {}
    for m in methods.METHODS.values():
        hints = typing.get_type_hints(m.options)
        for f in dataclasses.fields(m.options):
            seen.setdefault(f.name, []).append(m.name)
            fields[f.name] = (hints[f.name], f.default)
    for name, (tp, default) in fields.items():
        flag = "--" + name.replace("_", "-")
        owners = "/".join(seen[name])
        if tp is bool:   # --x / --no-x: either way, whatever the default
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{owners} option (default {default})")
        else:  # scalars by their type; anything else (tuples, unions) as a YAML value
            import yaml

            p.add_argument(flag, type=tp if tp in (int, float, str) else yaml.safe_load, default=None,
                           help=f"{owners} option (default {default})")


def method_options(args: argparse.Namespace, method: str):
    """The options dataclass of ``method`` from its flags (:func:`method_option_flags`; unset flags
    keep the defaults)."""
    from lowbit import methods
    from lowbit.core.config import from_dict

    opts_cls = methods.get(method).options
    return from_dict(opts_cls, {f.name: getattr(args, f.name) for f in dataclasses.fields(opts_cls)
                                if getattr(args, f.name, None) is not None}, method)


def device_args(p: argparse.ArgumentParser) -> None:
    """``--mesh`` / ``--distributed`` and the multi-process flags, the same on every command."""
    g = p.add_argument_group("devices and processes (lowbit.dist)")
    g.add_argument("--mesh", default=None, metavar="AXIS=N[,AXIS=N]",
                   help="device mesh, e.g. data=8 or data=4,model=2 (default: every device on data; for run, the "
                        "config's mesh first)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process job (jax.distributed.initialize): auto-detected on TPU VMs / SLURM, "
                        "or given by --coordinator, --num-processes, --process-id")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address (with --distributed)")
    g.add_argument("--num-processes", type=positive_int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g.add_argument("--init-timeout", type=positive_int, default=120, metavar="S",
                   help="seconds to wait for every process to join (default 120)")


def join(args: argparse.Namespace) -> None:
    """Join the multi-process job the flags describe (``--distributed``), checking them first."""
    from lowbit import dist

    if (args.coordinator or args.num_processes or args.process_id is not None) and not args.distributed:
        raise ValueError("--coordinator / --num-processes / --process-id: only with --distributed")
    if args.mesh is not None:
        dist.parse_mesh(args.mesh)   # a bad spec fails before the job is joined
    if args.distributed:
        dist.initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.init_timeout)


@contextlib.contextmanager
def devices(args: argparse.Namespace):
    """``with devices(args) as mesh:`` the command's devices: joins the job (``--distributed``) and
    installs the mesh (``--mesh``, or every device on ``data`` when there are several; None on one
    device), as ``lowbit run`` does. Load the model inside, and put it on the mesh with
    :func:`lowbit.dist.shard_params`."""
    import jax

    from lowbit import dist

    join(args)
    mesh = dist.make_mesh(args.mesh) if args.mesh is not None or jax.device_count() > 1 else None
    with dist.use_mesh(mesh):
        yield mesh
