#!/usr/bin/env bash
# A lowbit batch job on a TPU pod slice (v5e-64 = 16 hosts x 4 chips). NOT RUN HERE: no TPU is
# reachable from the machines this project is developed and tested on; the commands follow Google
# Cloud's queued-resource workflow and have been checked for syntax only (bash -n).
#
#   PROJECT=my-project ZONE=us-west4-a NAME=lowbit-v5e CONFIG=configs/gptq_smollm2.yaml \
#     bash experiments/tpu_pod.sh
#
# Every worker runs the same `lowbit run --distributed`: jax.distributed.initialize() detects the
# slice's coordinator by itself, each process places only its share of every batch, and only worker 0
# writes results. With RESULTS=gs://bucket/path (the default when BUCKET is set) worker 0 uploads every
# committed layer and row there (lowbit.io.remote; gcsfs is installed on the workers), and a
# preempted slice -- or a new one -- resumes from the bucket: every worker downloads the finished rows
# and the interrupted row's per-layer checkpoints before it starts. Without a bucket, results/ stays
# on worker 0 and is copied back at the end.
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}"
NAME=${NAME:-lowbit-v5e}
TYPE=${TYPE:-v5litepod-64}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite}
CONFIG=${CONFIG:-configs/gptq_smollm2.yaml}
REPO=${REPO:-https://github.com/lowbit-project/lowbit.git}
REF=${REF:-main}
RESULTS=${RESULTS:-${BUCKET:+gs://$BUCKET/lowbit-results}}
RESULTS=${RESULTS:-results}

if ! gcloud compute tpus queued-resources describe "$NAME" --project "$PROJECT" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus queued-resources create "$NAME" --node-id "$NAME" --project "$PROJECT" --zone "$ZONE" \
    --accelerator-type "$TYPE" --runtime-version "$RUNTIME"
fi
until gcloud compute tpus queued-resources describe "$NAME" --project "$PROJECT" --zone "$ZONE" \
    --format 'value(state.state)' | grep -q ACTIVE; do
  echo "waiting for $NAME to become ACTIVE ..."; sleep 30
done

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$NAME" --project "$PROJECT" --zone "$ZONE" --worker=all --command "$1"
}
ssh_all "set -e; [ -d lowbit ] || git clone -q $REPO lowbit; cd lowbit && git fetch -q && git checkout -q $REF
         python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu,gcs]'"
ssh_all "cd lowbit && .venv/bin/lowbit run $CONFIG --distributed --results $RESULTS --no-progress"
if [[ $RESULTS == gs://* ]]; then
  echo "results in $RESULTS (gcloud storage cp -r $RESULTS ./results-tpu)"
else
  gcloud compute tpus tpu-vm scp --recurse "$NAME:~/lowbit/results" ./results-tpu --worker=0 \
    --project "$PROJECT" --zone "$ZONE"
  echo "results of worker 0 in ./results-tpu"
fi
echo "delete the slice with:"
echo "  gcloud compute tpus queued-resources delete $NAME --project $PROJECT --zone $ZONE --force --async"
