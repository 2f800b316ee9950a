"""LoRA adapters over any base weight (dense or quantized) and their merge: the QLoRA recipe.

::

    params = add_lora(params, rank=64, alpha=16.0, dropout=0.1, key=jax.random.key(0))  # every block linear
    cfg_bf16 = model_cfg.replace(dtype="bfloat16")
    tc = TrainCfg(steps=1000, trainable=trainable_regex(), compute_dtype="bfloat16", optim=qlora_optim(1000))
    res = train(params, model_cfg, tc, "runs/qlora", train_tokens=tokens,
                loss_fn=lora_loss(causal_lm_loss(cfg_bf16)))
    merged = merge_lora(res.params)          # dense float32 weights: base dequantized + scale * B @ A

**The node.** :class:`LoraWeight` replaces a linear weight ``W (out, in)`` of the params tree: its
children are the frozen ``base`` (a dense array, a :class:`~lowbit.core.qtensor.QuantizedTensor`
or a kernel-layout weight), the adapter matrices ``a (r, in)`` and ``b (out, r)`` and an optional
``dropout_key``; ``scale = alpha / r``, ``rank`` and the ``dropout`` rate are static. The model's
forward calls :func:`lowbit.ops.linear` on it, which computes (:mod:`lowbit.ops.dispatch`)::

    linear(x, w) = linear(x, w.base) + scale * ((dropout(x) @ a.T) @ b.T)

The base path is the one of the base alone (a QuantizedTensor stays packed in memory and is
dequantized on the fly inside the jitted step, or runs through the Pallas kernel), and the adapter
term is computed in the activation dtype (bf16 under ``compute_dtype="bfloat16"``). The paths of
the children are ``<linear path>/base``, ``/a``, ``/b``: :func:`trainable_regex` selects exactly the
``a`` / ``b`` leaves for :func:`lowbit.train.step.partition_params`, so the base (dense or
quantized), the embeddings and the norms stay frozen and no gradient is ever computed for them.

**Initialisation** (PEFT's default ``init_lora_weights=True``, from Microsoft's loralib): ``A`` as
``torch.nn.init.kaiming_uniform_(A, a=sqrt(5))``, the default init of an ``nn.Linear`` weight: with
gain ``sqrt(2 / (1 + a^2)) = sqrt(1/3)`` and fan-in ``in`` its bound is
``sqrt(3) * gain / sqrt(in) = 1 / sqrt(in)``, i.e. ``A ~ U(-1/sqrt(in), 1/sqrt(in))``; ``B = 0``, so
the adapted model starts exactly equal to its base.

**Dropout** (PEFT's ``lora_dropout``): inverted dropout on the adapter's input ``x`` only (the base
path sees the undropped ``x``), active only when a node carries a ``dropout_key``:
:func:`with_dropout` gives every node a fresh key for one step, :func:`lora_loss` does that inside
the training loss. Without a key (evaluation, generation, :func:`lowbit.eval.likelihood.perplexity`)
the adapter is deterministic. The key is transient: checkpoints never hold it.

**QLoRA defaults** (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", and its
reference code ``artidoro/qlora``: ``qlora.py`` defaults and ``scripts/finetune_guanaco_*.sh``):

* ``r = 64``, ``alpha = 16`` (``scale = 0.25``), adapters on *every* linear of the blocks (the
  paper's finding: adapters on all linear layers are needed to match full 16-bit fine-tuning;
  ``find_all_linear_names`` in ``qlora.py``, lm_head excluded);
* LoRA dropout: ``qlora.py``'s argument default is 0.0; the paper's runs use 0.1 for 7B / 13B and
  0.05 for 33B / 65B (:func:`qlora_dropout`). :func:`add_lora` defaults to 0.0 (no dropout, like
  ``qlora.py``; pass ``dropout=qlora_dropout(n_params)`` for the paper's setting);
* NF4 base with double quantization, block size 64, bf16 compute, norms in float32;
* optimizer (:func:`qlora_optim`): AdamW, ``lr = 2e-4`` (7B / 13B; 1e-4 for 33B / 65B), constant
  schedule after a linear warmup over 3% of the steps (``warmup_ratio=0.03``, as HF
  ``TrainingArguments``: ``ceil(0.03 * steps)`` steps), ``max_grad_norm = 0.3``, ``adam_beta2 =
  0.999`` (``b1 = 0.9``, ``eps = 1e-8``: the HF / optax defaults), ``weight_decay = 0.0``.

**Merging.** :func:`merge_lora` folds the adapters into *dequantized float* weights,
``W' = dequantize(base) + scale * B @ A``: exactly the function the adapted model computed (the
same logits up to float rounding), as a plain dense model. See its docstring for why merging into
the 4-bit base instead (re-quantizing ``W'`` onto the base's grid) loses the fine-tune.
``lowbit merge CHECKPOINT --out DIR [--requantize METHOD ...]`` does it on a saved model.

**Checkpoints.** :mod:`lowbit.io.checkpoint` stores LoraWeight nodes (base, a, b and the static
scale / rank / dropout). :func:`save_lora_model` / :func:`load_lora_model` are
:func:`lowbit.models.loaders.save_model` / ``load_checkpoint`` (whose shape check runs on the
bases of adapted linears); same directory layout and ``extra.json``, so ``lowbit eval --model DIR``
evaluates an adapter checkpoint as it is (the packed base plus the adapters).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.core.lora import LoraWeight, strip_lora
from lowbit.core.qtensor import QuantizedTensor
from lowbit.core.transforms import path_str
from lowbit.train.optim import OptimCfg
from lowbit.core.checks import is_arraylike, is_int, is_real

__all__ = ["LoraWeight", "add_lora", "lora_paths", "linear_paths", "trainable_regex", "with_dropout", "merge_lora",
           "strip_lora", "count_trainable", "lora_loss", "qlora_optim", "qlora_dropout", "save_lora_model",
           "load_lora_model", "DEFAULT_TARGETS", "QLORA_RANK", "QLORA_ALPHA", "QLORA_LR", "QLORA_WARMUP_RATIO",
           "QLORA_MAX_GRAD_NORM", "QLORA_B2"]

#: every linear of the blocks (``layers/<i>/.../*_proj``): the paper's all-linear adapters
DEFAULT_TARGETS = r"^layers/\d+/.*_proj$"

QLORA_RANK = 64
QLORA_ALPHA = 16.0
QLORA_LR = 2e-4               # 7B / 13B (1e-4 for 33B / 65B)
QLORA_WARMUP_RATIO = 0.03
QLORA_MAX_GRAD_NORM = 0.3
QLORA_B2 = 0.999

#: fold_in purpose of the dropout keys inside :func:`lora_loss` (the loss's own rng stays untouched)
_DROPOUT_PURPOSE = 0x10A


def _is_node(x) -> bool:
    return isinstance(x, (LoraWeight, QuantizedTensor))


def _is_lora(x) -> bool:
    return isinstance(x, LoraWeight)


def _flat(params) -> dict[str, Any]:
    """``{path: leaf}`` with LoraWeights and QuantizedTensors as leaves."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_node)
    return {path_str(kp): v for kp, v in leaves}


