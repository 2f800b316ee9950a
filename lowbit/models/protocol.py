"""The architecture protocol: what the calibration driver, evaluation, generation and export need
from a model family, and nothing else.

A family (a module such as :mod:`lowbit.models.llama`) registers one :class:`Family`: pure functions
over its parameter pytree plus the static facts a method needs about the block structure::

    fam = family_of(cfg)                                   # by the config's class
    x = fam.embed_jit(params, tokens, cfg)                 # (B, T, D)
    for i, layer in enumerate(fam.layers(params)):
        kw = fam.layer_kwargs(cfg, i)                      # static per-layer options (e.g. sliding window)
        x, inputs = fam.block_jit(layer, x, cfg, capture=True, **kw)   # inputs[rel_path] of each linear
    logits = fam.head_jit(params, x, cfg)

Paths: ``params["layers"][i]`` is layer ``i``; a linear of a block has a relative path such as
``"self_attn/q_proj"`` (``fam.linears(cfg)``, in execution order) and the flat path
``f"layers/{i}/{rel}"``. ``fam.sequential_groups(cfg)`` is the true-sequential order (the inputs of
a group depend only on earlier groups); ``fam.producers(cfg)[rel]`` names what computes the input
of a linear (a norm weight, or another linear), i.e. where an equivalence scale ``x / s`` can be
folded (AWQ, SmoothQuant); ``None`` when nothing can take it (e.g. the input goes through a
non-linearity). ``fam.outside`` lists the weights outside the blocks (embeddings, lm_head);
``fam.head_inputs`` gives the final hidden states that ``lm_head`` multiplies. ``fam.scale_groups``
and ``fam.module_fn`` describe what AWQ's scale search needs (which linears share a producer, and
the sub-module whose output it compares); ``fam.norm_offset`` how a scale folds into a norm weight.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

__all__ = ["Family", "register_family", "family_of", "FAMILIES", "hidden_layerwise", "forward_layerwise",
           "check_tokens"]


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    #: relative paths of a block's linears, in execution order
    linears: Callable[[Any], tuple[str, ...]]
    #: groups of relative paths in true-sequential order
    sequential_groups: Callable[[Any], tuple[tuple[str, ...], ...]]
    #: rel path of a linear -> rel path of the weight that produces its input (or None)
    producers: Callable[[Any], Mapping[str, str | None]]
    #: flat paths of the weights outside the blocks
    outside: tuple[str, ...]
    #: ``embed_jit(params, tokens, cfg) -> x``; only ``params["embed_tokens"]`` (and what the family
    #: declares in ``embed_keys``) is read
    embed_jit: Callable
    #: ``block_jit(layer, x, cfg, *, capture=False, capture_upto=None, **layer_kwargs)``
    block_jit: Callable
    #: ``head_jit(head_params, x, cfg) -> float32 logits`` on the final hidden states
    head_jit: Callable
    #: ``head_inputs(head_params, x, cfg) -> inputs of lm_head`` (the final norm applied)
    head_inputs: Callable
    #: ``head_params(params, cfg) -> the subset of params head_jit reads``
    head_params: Callable
    #: ``block_with_cache(layer, x, cfg, cache, pos, **layer_kwargs) -> (x, cache)`` (generation)
    block_with_cache: Callable
    #: static keyword arguments of block ``i`` (``{}`` when every block is the same)
    layer_kwargs: Callable[[Any, int], dict] = lambda cfg, i: {}
    embed_keys: tuple[str, ...] = ("embed_tokens",)
    #: AWQ's scale groups: ``(producer, linears it feeds, sub-module name or None)`` (see
    #: :func:`lowbit.models.common.scale_groups`); empty: the family supports no equivalence scaling
    scale_groups: Callable[[Any], tuple] = lambda cfg: ()
    #: ``module_fn(layer, name, h, cfg, **layer_kwargs)``: a sub-module's output on its input ``h``
    module_fn: Callable | None = None
    #: RMSNorm weights are stored as ``w`` with the norm multiplying by ``norm_offset + w`` (Gemma: 1)
    norm_offset: float = 0.0

    def layers(self, params) -> list:
        return params["layers"]

    def embed_params(self, params) -> dict:
        return {k: params[k] for k in self.embed_keys}


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    if family.name in FAMILIES and FAMILIES[family.name] is not family:
        raise ValueError(f"model family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def family_of(cfg) -> Family:
    """The registered family whose config class ``cfg`` is an instance of."""
    for fam in FAMILIES.values():
        if isinstance(cfg, fam.config_cls):
            return fam
    raise ValueError(f"cfg: {type(cfg).__name__} is not the config of a registered model family "
                     f"(registered: {sorted(FAMILIES)}); see lowbit.models.protocol")


def check_tokens(tokens, cfg) -> None:
    """``tokens`` is a ``(batch, seq)`` array no longer than the model's context (clear errors)."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens: expected shape (batch, seq), got {tokens.shape}")
    if tokens.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"tokens: sequence length {tokens.shape[1]} exceeds the model's context "
                         f"max_position_embeddings={cfg.max_position_embeddings}")


def hidden_layerwise(params, tokens, cfg):
    """Final hidden states ``(B, T, D)`` (before the final norm) of any registered family, computed
    with one jitted call per layer instead of one program for the whole model: the same numbers as
    the family's ``forward``, but compiling a 30-layer model costs one layer's compilation."""
    import jax.numpy as jnp

    fam = family_of(cfg)
    tokens = jnp.asarray(tokens)
    check_tokens(tokens, cfg)
    x = fam.embed_jit(fam.embed_params(params), tokens, cfg)
    for i, layer in enumerate(fam.layers(params)):
        x = fam.block_jit(layer, x, cfg, **fam.layer_kwargs(cfg, i))
    return x


def forward_layerwise(params, tokens, cfg):
    """Logits of any registered family, executed layer by layer (see :func:`hidden_layerwise`)."""
    fam = family_of(cfg)
    return fam.head_jit(fam.head_params(params, cfg), hidden_layerwise(params, tokens, cfg), cfg)
