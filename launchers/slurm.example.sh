#!/usr/bin/env bash
# sbatch launchers/slurm.example.sh configs/RUN.yaml [key=value ...]
#
# One torchrun per node (srun), rendezvous on the first node. Preemption and the time limit:
# 120 s before the end SLURM sends USR1 to this script (B:), which asks for a requeue and
# passes the signal to the ranks; every rank finishes its step, saves a checkpoint and
# exits 0 (train.stop_signals). The requeued job runs this script again: --resume latest
# continues from that checkpoint, on whatever number of nodes it gets (another world size
# converts the checkpoint once; data.global_batch_size keeps the contrastive batch).
#SBATCH --job-name=alignvl
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
config=$1; shift
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

srun --kill-on-bad-exit=1 torchrun --nnodes "$SLURM_NNODES" --nproc_per_node "${RANKS_PER_NODE:-8}" \
    --rdzv_backend c10d --rdzv_endpoint "$head_node:${RDZV_PORT:-29500}" --rdzv_id "$SLURM_JOB_ID" \
    --signals_to_handle SIGTERM,SIGINT,SIGUSR1 --shutdown_timeout 110 \
    launchers/train.py --config "$config" --resume latest "$@" &
step=$!

preempted() {
    echo "[slurm] USR1: checkpointing, then requeue of job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    kill -USR1 "$step"  # srun passes it to every torchrun, torchrun to its ranks
}
trap preempted USR1
status=0
wait "$step" || status=$?
if [ "$status" -gt 128 ]; then  # the trap interrupted `wait`: wait for the ranks to save and exit
    status=0
    wait "$step" || status=$?
fi
exit "$status"
