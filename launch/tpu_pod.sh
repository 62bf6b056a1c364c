#!/usr/bin/env bash
# TPU pod launcher: the same command on every worker of a TPU VM slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE --gin_file=gin/experiments/bert4rec_beauty.gin \
#     --gin.MODEL_DIR=gs://bucket/runs/b4r --gin.COMPUTE_DTYPE="'bfloat16'"
#
# Every worker runs `recjax train ...`; jax.distributed.initialize() discovers the pod
# from the TPU metadata, so no addresses are passed. The repository must already be
# installed on every worker (e.g. `make install` run through the same --worker=all ssh).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE [recjax train arguments...]" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
COMMAND=${RECJAX_COMMAND:-train}
ARGS=$(printf ' %q' "$@")
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
  --command "cd ~/recjax && RECJAX_DISTRIBUTED=auto .venv/bin/recjax $COMMAND$ARGS"