def _map_nodes(params, fn: Callable[[str, Any], Any]):
    """Rebuild ``params`` with ``fn(path, leaf)`` applied to every leaf (LoraWeight / QuantizedTensor
    nodes are leaves here)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_node)
    return jax.tree_util.tree_unflatten(treedef, [fn(path_str(kp), v) for kp, v in leaves])


#: names of 2-D parameters that are looked up, not multiplied (never a linear)
_EMBEDDINGS = ("embed_tokens",)


def _is_linear(path: str, leaf) -> bool:
    if path.rsplit("/", 1)[-1] in _EMBEDDINGS:
        return False
    if isinstance(leaf, QuantizedTensor):
        return True
    return (hasattr(leaf, "ndim") and leaf.ndim == 2 and hasattr(leaf, "dtype")
            and jnp.issubdtype(leaf.dtype, jnp.floating))


def linear_paths(params) -> list[str]:
    """Paths of the linear weights LoRA can adapt: 2-D float arrays and QuantizedTensors (not the
    embedding tables), in tree order, LoRA-adapted ones included."""
    return [p for p, v in _flat(params).items() if _is_lora(v) or _is_linear(p, v)]


def lora_paths(params) -> list[str]:
    """Paths of the :class:`LoraWeight` nodes of ``params``, in tree order."""
    return [p for p, v in _flat(params).items() if _is_lora(v)]


def _listing(paths: list[str], limit: int = 40) -> str:
    """The paths, compactly: ``layers/<i>/mlp/up_proj (i = 0..29)`` for a linear of every block."""
    groups: dict[str, list[int]] = {}
    for p in paths:
        m = re.match(r"^(.*?/)?(\d+)(/.*)$", p)
        key, idx = (f"{m.group(1) or ''}<i>{m.group(3)}", int(m.group(2))) if m else (p, -1)
        groups.setdefault(key, []).append(idx)
    items = []
    for key, idx in groups.items():
        if len(idx) == 1:
            items.append(key.replace("<i>", str(idx[0])) if idx[0] >= 0 else key)
        elif idx == list(range(idx[0], idx[-1] + 1)):
            items.append(f"{key} (i = {idx[0]}..{idx[-1]})")
        else:
            items.append(f"{key} (i in {idx})")
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _select(targets, candidates: list[str], all_linears: list[str]) -> list[str]:
    """The candidate paths ``targets`` selects (a regex searched in the path, or a collection of
    module names / exact paths, each of which must match)."""
    if isinstance(targets, str):
        try:
            rx = re.compile(targets)
        except re.error as e:
            raise ValueError(f"targets={targets!r}: not a valid regular expression ({e})") from None
        chosen = [p for p in candidates if rx.search(p)]
        if not chosen:
            raise ValueError(f"targets={targets!r} matches no linear weight of the params; the linear paths are: "
                             f"{_listing(all_linears)}")
        return chosen
    names = list(targets)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"targets={targets!r}: expected a regex or a non-empty list of module names / paths")
    unknown = [n for n in names if not any(p == n or p.endswith("/" + n) for p in candidates)]
    if unknown:
        raise ValueError(f"targets: unknown target modules {unknown}: no linear weight path is or ends with "
                         f"them; the linear paths are: {_listing(all_linears)}")
    return [p for p in candidates if any(p == n or p.endswith("/" + n) for n in names)]


def add_lora(params, *, rank: int = QLORA_RANK, alpha: float = QLORA_ALPHA, dropout: float = 0.0,
             targets: str | Iterable[str] = DEFAULT_TARGETS, key) -> Any:
    """Wrap every selected linear of ``params`` in a :class:`LoraWeight` (the rest is returned as is).

    Args:
      rank: ``r`` (>= 1, at most ``min(in, out)`` of every selected layer).
      alpha: LoRA's alpha (> 0); ``scale = alpha / rank``.
      dropout: rate of the dropout on the adapter's input, in ``[0, 1)`` (active only in training,
        :func:`lora_loss`).
      targets: a regex searched in each linear's path (default: every ``*_proj`` of the blocks), or a
        list of module names / paths in PEFT's ``target_modules`` style (``["q_proj", "v_proj"]``:
        every linear whose path ends with ``/q_proj`` or ``/v_proj``), each of which must match.
      key: a ``jax.random.key``; layer ``i`` (in tree order) draws its ``A`` from ``fold_in(key, i)``.

    ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (PEFT's kaiming-uniform(a=sqrt(5)) default), ``B = 0``, both
    float32. Raises a ValueError when ``targets`` selects nothing or names an unknown module (the
    message lists the linear paths), when a selected layer already has an adapter, and when ``rank``
    exceeds a selected layer's ``min(in, out)`` (naming the layer).
    """
    if not is_int(rank) or rank < 1:
        raise ValueError(f"rank={rank!r}: expected an int >= 1")
    if not is_real(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha={alpha!r}: expected a finite number > 0")
    if not is_real(dropout) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r}: expected a rate in [0, 1)")
    if key is None:
        raise ValueError("key: pass a jax.random.key for the adapters' initialisation")
    flat = _flat(params)
    all_linears = [p for p, v in flat.items() if _is_lora(v) or _is_linear(p, v)]
    chosen = _select(targets, all_linears, all_linears)
    again = [p for p in chosen if _is_lora(flat[p])]
    if again:
        raise ValueError(f"targets: {_listing(again, 5)} already have a LoRA adapter (merge_lora or strip_lora first)")
    for p in chosen:
        out, inp = flat[p].shape
        if rank > min(out, inp):
            raise ValueError(f"rank={rank} exceeds min(out, in) = {min(out, inp)} of layer {p!r} (shape "
                             f"{(out, inp)}); choose rank <= {min(out, inp)} or leave that layer out of targets")
    rank, scale = int(rank), float(alpha) / int(rank)
    index = {p: i for i, p in enumerate(chosen)}

    def wrap(path, w):
        if path not in index:
            return w
        out, inp = w.shape
        bound = 1.0 / math.sqrt(inp)
        a = jax.random.uniform(jax.random.fold_in(key, index[path]), (rank, inp), jnp.float32, -bound, bound)
        return LoraWeight(w, a, jnp.zeros((out, rank), jnp.float32), None, scale, rank, float(dropout))

    return _map_nodes(params, wrap)


def trainable_regex() -> str:
    """The ``trainable`` regex (:func:`~lowbit.train.step.partition_params`, ``TrainCfg.trainable``)
    selecting exactly the adapters' ``a`` / ``b`` leaves (paths ``<linear>/a``, ``<linear>/b``; any
    leaf named ``a`` or ``b`` matches: lowbit's model families have no other)."""
    return r"(^|/)(a|b)$"


def with_dropout(params, rng):
    """``params`` whose every :class:`LoraWeight` with a dropout rate > 0 carries its own key for
    this step (``fold_in(rng, i)`` for the ``i``-th node in tree order); nodes with rate 0 are left
    without a key. ``rng=None`` removes every key (deterministic adapters)."""
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=_is_lora)
    out, i = [], 0
    for v in leaves:
        if _is_lora(v):
            key = None if rng is None or v.dropout == 0 else jax.random.fold_in(rng, i)
            v = dataclasses.replace(v, dropout_key=key)
            i += 1
        out.append(v)
    return jax.tree_util.tree_unflatten(treedef, out)


