"""Export a quantized Llama-family model to the Hugging Face layouts other engines read:

* **GPTQ** (:func:`export_gptq`; AutoGPTQ / GPTQModel / transformers / vLLM ``quant_method: gptq``),
  output kind ``export-gptq``;
* **AWQ GEMM** (:func:`export_awq`; AutoAWQ ``WQLinear_GEMM`` / transformers / vLLM
  ``quant_method: awq, version: gemm``), output kind ``export-awq``.

Both write ``model.safetensors``, ``config.json`` (the model config, :func:`hf_config`, plus
``quantization_config``) and ``tokenizer.json``. Everything not quantized (embeddings, norms, biases,
dense linears) is written as float16 with its HF name.

GPTQ
----
For every quantized linear ``model.layers.{i}.{self_attn|mlp}.{name}``::

    qweight  int32 (in_features * bits / 32, out_features)  codes packed along in_features
    qzeros   int32 (n_groups, out_features * bits / 32)     zero points packed along out_features
    scales   float16 (n_groups, out_features)
    g_idx    int32 (in_features,)                            group of each input feature

Packing is lowbit's own little-endian bitstream (:mod:`lowbit.core.pack`) applied to each *column* of
the code matrix: code ``j`` of a column occupies stream bits ``[j*bits, (j+1)*bits)``, which for 2,
4 and 8 bits is the usual "value j in bits ``bits*(j % (32/bits))``" and for 3 bits is AutoGPTQ's
32-codes-in-3-words layout. Codes are in the original input-feature order; with act-order
(``desc_act``) ``g_idx`` maps each feature to the group it was quantized in.

``checkpoint_format="gptq"`` (v1, what most engines read) stores ``zero - 1`` in ``qzeros`` and
readers add the 1 back; a zero point of 0 cannot be stored that way, so such a tensor is refused
with a message pointing at ``checkpoint_format="gptq_v2"`` (zeros stored as they are).
Dequantization: ``W[o, i] = scales[g_idx[i], o] * (code[i, o] - zero[g_idx[i], o])``.
``quantize_config.json`` (what AutoGPTQ reads) repeats ``quantization_config``.

AWQ (GEMM)
----------
Only 4-bit integer codes with a zero point per group of ``group_size`` input features, one group size
for every linear, no act-order permutation (there is no ``g_idx``), scales not double-quantized: in
lowbit terms ``QuantSpec(bits=4, group_size=G, symmetric=False)``. For every quantized linear::

    qweight  int32 (in_features, out_features / 8)      8 codes per word, packed along out_features
    qzeros   int32 (n_groups, out_features / 8)         zero points, packed the same way
    scales   float16 (n_groups, out_features)

Word ``k`` of a row holds output features ``8k .. 8k+7``, nibble ``n`` (bits ``4n .. 4n+3``) holding
feature ``8k + AWQ_ORDER[n]`` with ``AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)`` (AutoAWQ's
``WQLinear_GEMM.from_linear`` pack order; readers undo it with ``AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2,
6, 3, 7)``). Here that is lowbit's 4-bit bitstream (:func:`lowbit.core.pack.pack`) of each row after
the interleave. Zero points are stored as they are (0..15, no ``- 1``). Dequantization (AutoAWQ's
``dequantize_gemm``): ``W[o, i] = (code[i, o] - zero[i // G, o]) * scales[i // G, o]``.
``quantization_config`` is what AutoAWQ's ``AwqConfig.to_transformers_dict`` writes:
``{"quant_method": "awq", "zero_point": true, "group_size": G, "bits": 4, "version": "gemm",
"modules_to_not_convert": null}``. As in AutoAWQ, only the linears of the decoder blocks are quantized:
a quantized ``lm_head`` or embedding is refused (transformers and vLLM load them unquantized).

Scales
------
Both formats store float16 scales: lowbit's default ``scale_dtype="float16"`` exports exactly;
bfloat16 / float32 scales are rounded to float16 (the exported model then dequantizes with those
rounded scales, as AutoAWQ's own ``scales.half()`` does).

A tensor with non-finite values (inf/nan) or values beyond the float16 range is refused (``ValueError``
naming it) before anything is written. The directory carries the ``.lowbit-output.json`` marker of its
kind and replaces an existing directory only as :func:`lowbit.io.outputs.prepare_output_dir` allows;
it is written under a temporary name and renamed into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.io.checkpoint import atomic_directory
from lowbit.io.outputs import prepare_output_dir
from lowbit.core.pack import pack, unpack
from lowbit.core.qtensor import QuantizedTensor
from lowbit.core.quantizers import scale_table
from lowbit.core.transforms import flatten

__all__ = ["export_gptq", "export_awq", "hf_config", "EXPORTABLE_BITS", "KIND", "KIND_AWQ", "KINDS", "AWQ_ORDER"]

EXPORTABLE_BITS = (2, 3, 4, 8)  # GPTQ
KIND = "export-gptq"  # the kind of a GPTQ output directory (lowbit.io.outputs)
KIND_AWQ = "export-awq"  # the kind of an AWQ output directory
KINDS = {"gptq": KIND, "awq": KIND_AWQ}  # export format -> output kind
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble n of an AWQ word holds output feature 8k + AWQ_ORDER[n]
_AWQ_SUPPORTS = ("AutoAWQ's GEMM format holds 4-bit integer codes with a zero point per group of input features, "
                 "one group size for all linears, no act-order permutation: quantize with "
                 "QuantSpec(bits=4, group_size=G, symmetric=False), e.g. G=128")


# ----------------------------------------------------------------------------- shared (every HF format)


def _float16(a: np.ndarray, tensor: str) -> np.ndarray:
    """``a`` as float16, refusing inf/nan and values float16 cannot hold (they would become inf)."""
    a = np.asarray(a, np.float32)
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(f"params: tensor {tensor!r} has {int(bad.sum())} non-finite values (inf/nan); "
                         "refusing to export it")
    with np.errstate(over="ignore"):
        h = a.astype(np.float16)
    if not np.isfinite(h).all():
        raise ValueError(f"params: tensor {tensor!r} has values up to {float(np.abs(a).max()):.4g}, beyond the "
                         "float16 range (65504); refusing to export it")
    return h


def hf_config(cfg) -> dict:
    """HF ``config.json`` fields of a :class:`~lowbit.models.llama.LlamaConfig`."""
    if getattr(cfg, "rope_style", "half") != "half":  # HF rotates half-split q/k rows
        raise ValueError(f"cfg: rope_style={cfg.rope_style!r}, but HF models expect q/k rows in half-split order "
                         "(rope_style='half'); load the GGUF with unpermute_qk=True before exporting")
    if cfg.qk_norm and cfg.model_type != "qwen3":
        raise ValueError(f"cfg: qk_norm=True has no HF config for model_type={cfg.model_type!r} "
                         "(only 'qwen3' has q/k norms)")
    d = {
        "architectures": ["LlamaForCausalLM" if cfg.model_type == "llama" else
                          {"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "qwen3": "Qwen3ForCausalLM"}[cfg.model_type]],
        "model_type": cfg.model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
        "attention_bias": bool(cfg.o_bias), "torch_dtype": "float16",
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
    }
    if cfg.sliding_window is not None:
        d["sliding_window"] = cfg.sliding_window
    if cfg.rope_scaling == "linear":
        d["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
    elif cfg.rope_scaling == "llama3":
        d["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                             "low_freq_factor": cfg.rope_low_freq_factor,
                             "high_freq_factor": cfg.rope_high_freq_factor,
                             "original_max_position_embeddings": cfg.rope_original_max_position}
    return d


def _hf_name(path: str) -> str:
    """lowbit path -> HF tensor name prefix (without ``.weight``)."""
    if path in ("embed_tokens", "norm"):
        return f"model.{path}"
    if path == "lm_head":
        return "lm_head"
    if path.startswith("layers/"):
        name = "model." + path.replace("/", ".")
        for b in ("q", "k", "v", "o"):  # biases are separate leaves named *_bias in lowbit
            if name.endswith(f".{b}_bias"):
                return name[: -len("_bias")] + "_proj"
        return name
    raise ValueError(f"params: no HF name for path {path!r}")


def _quantized_linears(params, fmt: str) -> tuple[dict, dict[str, QuantizedTensor]]:
    """``(flat params, {path: QuantizedTensor})``; every linear of the blocks must be quantized."""
    flat = flatten(params)
    qts = {p: v for p, v in flat.items() if isinstance(v, QuantizedTensor)}
    if not qts:
        raise ValueError(f"params: nothing is quantized; {fmt} export needs QuantizedTensor linears")
    dense_linears = [p for p, v in flat.items() if p.startswith("layers/") and p.endswith("_proj")
                     and not isinstance(v, QuantizedTensor)]
    if dense_linears:
        raise ValueError(f"params: {fmt} checkpoints quantize every linear of the blocks; these are dense: "
                         f"{dense_linears[:4]}{'...' if len(dense_linears) > 4 else ''}")
    return flat, qts


def _hf_tensors(flat: dict, quantized: Callable[[QuantizedTensor, str], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """HF name -> array: ``quantized(q, path)``'s tensors under the linear's name, the rest as float16."""
    tensors: dict[str, np.ndarray] = {}
    for p, v in flat.items():
        name = _hf_name(p)
        if isinstance(v, QuantizedTensor):
            for k, arr in quantized(v, p).items():
                tensors[f"{name}.{k}"] = arr
        else:
            suffix = "bias" if p.endswith("_bias") else "weight"
            tensors[f"{name}.{suffix}"] = _float16(np.asarray(jnp.asarray(v, jnp.float32)), f"{name}.{suffix}")
    return tensors


def _write_hf_dir(path: str, kind: str, overwrite: bool, tensors: dict[str, np.ndarray], config: dict,
                  tokenizer=None, extra_json: dict[str, dict] | None = None) -> str:
    """Write ``model.safetensors``, ``config.json``, ``extra_json`` files and ``tokenizer.json`` atomically."""
    from safetensors.numpy import save_file

    with atomic_directory(path, kind, overwrite=overwrite) as tmp:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, obj in {"config.json": config, **(extra_json or {})}.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=2)
        if tokenizer is not None:
            with open(os.path.join(tmp, "tokenizer.json"), "w") as f:  # the HF tokenizers format
                f.write(tokenizer.tk.to_str())
    return path


_unpack = jax.jit(unpack, static_argnums=(1, 2))  # one compiled program per shape instead of many eager ops
_pack = jax.jit(pack, static_argnums=1)


def _int_codes(q: QuantizedTensor) -> tuple[np.ndarray, np.ndarray | None]:
    """``(codes (rows, cols), zeros (rows, n_groups) or None)`` as stored (unsigned integers)."""
    codes = np.asarray(_unpack(q.data, q.bits, q.shape[1]))
    zeros = None if q.zeros is None else np.asarray(_unpack(q.zeros, q.bits, q.n_groups))
    return codes, zeros


# ----------------------------------------------------------------------------- GPTQ


def _gptq_tensors(q: QuantizedTensor, path: str, checkpoint_format: str) -> dict[str, np.ndarray]:
    if q.format != "int" or q.bits not in EXPORTABLE_BITS or q.per_tensor or isinstance(q.scales, tuple):
        raise ValueError(f"params[{path!r}]: {q} cannot be exported as GPTQ (needs format 'int', bits in "
                         f"{EXPORTABLE_BITS}, group-wise or per-channel scales, no double quantization)")
    if q.col_scale is not None:
        raise ValueError(f"params[{path!r}]: has per-column scales (AWQ/OneBit); fold them first")
    rows, cols = q.shape
    bits, g = q.bits, q.group_size
    codes, zeros = _int_codes(q)                                       # (out, in) stored column order
    groups = np.arange(cols) // g                                      # group of each stored column
    if q.perm is not None:                                             # back to the original order
        perm = np.asarray(q.perm)
        orig = np.empty_like(codes)
        orig[:, perm] = codes
        codes = orig
        g_idx = np.empty(cols, np.int32)
        g_idx[perm] = groups
    else:
        g_idx = groups.astype(np.int32)
    scales = np.asarray(scale_table(q), np.float32)                   # (out, n_groups)
    if zeros is None:
        zeros = np.full(scales.shape, 2 ** (bits - 1), np.int64)
    else:
        zeros = zeros.astype(np.int64)
    if checkpoint_format == "gptq":
        if (zeros == 0).any():
            raise ValueError(f"params[{path!r}]: {int((zeros == 0).sum())} zero points are 0, which the GPTQ v1 "
                             "format (stores zero - 1) cannot hold; export with checkpoint_format='gptq_v2'")
        zeros = zeros - 1
    for name, n in (("in_features", cols), ("out_features", rows)):
        if n * bits % 32:
            raise ValueError(f"params[{path!r}]: {name}={n} * bits={bits} is not a multiple of 32 (GPTQ packs int32 words)")
    qweight = np.asarray(_pack(codes, bits)).T.view(np.int32)           # (in * bits / 32, out)
    qzeros = np.asarray(_pack(zeros.T, bits)).view(np.int32)            # (n_groups, out * bits / 32)
    return {"qweight": np.ascontiguousarray(qweight), "qzeros": qzeros,
            "scales": np.ascontiguousarray(_float16(scales.T, f"{_hf_name(path)}.scales")), "g_idx": g_idx}


def _quant_config(qts: dict[str, QuantizedTensor], checkpoint_format: str, extra: dict) -> dict:
    kinds = {(q.bits, q.zeros is None, q.perm is not None) for q in qts.values()}
    grouped = {q.group_size for q in qts.values() if q.group_size < q.shape[1]}
    whole = {q.shape[1] for q in qts.values() if q.group_size == q.shape[1]}  # one group per row
    if len(kinds) != 1 or len(grouped) > 1 or (grouped and whole and max(whole) > min(grouped)):
        found = sorted({(q.bits, q.group_size, q.zeros is None, q.perm is not None) for q in qts.values()})
        raise ValueError(f"params: a GPTQ checkpoint has one (bits, group_size, sym, desc_act) for all layers; "
                         f"found {found}")
    bits, sym, desc_act = kinds.pop()
    return {"quant_method": "gptq", "bits": bits, "group_size": grouped.pop() if grouped else -1, "sym": sym,
            "desc_act": desc_act, "checkpoint_format": checkpoint_format, "lm_head": "lm_head" in qts,
            "quantizer": ["lowbit"], **extra}


def export_gptq(path: str, params, cfg, tokenizer=None, *, checkpoint_format: str = "gptq",
                extra_config: dict | None = None, overwrite: bool = False) -> str:
    """Write ``params`` (block linears quantized to ``int`` 2/3/4/8 bits) as a HF GPTQ directory.

    ``extra_config`` is merged into ``quantization_config`` (e.g. ``damp_percent``,
    ``true_sequential``, ``static_groups``). The directory is written under a temporary name and
    renamed into place; an existing ``path`` is replaced only if it is a lowbit GPTQ export (or, with
    ``overwrite``, another lowbit output), never if it holds files lowbit did not write. Returns the path.
    """
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format={checkpoint_format!r}: expected 'gptq' or 'gptq_v2'")
    path = prepare_output_dir(path, KIND, overwrite, name="output directory")
    config = hf_config(cfg)
    flat, qts = _quantized_linears(params, "GPTQ")
    tensors = _hf_tensors(flat, lambda q, p: _gptq_tensors(q, p, checkpoint_format))
    config["quantization_config"] = _quant_config(qts, checkpoint_format, extra_config or {})
    return _write_hf_dir(path, KIND, overwrite, tensors, config, tokenizer,  # AutoGPTQ reads quantize_config.json
                         extra_json={"quantize_config.json": config["quantization_config"]})


# ----------------------------------------------------------------------------- AWQ (AutoAWQ GEMM)


def _awq_refusal(q: QuantizedTensor) -> str | None:
    """Why ``q`` has no AWQ GEMM form (``None`` when it has one)."""
    rows, cols = q.shape
    if q.format != "int":
        return f"format {q.format!r} is not an integer grid"
    if q.bits != 4:
        return f"bits={q.bits}, AWQ GEMM stores 4-bit codes only"
    if isinstance(q.scales, tuple):
        return "its scales are double-quantized"
    if q.zeros is None:
        return "it is symmetric (no stored zero points)"
    if q.per_tensor:
        return "it has one scale for the whole tensor"
    if q.perm is not None:
        return "it has an act-order permutation (desc_act), which AWQ cannot store (no g_idx)"
    if q.col_scale is not None:
        return "it has per-column scales; fold them into the preceding norm or linear first"
    if cols % q.group_size:
        return f"group_size={q.group_size} does not divide in_features={cols} (a partial last group)"
    if rows % 8:
        return f"out_features={rows} is not a multiple of 8 (AWQ packs 8 output features per int32)"
    return None


def _awq_interleave(a: np.ndarray) -> np.ndarray:
    """Reorder the last axis (a multiple of 8) so that position ``8k + n`` holds ``8k + AWQ_ORDER[n]``."""
    *lead, n = a.shape
    return a.reshape(*lead, n // 8, 8)[..., list(AWQ_ORDER)].reshape(*lead, n)


def _awq_tensors(q: QuantizedTensor, path: str) -> dict[str, np.ndarray]:
    why = _awq_refusal(q)
    if why is not None:
        raise ValueError(f"params[{path!r}]: {q} cannot be exported as AWQ: {why}. {_AWQ_SUPPORTS}")
    codes, zeros = _int_codes(q)                                            # (out, in), (out, n_groups)
    qweight = np.asarray(_pack(_awq_interleave(codes.T), 4)).view(np.int32)  # (in, out / 8)
    qzeros = np.asarray(_pack(_awq_interleave(zeros.T), 4)).view(np.int32)   # (n_groups, out / 8)
    scales = np.asarray(scale_table(q), np.float32).T                       # (n_groups, out)
    return {"qweight": np.ascontiguousarray(qweight), "qzeros": np.ascontiguousarray(qzeros),
            "scales": np.ascontiguousarray(_float16(scales, f"{_hf_name(path)}.scales"))}


def _awq_config(qts: dict[str, QuantizedTensor]) -> dict:
    by_size: dict[int, list[str]] = {}
    for p, q in qts.items():
        by_size.setdefault(q.group_size, []).append(p)
    if len(by_size) > 1:
        examples = "; ".join(
            f"params[{ps[0]!r}]: group_size={g}" + (" (its whole row: per-channel scales, group_size=None)"
                                                   if g == qts[ps[0]].shape[1] else "")
            for g, ps in sorted(by_size.items()))
        raise ValueError(f"params: an AWQ checkpoint has one group_size for all linears; found {examples}. "
                         f"{_AWQ_SUPPORTS}")
    (group_size,) = by_size
    return {"quant_method": "awq", "zero_point": True, "group_size": group_size, "bits": 4, "version": "gemm",
            "modules_to_not_convert": None}


def export_awq(path: str, params, cfg, tokenizer=None, *, overwrite: bool = False) -> str:
    """Write ``params`` as an AutoAWQ GEMM directory (``quant_method: awq``, ``version: gemm``).

    Every linear of the decoder blocks must be a 4-bit asymmetric group-wise ``int`` QuantizedTensor
    with one group size for all of them (``QuantSpec(bits=4, group_size=G, symmetric=False)``, no
    act-order, no double quantization); embeddings and ``lm_head`` must be dense. Anything else is a
    ``ValueError`` naming the tensor, raised before anything is written. Output directory rules as
    :func:`export_gptq` (kind ``export-awq``). Returns the path.
    """
    path = prepare_output_dir(path, KIND_AWQ, overwrite, name="output directory")
    config = hf_config(cfg)
    flat, qts = _quantized_linears(params, "AWQ")
    for p in qts:
        if not (p.startswith("layers/") and p.endswith("_proj")):
            raise ValueError(f"params[{p!r}]: is quantized, but AWQ checkpoints quantize only the linears of the "
                             f"decoder blocks (transformers and vLLM load {_hf_name(p)!r} unquantized); keep it "
                             "dense (lowbit.calib.driver.default_recipe does)")
    tensors = _hf_tensors(flat, _awq_tensors)
    config["quantization_config"] = _awq_config(qts)
    return _write_hf_dir(path, KIND_AWQ, overwrite, tensors, config, tokenizer)
