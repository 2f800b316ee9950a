"""Same inputs on the same machine give the same bits, for every registered method: two fresh
processes (each compiling its own programs) quantize the tiny model with every method on the same
calibration windows, and every stored array of every result is identical."""

import json
import os
import subprocess
import sys

_CHILD = r"""
import hashlib, json, sys
import jax, numpy as np
import lowbit
from lowbit import methods, pipeline
from lowbit.pipeline import CalibCfg, MethodCfg, QuantCfg

params, cfg, tok = pipeline.load(sys.argv[1])
calib = CalibCfg(data=sys.argv[2], nsamples=8, seqlen=32, batch_size=4)
windows, _ = pipeline.calibration_data(calib, params, cfg, tok, seed=1)
rows = {
    "rtn": MethodCfg(name="a", method="rtn", quant=QuantCfg(bits=3, group_size=32)),
    "gptq": MethodCfg(name="b", method="gptq", quant=QuantCfg(bits=3, group_size=32)),
    "gptq-act-order-windows": MethodCfg(name="c", method="gptq", quant=QuantCfg(bits=3, group_size=32),
                                        options=methods.get("gptq").options(act_order=True, hessian="windows")),
    "awq": MethodCfg(name="d", method="awq", quant=QuantCfg(bits=3, group_size=32)),
    "awq-gptq": MethodCfg(name="e", method="awq", quant=QuantCfg(bits=3, group_size=32),
                          options=methods.get("awq").options(then="gptq")),
    "llm_int8": MethodCfg(name="f", method="llm_int8", quant=QuantCfg(bits=8, group_size=None)),
    "onebit": MethodCfg(name="g", method="onebit", quant=QuantCfg(bits=1, format="onebit", group_size=None)),
}
out = {}
for name, row in rows.items():
    q, report = pipeline.quantize(params, cfg, row, windows, calib, progress=False)
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(q):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(str((a.dtype, a.shape)).encode()); h.update(a.tobytes())
    out[name] = [h.hexdigest(), [r.get("rel_out_err") for r in report]]
print(json.dumps(out))
"""


def test_every_method_gives_the_same_bits_in_two_processes(tiny_experiment):
    root, _ = tiny_experiment
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LOWBIT_CRASH_AT")}
    env["JAX_PLATFORMS"] = "cpu"
    outs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", _CHILD, str(root / "model"), str(root / "corpus.txt")],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    from lowbit import methods

    builtin = {n for n, m in methods.METHODS.items() if m.quantizes and m.factory.__module__.startswith("lowbit.")}
    assert builtin <= {k.split("-")[0] for k in outs[0]}, "a new built-in method needs a row here"
    assert outs[0] == outs[1]