def _dense_base(path: str, base, dtype=jnp.float32):
    if isinstance(base, QuantizedTensor):
        from lowbit.core.quantizers import dequantize

        return dequantize(base, dtype)
    if is_arraylike(base) and getattr(base, "ndim", 0) == 2:
        return jnp.asarray(base).astype(dtype)
    raise ValueError(f"{path}: cannot merge into a base of type {type(base).__name__} (a dense array or a "
                     "QuantizedTensor is needed; merge before lowbit.ops.kernel_format.prepare)")


def merge_lora(params, dtype=jnp.float32):
    """Fold every adapter into a dense float weight: ``dequantize(base) + scale * b @ a`` (computed
    in float32, returned in ``dtype``). The merged model computes the same function as the adapted
    one (equal logits up to float rounding); leaves that are not :class:`LoraWeight` are unchanged.

    Why dequantized float weights, and not the 4-bit base: the adapter was trained against the
    *dequantized* base, every weight of which sits exactly on a point of the 4-bit grid.
    Re-quantizing the merged weight with the base's spec rounds each weight to the nearest grid
    point, and wherever the update ``scale * b @ a`` is smaller than half a grid step (NF4 with
    blocks of 64: neighbouring levels are 0.08-0.3 x the block's absmax apart; a fine-tune
    typically moves a weight by far less) that is the code the weight already had. The update is
    erased (only the block scales move a little with the block's absmax), and the "merged" 4-bit
    model is the base model again, not the fine-tuned one: ``tests/test_lora.py`` measures that
    all but a few percent of the codes come back unchanged and that almost none of the fine-tune's
    loss improvement survives. (Merging into the *original* 16-bit weights instead of the
    dequantized ones is the other trap: the adapter then corrects a base it never saw.) Keep the
    merged float model, or re-quantize it knowingly (``lowbit merge --requantize``) and measure
    what is left.
    """
    def merge(path, v):
        if not _is_lora(v):
            return v
        w = _dense_base(path, v.base, jnp.float32)
        delta = jnp.asarray(v.b, jnp.float32) @ jnp.asarray(v.a, jnp.float32)
        return (w + jnp.float32(v.scale) * delta).astype(dtype)

    return _map_nodes(params, merge)


