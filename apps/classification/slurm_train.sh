#!/bin/bash
# Example SLURM job: one task per GPU, torch.distributed initialised from the SLURM variables
# (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODELIST; MASTER_PORT defaults to 22110).
# This is the "transformer" recipe of the study: 8 GPUs x 128 images = total batch 1024, lr 1e-3.
#
#   sbatch apps/classification/slurm_train.sh                       # defaults below
#   MODEL=unified_convnext_tiny DATA=/data/imagenet sbatch --nodes 2 apps/classification/slurm_train.sh
#
#SBATCH --job-name=stm-cls
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=72:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --requeue

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/../..}"

MODEL=${MODEL:-unified_halo_tiny}
DATA=${DATA:-/path/to/imagenet}            # meta/train.txt, meta/val.txt, train/, val/
OUT=${OUT:-output/${MODEL}}
PYTHON=${PYTHON:-.venv/bin/python}
export MASTER_PORT=${MASTER_PORT:-22110}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# Every task runs main.py; it reads its rank from SLURM_PROCID and its GPU from SLURM_LOCALID.
# A requeued job (preemption, --requeue) continues from the newest complete checkpoint (--auto_resume).
srun --kill-on-bad-exit=1 "$PYTHON" apps/classification/main.py \
    --model "$MODEL" --data_path "$DATA" --output_dir "$OUT" --log_dir "$OUT/tb" \
    --batch_size 128 --lr 1e-3 --warmup_init_lr 1e-6 --min_lr 1e-5 --update_freq 1 \
    --epochs 300 --warmup_epochs 20 --num_workers "${SLURM_CPUS_PER_TASK:-10}" \
    --auto_resume true "$@"

# The "cnn" (ConvNeXt-style) recipe instead: total batch 4096 over 8 GPUs:
#   --batch_size 512 --lr 4e-3 --warmup_init_lr 0 --min_lr 1e-6
