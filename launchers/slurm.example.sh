#!/usr/bin/env bash
# sbatch launchers/slurm.example.sh configs/RUN.yaml [key=value ...]
#SBATCH --job-name=alignvl
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --output=%x-%j.out
set -euo pipefail
config=$1; shift
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# One torchrun per node; it starts the 8 ranks of its node and rendezvouses on the head node.
srun torchrun --nnodes "$SLURM_NNODES" --nproc_per_node 8 --rdzv_backend c10d \
    --rdzv_endpoint "$head_node:29500" --rdzv_id "$SLURM_JOB_ID" \
    launchers/train.py --config "$config" --resume latest "$@"
