#!/usr/bin/env bash
# The allocations of configs/bitalloc_smollm2.yaml (issue "learned bit allocation"): every recipe
# that config's rows quantize with, one command each.
#
#   bash experiments/bitalloc_smollm2.sh [SIZE:GROUP ...]     # default: 3:128 2:64 4:128
#
# SIZE:GROUP: the budget is the exact size of uniform SIZE-bit weights in groups of GROUP (e.g. 2:64
# = uniform GPTQ w2g64's bytes); the candidates are int 2, 3, 4, 8 bits in groups of GROUP,
# asymmetric (and 1 bit at SIZE 2: without a candidate below the budget's width, the only
# allocation that fits is the uniform one); the rows re-quantize with GPTQ at the chosen widths. Cost: KL from the float model on
# 16 Brown calibration windows of 256 tokens (seed 0). Recipes per size:
#   learned-kl        whole linears, round-to-nearest candidate weights
#   learned-kl-gptq   whole linears, GPTQ candidate weights (GPTQ at each width on the same windows)
#   learned-kl-block  blocks of 128 input columns (a width per column group; BLOCKS=0 skips both
#   learned-kl-gptq-block   block runs), with round-to-nearest / GPTQ candidate weights
#   hawq              Hutchinson traces (64 probes) x error, knapsack
#   higgs             noise sensitivities (1 draw per linear; HIGGS=0 skips it) x error, DP
# Rerunning resumes: learned runs from their checkpoints in $RUNS, and the baselines reuse
# their sensitivities (HAWQ traces, HIGGS alphas: of the float model, measured once for every
# budget and group size).
#
#   bash experiments/bitalloc_smollm2.sh task               # the task-aware pair, at w3g128's bytes
#
# learns the allocation with cross-entropy on Brown vs on Austen calibration windows (16 x 256 each;
# GPTQ candidate weights calibrated on the same windows).
#
#   bash experiments/bitalloc_smollm2.sh hard               # learned-kl-gptq-hard-{w3,w2g64,w4}
#
# the straight-through hard-sample variant (Gumbel samples forward, soft gradients) of
# learned-kl-gptq-*, same budgets, candidates and cost, at the bytes of w3g128, w2g64 and w4g128.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=configs/recipes/bitalloc
RUNS=${RUNS:-.alloc-runs}
STEPS=${STEPS:-60}
mkdir -p "$OUT" "$RUNS"
common=(--bits 2,3,4,8 --cost kl --calib brown --nsamples 16 --seqlen 256 --batch-size 4 --no-progress)
# FILL=0: no gradient fill of the bytes a learned discretization leaves unused (the learned recipes
# allocated before the fill existed: every one whose .json has no "filled")
[ "${FILL:-1}" = 1 ] || common+=(--fill-batches 0)
for sg in "${@:-3:128 2:64 4:128}"; do
  for x in $sg; do
    if [ "$x" = hard ]; then
      for name in w3 w2g64 w4; do
        s=${name:1:1}; g=128; bits=2,3,4,8
        [ "$name" != w2g64 ] || { g=64; bits=1,2,3,4,8; }
        lowbit allocate --kind learned --candidates gptq --hard --group-size $g --budget-like $s --steps "$STEPS" \
            --run-dir "$RUNS/learned-kl-gptq-hard-$name" "${common[@]}" --bits $bits \
            --out "$OUT/learned-kl-gptq-hard-$name.yaml"
      done
      continue
    fi
    if [ "$x" = task ]; then
      for corpus in brown austen; do
        lowbit allocate --kind learned --candidates gptq --group-size 128 --budget-like 3 --steps "$STEPS" \
            --run-dir "$RUNS/learned-ce-gptq-$corpus-w3" "${common[@]}" --cost ce --calib $corpus \
            --out "$OUT/learned-ce-gptq-$corpus-w3.yaml"
      done
      continue
    fi
    s=${x%%:*}; g=${x##*:}
    bits=2,3,4,8; [ "$s" -gt 2 ] || bits=1,2,3,4,8
    name=w$s; [ "$g" = 128 ] || name=w${s}g$g
    lowbit allocate --kind learned --group-size "$g" --budget-like "$s" --steps "$STEPS" \
        --run-dir "$RUNS/learned-kl-$name" "${common[@]}" --bits $bits --out "$OUT/learned-kl-$name.yaml"
    lowbit allocate --kind learned --candidates gptq --group-size "$g" --budget-like "$s" --steps "$STEPS" \
        --run-dir "$RUNS/learned-kl-gptq-$name" "${common[@]}" --bits $bits --out "$OUT/learned-kl-gptq-$name.yaml"
    lowbit allocate --kind hawq --samples 64 --group-size "$g" --budget-like "$s" --run-dir "$RUNS/hawq" \
        "${common[@]}" --bits $bits --out "$OUT/hawq-$name.yaml"
    if [ "${HIGGS:-1}" = 1 ]; then
      lowbit allocate --kind higgs --samples 1 --group-size "$g" --budget-like "$s" --run-dir "$RUNS/higgs" \
          "${common[@]}" --bits $bits --out "$OUT/higgs-$name.yaml"
    fi
    [ "${BLOCKS:-1}" = 1 ] || continue
    lowbit allocate --kind learned --block 128 --group-size "$g" --budget-like "$s" --steps "$STEPS" \
        --run-dir "$RUNS/learned-kl-block-$name" "${common[@]}" --bits $bits --out "$OUT/learned-kl-block-$name.yaml"
    lowbit allocate --kind learned --candidates gptq --block 128 --group-size "$g" --budget-like "$s" \
        --steps "$STEPS" --run-dir "$RUNS/learned-kl-gptq-block-$name" "${common[@]}" --bits $bits \
        --out "$OUT/learned-kl-gptq-block-$name.yaml"
  done
done
