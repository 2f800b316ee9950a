"""GPTQ, the registered method ``gptq`` (Frantar, Ashkboos, Hoefler, Alistarh; ICLR 2023): the
algorithm's pure core is :mod:`lowbit.methods.gptq_core` (``quantize_weight(W, H, spec)``); this
module is its plumbing: :class:`GPTQOptions`, the :func:`gptq` Transform (running-mean Hessians of
the layer inputs as statistics; a block's solves spread one per device and process on a mesh,
:func:`lowbit.dist.spread`), and the registry entry with its hooks (per-group widths, the HF GPTQ
export fields).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lowbit import dist
from lowbit.core import transforms
from lowbit.core.checks import float_matrix, is_int, is_real
from lowbit.core.qtensor import QuantSpec
from lowbit.core.quantizers import check_scales
from lowbit.methods.gptq_core import (GPTQResult, HessianStat, fold, gram, gram_windows, hessian_update,  # noqa: F401
                                      inverse_hessian_upper, quantize_weight, quantize_weight_mixed, solve)
from lowbit.methods.registry import register

#: how a batch's ``X^T X`` is summed (GPTQOptions.hessian)
HESSIAN_SUMS = {"batch": gram, "windows": gram_windows}

__all__ = ["GPTQOptions", "gptq", "GPTQResult", "HessianStat", "quantize_weight", "quantize_weight_mixed",
           "hessian_update", "inverse_hessian_upper"]


@dataclasses.dataclass(frozen=True)
class GPTQOptions:
    """Options of the ``gptq`` method (the reference's defaults). ``hessian``: how a batch's
    ``X^T X`` is summed: ``batch`` (one contraction over the batch's token rows: the reference's,
    fastest) or ``windows`` (window by window in a fixed pairwise order, :func:`~lowbit.methods.
    gptq_core.gram_windows`: the same bits on any data-parallel mesh, for ``windows x cols^2`` float32
    of memory per batch)."""
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    blocksize: int = 128
    hessian: str = "batch"

    #: options added after results were published: left out of a row's config hash at these values
    HASH_NEUTRAL = {"hessian": "batch"}

    def __post_init__(self):
        # Checked here so that a bad CLI flag or config value fails before any model is loaded.
        for name in ("act_order", "static_groups"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a bool")
        # damp: the fraction of mean(diag(H)) added to the diagonal (the reference's percdamp, 0.01);
        # AutoGPTQ / the exported quantize_config (damp_percent) require 0 < damp < 1.
        if not (is_real(self.damp) and math.isfinite(self.damp) and 0 < self.damp < 1):
            raise ValueError(f"damp={self.damp!r}: expected a finite fraction of mean(diag(H)) with "
                             f"0 < damp < 1 (typically 0.01)")
        if self.hessian not in HESSIAN_SUMS:
            raise ValueError(f"hessian={self.hessian!r}: expected one of {sorted(HESSIAN_SUMS)}")
        if not is_int(self.blocksize) or self.blocksize <= 0:
            raise ValueError(f"blocksize={self.blocksize!r}: expected a positive int (columns per lazy "
                             f"update block, typically 128)")


def _export_fields(record: dict) -> dict:
    """The GPTQ fields of an HF ``quantize_config.json`` from a checkpoint's ``extra["quantize"]``."""
    g = record.get("method", {}).get("gptq", {})
    return {"damp_percent": g.get("damp", 0.01), "static_groups": g.get("static_groups", False),
            "true_sequential": record.get("calib", {}).get("true_sequential", True)}


def _mixed(spec: QuantSpec, opts: GPTQOptions, widths: dict) -> transforms.Transform:
    return gptq(spec, **dataclasses.asdict(opts), widths=widths)


@register("gptq", options=GPTQOptions, help="GPTQ: Hessian-based error correction (Frantar et al. 2023)",
          mixed=_mixed, export=_export_fields)
def _gptq_method(spec: QuantSpec, opts: GPTQOptions) -> transforms.Transform:
    return gptq(spec, **dataclasses.asdict(opts))


def gptq(spec: QuantSpec, *, blocksize: int = 128, damp: float = 0.01, act_order: bool = False,
         static_groups: bool = False, zero_dead: bool = False, widths: dict | None = None,
         hessian: str = "batch") -> transforms.Transform:
    """GPTQ as a :class:`~lowbit.core.transforms.Transform`.

    ``init`` allocates a zero :class:`HessianStat` per 2-D weight, ``update`` folds in each weight's
    input activations (an input shared by several weights, e.g. q/k/v, is reduced once; sharing is
    detected by the arrays' identity within one ``update`` call) and hands them on unchanged, and
    ``apply`` runs :func:`quantize_weight`, returning per-weight metrics ``gptq_loss`` (the sum of
    :attr:`GPTQResult.losses`) and ``damp`` (the dampening used). ``apply`` is traceable.

    ``widths`` (path -> one bit width per column group): those paths are quantized by
    :func:`quantize_weight_mixed` into :class:`~lowbit.core.mixed.MixedWidthWeight` nodes.
    ``hessian``: ``batch`` or ``windows`` (:class:`GPTQOptions`).
    """
    if hessian not in HESSIAN_SUMS:
        raise ValueError(f"hessian={hessian!r}: expected one of {sorted(HESSIAN_SUMS)}")
    xtx_of = HESSIAN_SUMS[hessian]
    kw = dict(blocksize=blocksize, damp=damp, act_order=act_order, static_groups=static_groups,
              zero_dead=zero_dead)
    widths = widths or {}
    if widths and (act_order or static_groups):
        raise ValueError("gptq: widths per column group need act_order: false and static_groups: false (the groups "
                         "are the original column blocks the widths name)")

    def init(params):
        stats = {}
        for path, w in params.items():
            float_matrix(path, w, "gptq")
            stats[path] = HessianStat(jnp.zeros((w.shape[1], w.shape[1]), jnp.float32), jnp.float32(0))
        return stats

    def update(stats, acts, context=None):
        del context   # q/k/v (and gate/up) share one input: one X^T X for all
        return transforms.fold_inputs(stats, acts, xtx_of, fold, lambda stat: stat.H.shape[0]), acts

    def apply(params, stats):
        out, metrics = {}, {}
        for path in params:
            n = stats[path].n
            if not isinstance(n, jax.core.Tracer) and float(n) == 0:
                raise ValueError(f"params[{path!r}]: no calibration activations reached this weight; "
                                 "GPTQ needs update() with its inputs first")
        mesh = dist.current_mesh()
        leaves = jax.tree_util.tree_leaves((params, stats))
        # (weights split over processes by `model` stay one global solve: XLA's, on the shards)
        spread = (mesh is not None and (len(mesh.local_devices) > 1 or jax.process_count() > 1) and len(params) > 1
                  and not any(isinstance(x, jax.core.Tracer) for x in leaves)
                  and all(getattr(x, "is_fully_addressable", True) or x.sharding.is_fully_replicated for x in leaves))
        pending = {}
        if spread:   # the block's linears solved in parallel, one per device (and process), then replicated
            plain = {p: (w, stats[p].H) for p, w in params.items() if p not in widths}
            pending = dist.spread(lambda w, H: solve(w, H, spec, **kw), plain)   # errors name the path
        for path, w in params.items():
            stat = stats[path]
            try:
                if path in pending:
                    res = pending[path]
                    q, losses, damp_used = dist.replicate((res.q, res.losses, res.damp), mesh)
                    check_scales(q, w, spec, "W")
                elif path in widths:
                    q, losses, damp_used = quantize_weight_mixed(w, stat.H, spec, widths[path], blocksize=blocksize,
                                                                 damp=damp, zero_dead=zero_dead)
                else:
                    res = quantize_weight(w, stat.H, spec, **kw)
                    q, losses, damp_used = res.q, res.losses, res.damp
            except ValueError as e:
                raise ValueError(f"params[{path!r}]: {e}") from None
            out[path] = q
            metrics[path] = {"gptq_loss": jnp.sum(losses), "damp": damp_used}
        return out, metrics

    return transforms.Transform(init, update, apply)
