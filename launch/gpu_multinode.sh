#!/usr/bin/env bash
# GPU multi-node launcher. Under SLURM (one task per node, or per GPU):
#
#   sbatch -N 4 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_multinode.sh \
#     --gin_file=gin/experiments/bert4rec_beauty.gin --gin.MODEL_DIR=/shared/runs/b4r
#
# jax.distributed.initialize() reads SLURM's environment (coordinator = first node).
# Without SLURM, set the three variables yourself on every node and run this script there:
#   RECJAX_COORDINATOR_ADDRESS=host0:12345 RECJAX_NUM_PROCESSES=4 RECJAX_PROCESS_ID=<0..3>
# MODEL_DIR must be on storage every node can reach (checkpoints are written collectively).
set -euo pipefail
RECJAX=${RECJAX:-recjax}
COMMAND=${RECJAX_COMMAND:-train}
if [[ -n "${SLURM_JOB_ID:-}" && "${SLURM_NTASKS:-1}" -gt 1 && -z "${SLURM_STEP_ID:-}" ]]; then
  # Inside the batch script: start one task per allocated slot.
  exec srun --kill-on-bad-exit=1 "$0" "$@"
fi
exec "$RECJAX" "$COMMAND" "$@"
