"""Export a quantized Llama-family model to the Hugging Face GPTQ layout (AutoGPTQ / GPTQModel /
transformers ``quant_method: gptq``).

For every quantized linear ``model.layers.{i}.{self_attn|mlp}.{name}`` the directory holds, in
``model.safetensors``::

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

Everything not quantized (embeddings, norms, dense linears) is written as float16 with its HF name,
next to ``config.json`` (the model config plus ``quantization_config``) and ``tokenizer.json``.

A tensor with non-finite values (inf/nan) or values beyond the float16 range is refused (``ValueError``
naming it) before anything is written. The directory carries the ``.lowbit-output.json`` marker of kind
``export-gptq`` and replaces an existing directory only as :func:`lowbit.io.outputs.prepare_output_dir`
allows.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from lowbit.io.checkpoint import atomic_directory
from lowbit.io.outputs import prepare_output_dir
from lowbit.core.pack import pack, unpack
from lowbit.core.qtensor import QuantizedTensor
from lowbit.core.quantizers import scale_table
from lowbit.core.transforms import flatten

__all__ = ["export_gptq", "hf_config", "EXPORTABLE_BITS", "KIND"]

EXPORTABLE_BITS = (2, 3, 4, 8)
KIND = "export-gptq"  # the kind of output directory (lowbit.io.outputs)


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


def _gptq_tensors(q: QuantizedTensor, path: str, checkpoint_format: str) -> dict[str, np.ndarray]:
    if q.format != "int" or q.bits not in EXPORTABLE_BITS or q.per_tensor or isinstance(q.scales, tuple):
        raise ValueError(f"params[{path!r}]: {q} cannot be exported as GPTQ (needs format 'int', bits in "
                         f"{EXPORTABLE_BITS}, group-wise or per-channel scales, no double quantization)")
    if q.col_scale is not None:
        raise ValueError(f"params[{path!r}]: has per-column scales (AWQ/OneBit); fold them first")
    rows, cols = q.shape
    bits, g = q.bits, q.group_size
    codes = np.asarray(unpack(q.data, bits, cols))                     # (out, in) stored column order
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
    if q.zeros is None:
        zeros = np.full(scales.shape, 2 ** (bits - 1), np.int64)
    else:
        zeros = np.asarray(unpack(q.zeros, bits, q.n_groups)).astype(np.int64)
    if checkpoint_format == "gptq":
        if (zeros == 0).any():
            raise ValueError(f"params[{path!r}]: {int((zeros == 0).sum())} zero points are 0, which the GPTQ v1 "
                             "format (stores zero - 1) cannot hold; export with checkpoint_format='gptq_v2'")
        zeros = zeros - 1
    for name, n in (("in_features", cols), ("out_features", rows)):
        if n * bits % 32:
            raise ValueError(f"params[{path!r}]: {name}={n} * bits={bits} is not a multiple of 32 (GPTQ packs int32 words)")
    qweight = np.asarray(pack(codes, bits)).T.view(np.int32)           # (in * bits / 32, out)
    qzeros = np.asarray(pack(zeros.T, bits)).view(np.int32)            # (n_groups, out * bits / 32)
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
    from safetensors.numpy import save_file

    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format={checkpoint_format!r}: expected 'gptq' or 'gptq_v2'")
    path = prepare_output_dir(path, KIND, overwrite, name="output directory")
    flat = flatten(params)
    qts = {p: v for p, v in flat.items() if isinstance(v, QuantizedTensor)}
    if not qts:
        raise ValueError("params: nothing is quantized; GPTQ export needs QuantizedTensor linears")
    dense_linears = [p for p, v in flat.items() if p.startswith("layers/") and p.endswith("_proj")
                     and not isinstance(v, QuantizedTensor)]
    if dense_linears:
        raise ValueError(f"params: GPTQ checkpoints quantize every linear of the blocks; these are dense: "
                         f"{dense_linears[:4]}{'...' if len(dense_linears) > 4 else ''}")
    tensors: dict[str, np.ndarray] = {}
    for p, v in flat.items():
        name = _hf_name(p)
        if isinstance(v, QuantizedTensor):
            for k, arr in _gptq_tensors(v, p, checkpoint_format).items():
                tensors[f"{name}.{k}"] = arr
        else:
            suffix = "bias" if p.endswith("_bias") else "weight"
            tensors[f"{name}.{suffix}"] = _float16(np.asarray(jnp.asarray(v, jnp.float32)), f"{name}.{suffix}")
    config = hf_config(cfg)
    config["quantization_config"] = _quant_config(qts, checkpoint_format, extra_config or {})

    with atomic_directory(path, KIND, overwrite=overwrite) as tmp:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, "quantize_config.json"), "w") as f:  # AutoGPTQ reads this file
            json.dump(config["quantization_config"], f, indent=2)
        if tokenizer is not None:
            with open(os.path.join(tmp, "tokenizer.json"), "w") as f:  # the HF tokenizers format
                f.write(tokenizer.tk.to_str())
    return path
