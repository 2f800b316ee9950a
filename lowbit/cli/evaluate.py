"""``lowbit eval``: perplexity of a model on a text corpus (GPTQ protocol, :mod:`lowbit.eval.likelihood`),
with a JSON record of everything needed to reproduce it (model path + sha256, data name + split +
sha256 of the evaluated text, seqlen, windows, tokens, ppl, nll, versions, git SHA, device,
timings, peak RSS)."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

from lowbit.cli.common import device_args, devices, positive_int, register
from lowbit.io.records import environment_info, peak_rss_mb, sha256_text, write_json


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default), a .gguf file, an HF directory, a lowbit checkpoint "
                        "directory or a hub id")
    p.add_argument("--data", required=True, help="corpus name (brown, austen, wikitext2, ...) or a "
                                                 "local text file / directory (see lowbit.data.corpora)")
    p.add_argument("--split", default="eval", help="calib | eval | all (default: eval)")
    p.add_argument("--seqlen", type=positive_int, default=2048, help="window length in tokens (default 2048)")
    p.add_argument("--max-windows", type=positive_int, default=None, help="evaluate only the first K windows")
    p.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter / activation dtype (logits and log-softmax stay float32)")
    p.add_argument("--bos", action="store_true",
                   help="start every window with the BOS token (windows of seqlen-1 text tokens); needed by "
                        "models trained to always see BOS (Gemma). Default: the GPTQ protocol, no BOS")
    p.add_argument("--out", default=None, help="write the JSON record here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    device_args(p)


def cmd_eval(args: argparse.Namespace) -> int:
    with devices(args) as mesh:
        return _eval(args, mesh)


def _eval(args: argparse.Namespace, mesh) -> int:
    from lowbit import data, dist, pipeline
    from lowbit.eval.likelihood import perplexity
    from lowbit.io.outputs import prepare_output_file
    from lowbit.models.loaders import model_fingerprint

    t0 = time.perf_counter()
    if args.out:  # before the evaluation: a record that cannot be written is found out now
        prepare_output_file(args.out)
    text = data.corpus_text(args.data, args.split)  # a wrong data path or split fails before the model load
    t_text = time.perf_counter() - t0
    fp = model_fingerprint(args.model)
    params, cfg, tok = pipeline.load(args.model, dtype=args.dtype)
    if mesh is not None:   # windows split over data, linears by rows over model (as lowbit run)
        params = dist.shard_params(params, mesh)
    if tok is None:
        raise ValueError(f"model {args.model!r} has no tokenizer (tokenizer.json); cannot tokenize text")
    if args.seqlen > cfg.max_position_embeddings:
        raise ValueError(f"--seqlen {args.seqlen} exceeds the model's context "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    t_load = time.perf_counter() - t0 - t_text
    t1 = time.perf_counter()
    tokens = tok.encode(text)
    t_tok = time.perf_counter() - t1
    if args.bos and tok.bos_id is None:
        raise ValueError(f"--bos: the tokenizer of {args.model!r} has no BOS token")
    bos_id = tok.bos_id if args.bos else None
    windows = data.eval_windows(tokens, args.seqlen - args.bos, args.max_windows)
    res = perplexity(params, cfg, windows, batch_size=args.batch_size, progress=not args.no_progress,
                     desc=f"{os.path.basename(str(args.model))} {args.data}/{args.split}",
                     token_bytes=tok.token_bytes(), bos_id=bos_id)
    record = {
        "command": "eval", "argv": sys.argv[1:],
        "model": {"name_or_path": args.model, "kind": fp["kind"], "path": fp["path"],
                  "sha256": fp["sha256"], "dtype": args.dtype, "config": cfg.to_dict()},
        "data": {"name_or_path": args.data, "split": args.split, "text_sha256": sha256_text(text),
                 "n_chars": len(text), "n_tokens_total": int(len(tokens)),
                 "tokens_sha256": hashlib.sha256(tokens.astype("<i4").tobytes()).hexdigest()},
        "protocol": {"name": "gptq", "bos": bool(args.bos), "seqlen": res["seqlen"], "n_windows": res["n_windows"],
                     "max_windows": args.max_windows, "batch_size": args.batch_size,
                     "predicted_per_window": res["seqlen"] - 1},
        "ppl": res["ppl"], "nll": res["nll"], "bits_per_byte": res["bits_per_byte"], "n_bytes": res["n_bytes"],
        "n_tokens": res["n_tokens"], "top1_acc": res["top1_acc"],
        "timing": {"load_s": t_load, "tokenize_s": t_tok, "eval_wall_s": res["wall_s"],
                   "first_batch_s": res["first_batch_s"], "tokens_per_s": res["tokens_per_s"],
                   "tokens_per_s_steady": res["tokens_per_s_steady"],
                   "total_wall_s": time.perf_counter() - t0},
        "peak_rss_mb": peak_rss_mb(),
        "env": environment_info(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"{args.model} on {args.data}/{args.split}: ppl {res['ppl']:.4f} (nll {res['nll']:.5f}, "
          f"{res['bits_per_byte']:.4f} bits/byte) over "
          f"{res['n_windows']} windows x {res['seqlen']} tokens ({res['n_tokens']} predicted); "
          f"{res['tokens_per_s']:.0f} tok/s, {res['wall_s']:.1f} s, peak RSS {record['peak_rss_mb']:.0f} MiB")
    if args.out and dist.is_primary():
        write_json(args.out, record)
        print(f"wrote {args.out}")
    return 0


register("eval", "perplexity of a model on a text corpus (GPTQ protocol)", _eval_args, cmd_eval)
