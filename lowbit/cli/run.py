"""``lowbit run``: an experiment config -> results (:mod:`lowbit.runner.experiment`): calibrate,
quantize, train, evaluate every row, then the table and the plot."""

from __future__ import annotations

import argparse
import os

from lowbit.cli.common import device_args, join, register


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment config (configs/*.yaml)")
    p.add_argument("--variant", default=None, help="a named variant of the config (e.g. smoke)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (dotted path, YAML value); repeatable")
    p.add_argument("--results", default="results",
                   help="results root (default results/); a URL such as gs://bucket/path runs in a local stage "
                        "($LOWBIT_STAGE_DIR) uploaded after every layer and row (fsspec; pip install gcsfs for gs://)")
    p.add_argument("--force", action="store_true", help="recompute runs that are up to date")
    p.add_argument("--no-progress", action="store_true")
    device_args(p)


def cmd_run(args: argparse.Namespace) -> int:
    import dataclasses

    from lowbit import dist
    from lowbit.runner.config import load_config
    from lowbit.runner.experiment import experiment_dir, run_experiment

    cfg = load_config(args.config, variant=args.variant, overrides=args.overrides)
    if args.mesh is not None:   # recorded in the run's config; run_experiment makes the mesh
        cfg = dataclasses.replace(cfg, mesh=dist.parse_mesh(args.mesh))
    join(args)
    try:
        run_experiment(cfg, results_dir=args.results, force=args.force, progress=not args.no_progress)
    except (RuntimeError, OSError) as e:
        import jax

        if jax.process_count() == 1:
            raise
        raise RuntimeError(f"process {jax.process_index()} of {jax.process_count()} failed ({type(e).__name__}: "
                           f"{str(e).strip()[:400]}); if another process died, rerun the same command on every "
                           "process: finished rows are kept and the interrupted quantization resumes from process 0's "
                           "last saved layer where every process can read it") from None
    if not dist.is_primary():
        return 0
    from lowbit.io.remote import is_remote

    where = (f"{args.results.rstrip('/')}/{os.path.basename(experiment_dir(cfg, '.'))}" if is_remote(args.results)
             else experiment_dir(cfg, args.results))
    print(f"results in {where} (table: summary.md, plot: ppl_vs_bits.png)")
    return 0


register("run", "run an experiment config: calibrate, quantize, evaluate, table + plot", _run_args, cmd_run)
