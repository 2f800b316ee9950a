#!/usr/bin/env bash
# The allocations of configs/bitalloc_smollm2.yaml (issue "learned bit allocation"): every recipe
# that config's rows quantize with, from one command each. Rerunning a learned allocation with the
# same arguments resumes from its --run-dir checkpoints.
#
#   bash experiments/bitalloc_smollm2.sh [SIZE ...]      # default sizes: 3 2 4 (uniform w<SIZE>g128's bytes)
#
# Candidates: int 2,3,4,8 bits, group 128, asymmetric (RTN candidate weights; the rows re-quantize
# with GPTQ at the chosen widths). Units: whole linears, and (learned-kl-block) blocks of 128 input
# columns (a width per column group). Cost: KL from the float model on 16 Brown calibration windows of
# 256 tokens (the task-aware pair: cross-entropy on Brown vs on Austen calibration windows).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=configs/recipes/bitalloc
RUNS=${RUNS:-.alloc-runs}
mkdir -p "$OUT" "$RUNS"
STEPS=${STEPS:-60}
common=(--bits 2,3,4,8 --group-size 128 --nsamples 16 --seqlen 256 --batch-size 4 --no-progress)
for size in "${@:-3 2 4}"; do
  for s in $size; do
    lowbit allocate --kind learned --budget-like "$s" --cost kl --calib brown --steps "$STEPS" \
        --run-dir "$RUNS/learned-kl-w$s" "${common[@]}" --out "$OUT/learned-kl-w$s.yaml"
    lowbit allocate --kind learned --block 128 --budget-like "$s" --cost kl --calib brown --steps "$STEPS" \
        --run-dir "$RUNS/learned-kl-block-w$s" "${common[@]}" --out "$OUT/learned-kl-block-w$s.yaml"
    lowbit allocate --kind hawq --budget-like "$s" --cost kl --calib brown "${common[@]}" --out "$OUT/hawq-w$s.yaml"
    lowbit allocate --kind higgs --budget-like "$s" --cost kl --calib brown "${common[@]}" --out "$OUT/higgs-w$s.yaml"
  done
done
