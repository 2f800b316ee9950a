"""The method registry: adding a method is one module (here: this file) and its tests.

The toy methods below are the whole "diff" a researcher writes. ``toy_best_grid``: an options
dataclass and a Transform factory registered by name; configs, ``lowbit run`` and ``lowbit quantize
--method`` then know it. ``toy_signscale``, a *trained* method: its own weight node (registered
kind and matmul: checkpoints and ``lowbit.ops.linear`` know it), a ``finalize`` hook (its stored
form) and a ``training`` hook (``distill: true`` rows train it from the float model); ``lowbit run``
trains, evaluates, sizes and saves it without a line of lowbit changed.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from lowbit import QuantSpec, dequantize, methods, ops, quantize
from lowbit.core.nodes import register_node
from lowbit.core.qtensor import QuantizedMatrix
from lowbit.core.transforms import Transform
from lowbit.methods.registry import Training, register


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


# ------------------------------------------------------------------ a trained toy method (the whole diff)

@jax.custom_vjp
def _sign(w):
    return jnp.where(w >= 0, 1.0, -1.0)


_sign.defvjp(lambda w: (_sign(w), None), lambda _, g: (g,))   # straight through


@dataclasses.dataclass(frozen=True)
class SignScaleWeight(QuantizedMatrix):
    """``W ~ sign(w) * s[:, None]``: latent ``w (out, in)`` and one scale per row ``s (out,)``; the
    stored form (``stored``) keeps ``sign(w)`` as int8 and ``s`` in float16."""
    w: jax.Array
    s: jax.Array
    stored: bool = False

    @property
    def shape(self):
        return tuple(int(d) for d in self.w.shape[-2:])

    def dense(self):
        signs = self.w.astype(jnp.float32) if self.stored else _sign(self.w.astype(jnp.float32))
        return signs * self.s.astype(jnp.float32)[:, None]

    def describe(self):
        return dict(format="toy_signscale", bits=1, group_size=self.shape[1], act_order=False,
                    bits_per_param=8.0 + 16.0 / self.shape[1] if self.stored else 32.0 + 32.0 / self.shape[1])

    def ckpt_fields(self):
        return {"w": self.w, "s": self.s}, {"stored": self.stored}

    @classmethod
    def from_ckpt(cls, fields, meta):
        return cls(fields["w"], fields["s"], bool(meta["stored"]))


jax.tree_util.register_dataclass(SignScaleWeight, data_fields=["w", "s"], meta_fields=["stored"])
register_node("toy_signscale", SignScaleWeight)
ops.register_matmul(SignScaleWeight, lambda x, w: jnp.einsum("...i,oi->...o", x, w.dense().astype(x.dtype)))


def _store(params, spec):
    """The finalize hook: every latent SignScaleWeight in its stored form."""
    def one(v):
        if isinstance(v, SignScaleWeight) and not v.stored:
            return SignScaleWeight(jnp.where(v.w >= 0, 1, -1).astype(jnp.int8), v.s.astype(jnp.float16), True)
        return v
    return jax.tree_util.tree_map(one, params, is_leaf=lambda v: isinstance(v, SignScaleWeight))


def _kd_loss(cfg, teacher_cfg, seqlen, n_layers, remat):
    from lowbit.train.losses import distill_loss

    return distill_loss(cfg, teacher_cfg, temperature=1.0, kl_weight=1.0, remat=remat)


def _optim(lr, warmup_steps):
    from lowbit.train.optim import OptimCfg

    return OptimCfg(lr=lr, warmup_steps=warmup_steps, schedule="constant", weight_decay=0.0)


def _count(params):
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda v: isinstance(v, SignScaleWeight))
    return sum(v.w.size + v.s.size for v in leaves if isinstance(v, SignScaleWeight))


@register("toy_signscale", help="sign(W) times a scale per row (mean |W|); distill: true trains both",
          data_free=True, finalize=_store,
          training=Training(trainable=lambda: r"_proj/(w|s)$", optim=_optim, loss=_kd_loss, count=_count))
def toy_signscale(spec: QuantSpec, opts) -> Transform:
    def apply(params, state):
        return {p: SignScaleWeight(jnp.asarray(w, jnp.float32), jnp.mean(jnp.abs(w), axis=1).astype(jnp.float32))
                for p, w in params.items()}, {}

    return Transform(init=lambda params: (), apply=apply)


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


def test_a_trained_method_runs_end_to_end_from_its_own_module(tiny_experiment, tmp_path):
    """``toy_signscale`` above is registered from this file only: a distill row trains it from the float
    model (its training hook), the row is evaluated and sized in its stored form (its finalize hook),
    its report comes from its node's ``describe()``, and the saved model loads back as that node."""
    from lowbit import data
    from lowbit.eval.likelihood import perplexity
    from lowbit.models.loaders import load_model
    from lowbit.runner.config import load_config
    from lowbit.runner.experiment import experiment_dir, run_experiment

    root, path = tiny_experiment
    conf = yaml.safe_load(open(path))
    corpus = conf["calib"]["data"]
    conf.update(experiment="toy_trained",
                distill={"data": corpus, "split": "calib", "steps": 8, "batch_size": 2, "seqlen": 32, "lr": 0.02,
                         "warmup_steps": 0, "save_every": 4, "save_model": True},
                methods=[{"name": "fp", "method": "fp"},
                         {"name": "toy-start", "method": "toy_signscale", "quant": {"bits": 1, "group_size": None}},
                         {"name": "toy-kd", "method": "toy_signscale", "quant": {"bits": 1, "group_size": None},
                          "distill": True}])
    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text(yaml.safe_dump(conf))
    cfg = load_config(str(cfg_path))
    run_experiment(cfg, results_dir=str(tmp_path / "res"), progress=False)
    d = experiment_dir(cfg, str(tmp_path / "res"))
    start, kd = (json.load(open(os.path.join(d, n, "metrics.json"))) for n in ("toy-start", "toy-kd"))
    rec = kd["distill"]
    n_linears = kd["size"]["n_quantized"]
    assert n_linears == 14 and start["size"]["n_quantized"] == 14
    assert rec["steps"] == 8 and rec["trainable_params"] > 0 and rec["data"] == corpus
    # stored form: int8 signs + float16 scales, whatever was trained
    assert kd["size"]["linear_bits_per_param"] == pytest.approx(start["size"]["linear_bits_per_param"])
    assert 8.0 < kd["size"]["linear_bits_per_param"] < 8.5
    # distillation from the float model moved the model towards it: its KL fell, its perplexity nears fp's
    from lowbit.train import read_metrics

    losses = [r["loss"] for r in read_metrics(os.path.join(d, "toy-kd", "train_metrics.csv"))]
    assert len(losses) == 8 and losses[-1] < losses[0]
    (ds,) = kd["eval"]
    fp = json.load(open(os.path.join(d, "fp", "metrics.json")))["eval"][ds]["ppl"]
    assert abs(kd["eval"][ds]["ppl"] - fp) < abs(start["eval"][ds]["ppl"] - fp)
    header = open(os.path.join(d, "toy-kd", "layers.csv")).read().splitlines()[0]
    assert "format" in header and "toy_signscale" in open(os.path.join(d, "toy-kd", "layers.csv")).read()
    # the saved model is the node, in its stored form, and gives the row's perplexity
    params, model_cfg, tok = load_model(os.path.join(d, "toy-kd", "model"))
    up = params["layers"][0]["mlp"]["up_proj"]
    assert isinstance(up, SignScaleWeight) and up.stored and up.w.dtype == np.int8
    win = data.eval_windows(tok.encode(data.corpus_text(ds, "eval")), kd["eval"][ds]["seqlen"], cfg.eval.max_windows)
    assert perplexity(params, model_cfg, win, batch_size=cfg.eval.batch_size, progress=False)["ppl"] == pytest.approx(
        kd["eval"][ds]["ppl"], rel=1e-5)
    # a method without a training stage cannot be a distill row
    bad = dict(conf, methods=[{"name": "x", "method": "toy_best_grid", "distill": True}])
    cfg_path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="has no training stage of its own"):
        load_config(str(cfg_path))
