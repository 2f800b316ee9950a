"""What lets ``lowbit run`` resume: the per-layer checkpoints of a row being quantized
(``.partial-<row>-<hash>/layer_NNNN``: one layer's parameters and report rows in one atomic
directory with per-array checksums), the training checkpoints of a training row
(``.train-<row>-<hash>/``), the check that a finished row is up to date (its ``metrics.json`` carries
the row's config hash), and the removal of killed runs' temporaries."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil

from lowbit.faults import crash_point
from lowbit.io import checkpoint
from lowbit.pipeline import MethodCfg
from lowbit.runner.log import log

__all__ = ["partial_dir", "layer_dir", "save_layer", "load_partial", "train_dir", "clean_stray_temps", "up_to_date"]


def partial_dir(exp_dir: str, m: MethodCfg, h: str) -> str:
    return os.path.join(exp_dir, f".partial-{m.name}-{h}")


def layer_dir(pdir: str, i: int) -> str:
    return os.path.join(pdir, f"layer_{i:04d}")


def save_layer(pdir: str, i: int, layer, rows: list[dict]) -> None:
    """Commit one finished layer: its parameters and its report rows in ONE atomic directory (a
    kill at any point leaves the layer either complete or absent)."""
    checkpoint.save(layer_dir(pdir, i), layer, extra={"rows": rows})
    crash_point("run.layer-committed")


def load_partial(pdir: str, params, upto: int | None = None) -> tuple[dict, int, list[dict]]:
    """Plug the finished layers saved in ``pdir`` into ``params`` (at most ``upto`` of them).

    Returns (params, first missing layer, their report rows). A layer that fails to load (damaged
    file, checksum mismatch, written by an older lowbit) is discarded with a warning together with
    every later layer, and recomputed.
    """
    layers, rows = list(params["layers"]), []
    i = 0
    last = len(layers) if upto is None else min(upto, len(layers))
    while i < last and os.path.isdir(layer_dir(pdir, i)):
        try:
            layer = checkpoint.restore(layer_dir(pdir, i))
            layer_rows = checkpoint.read_extra(layer_dir(pdir, i)).get("rows")
            if not isinstance(layer_rows, list):
                raise checkpoint.CheckpointError(f"checkpoint {layer_dir(pdir, i)}: no report rows")
        except (checkpoint.CheckpointError, OSError, ValueError) as e:
            log(f"warning: discarding saved layers {i}.. of {pdir}: {e}; recomputing them")
            for j in range(i, len(layers)):
                shutil.rmtree(layer_dir(pdir, j), ignore_errors=True)
            break
        layers[i] = layer
        rows.extend(layer_rows)
        i += 1
    return {**params, "layers": layers}, i, rows


def train_dir(exp_dir: str, m: MethodCfg, h: str) -> str:
    return os.path.join(exp_dir, f".train-{m.name}-{h}")


def clean_stray_temps(exp_dir: str) -> None:
    """Remove the temporary files and directories that killed runs left behind (``.X.tmp-*``,
    ``X.tmp-*``); only called while holding the directory's lock, so none belongs to a live run."""
    pats = [os.path.join(exp_dir, p) for p in (".*.tmp-*", "*.tmp-*", ".partial-*/.*.tmp-*",
                                               ".partial-*/*.tmp-*", "*/.*.tmp-*", "*/*.tmp-*")]
    stray = sorted({p for pat in pats for p in glob.glob(pat)})
    for p in stray:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(p)
    if stray:
        log(f"removed {len(stray)} temporary file(s) left by an interrupted run in {exp_dir}")


def up_to_date(mf: str, h: str) -> bool:
    try:
        with open(mf) as f:
            return json.load(f).get("config_hash") == h
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as e:
        log(f"warning: {mf} is unreadable ({e}); recomputing that row")
        return False
