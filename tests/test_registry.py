"""The method registry: adding a method is one module (here: this file) and its tests.

The toy method below is the whole "diff" a researcher writes: an options dataclass and a Transform
factory registered by name. Configs, ``lowbit run`` and ``lowbit quantize --method`` then know it.
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import pytest
import yaml

from lowbit import QuantSpec, dequantize, methods, quantize
from lowbit.core.transforms import Transform
from lowbit.methods.registry import register


# ------------------------------------------------------------------ the toy method (the whole diff)

@dataclasses.dataclass(frozen=True)
class BestGridOptions:
    group_sizes: tuple[int, ...] = (16, 32)


@register("toy_best_grid", options=BestGridOptions,
          help="RTN with the group size whose output error on the calibration inputs is lowest")
def toy_best_grid(spec: QuantSpec, opts: BestGridOptions) -> Transform:
    def init(params):                                     # statistics: X^T X per weight
        return {p: jnp.zeros((w.shape[1], w.shape[1])) for p, w in params.items()}

    def update(gram, acts, context=None):                 # fold a batch in; hand the inputs on
        return {p: g + jnp.einsum("...i,...j->ij", acts[p], acts[p]) if p in acts else g
                for p, g in gram.items()}, acts

    def apply(params, gram):   # picks a structure (group size) by value, so it runs eagerly, not under jit
        out, metrics = {}, {}
        for p, w in params.items():
            cands = [quantize(w, spec.replace(group_size=g)) for g in opts.group_sizes]
            errs = jnp.stack([jnp.trace((w - dequantize(q)) @ gram[p] @ (w - dequantize(q)).T) for q in cands])
            out[p] = cands[int(jnp.argmin(errs))]
            metrics[p] = {"output_sq_err": jnp.min(errs)}
        return out, metrics

    return Transform(init, update, apply)


# ------------------------------------------------------------------ its tests


def test_registered_method_is_known_to_configs_cli_and_help(tiny_experiment, tmp_path, capsys):
    from lowbit.cli import build_parser, main
    from lowbit.runner.config import load_config, to_dict

    assert "toy_best_grid" in methods.names()
    assert methods.get("toy_best_grid").options is BestGridOptions
    root, path = tiny_experiment
    conf = yaml.safe_load(open(path))
    conf["experiment"] = "toy"
    conf["methods"] = [{"name": "fp", "method": "fp"},
                       {"name": "toy-w3", "method": "toy_best_grid", "quant": {"bits": 3, "group_size": 32},
                        "toy_best_grid": {"group_sizes": [16, 64]}}]
    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text(yaml.safe_dump(conf))
    cfg = load_config(str(cfg_path))
    assert cfg.methods[1].options == BestGridOptions(group_sizes=(16, 64))
    assert to_dict(cfg.methods[1])["toy_best_grid"] == {"group_sizes": [16, 64]}
    # options of another method on this row, and unknown option keys, are errors naming the key
    bad = dict(conf, methods=[dict(conf["methods"][1], gptq={"act_order": True})])
    cfg_path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="gptq"):
        load_config(str(cfg_path))
    bad = dict(conf, methods=[dict(conf["methods"][1], toy_best_grid={"sizes": [1]})])
    cfg_path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="toy_best_grid.sizes"):
        load_config(str(cfg_path))
    # lowbit run: the row is quantized with the toy method and its metric lands in layers.csv
    cfg_path.write_text(yaml.safe_dump(conf))
    assert main(["run", str(cfg_path), "--results", str(tmp_path / "res"), "--no-progress"]) == 0
    d = tmp_path / "res" / "toy"
    m = json.loads((d / "toy-w3" / "metrics.json").read_text())
    assert m["method"] == "toy_best_grid" and m["size"]["n_quantized"] == 14
    header = (d / "toy-w3" / "layers.csv").read_text().splitlines()[0]
    assert "output_sq_err" in header
    # lowbit quantize --method / --help derive from the registry, options become flags
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["quantize"]
    method_action = next(a for a in sub._actions if a.dest == "method")
    assert "toy_best_grid" in method_action.choices and "fp" not in method_action.choices
    assert any(a.dest == "group_sizes" for a in sub._actions)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown; registered methods"):
        methods.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        register("gptq")(lambda spec, opts: None)
    with pytest.raises(ValueError, match="options must be a dataclass"):
        register("x_bad", options=dict)
    with pytest.raises(ValueError, match="options must be a GPTQOptions"):
        methods.build("gptq", QuantSpec(bits=4), BestGridOptions())