def count_trainable(params) -> int:
    """Number of adapter parameters (the elements of every ``a`` and ``b``)."""
    return int(sum(int(np.prod(v.a.shape)) + int(np.prod(v.b.shape))
                   for v in _flat(params).values() if _is_lora(v)))


@functools.lru_cache(maxsize=64)
def lora_loss(loss_fn: Callable) -> Callable:
    """A loss for :func:`lowbit.train.step.make_train_step` that gives every adapter its dropout key
    (:func:`with_dropout` with ``fold_in(rng, purpose)``) and then calls ``loss_fn(params, batch,
    rng, consts)`` (whose own ``rng`` stays the same). ``rng=None``: no dropout. Cached, so equal
    arguments share one compiled train step; ``config`` = ``{"name": "lora", "loss": loss_fn.config}``.

    Note: :func:`lowbit.train.step.make_eval_step` calls the loss with a fixed key, so the
    ``eval_loss`` of :func:`lowbit.train.loop.train` is computed *with* (fixed) dropout when the
    rate is > 0; evaluate with :func:`lowbit.eval.likelihood.perplexity` (no keys) for the
    deterministic model.
    """
    def loss(params, batch, rng=None, consts=None):
        if rng is not None:
            params = with_dropout(params, jax.random.fold_in(rng, _DROPOUT_PURPOSE))
        return loss_fn(params, batch, rng, consts)

    inner = getattr(loss_fn, "config", None) or {"name": getattr(loss_fn, "__qualname__", repr(loss_fn))}
    loss.config = {"name": "lora", "loss": inner}
    return loss


def qlora_optim(steps: int, *, lr: float = QLORA_LR) -> OptimCfg:
    """The QLoRA paper's optimizer for a run of ``steps`` optimizer steps: AdamW ``lr`` (2e-4 for
    7B / 13B, 1e-4 for 33B / 65B), linear warmup over ``ceil(0.03 * steps)`` steps (HF's
    ``warmup_ratio``), then constant; global-norm clipping at 0.3; ``b2 = 0.999``; no weight decay."""
    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps={steps!r}: expected a positive int")
    return OptimCfg(lr=lr, warmup_steps=math.ceil(QLORA_WARMUP_RATIO * int(steps)), schedule="constant",
                    clip_norm=QLORA_MAX_GRAD_NORM, b1=0.9, b2=QLORA_B2, eps=1e-8, weight_decay=0.0)


def qlora_dropout(n_params: float) -> float:
    """The paper's LoRA dropout for a model of ``n_params`` parameters: 0.1 up to 13B, 0.05 above."""
    return 0.1 if n_params <= 13.5e9 else 0.05


# ----------------------------------------------------------------------------- checkpoints

def save_lora_model(path: str, params, cfg, tokenizer, extra: dict | None = None, *,
                    extra_files: dict | None = None, overwrite: bool = False) -> str:
    """:func:`lowbit.models.loaders.save_model` for a params tree with :class:`LoraWeight` nodes (same
    directory layout and ``extra.json`` convention; the adapters are stored with their base, the
    dropout keys are not; the family's shape check runs on the bases)."""
    from lowbit.models.loaders import save_model

    return save_model(path, with_dropout(params, None), cfg, tokenizer, extra, extra_files=extra_files,
                      overwrite=overwrite)


def load_lora_model(path: str, *, dtype=None):
    """Read a model checkpoint that may hold :class:`LoraWeight` nodes -> ``(params, cfg, tokenizer)``
    (the counterpart of :func:`save_lora_model`; plain checkpoints load too, and
    :func:`lowbit.models.loaders.load_model` / ``lowbit eval`` read adapter checkpoints the same way).
    ``dtype`` casts the float leaves (bases and adapters), not QuantizedTensors."""
    from lowbit.models.loaders import load_checkpoint

    return load_checkpoint(path, dtype=dtype)
