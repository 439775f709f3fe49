#!/bin/bash
# SantaCoderPack: pretrain SantaCoder 1.1B on commits in the commit pretraining format, with FIM
# (launch/configs/santacoderpack-1b.yaml).
#
#   sbatch launch/pretrain_santacoderpack.sh            # from the repository root; log: santacoderpack-<jobid>.out
#   sbatch --nodes 4 launch/pretrain_santacoderpack.sh  # data parallel over 32 GPUs
#   bash launch/pretrain_santacoderpack.sh              # no SLURM: local torchrun (gloo on CPU without a GPU)
#   PRESET=tiny DATA_PATHS=P_text_document TOKENIZER=tok.json bash launch/pretrain_santacoderpack.sh
#                                                       # tiny model (tests): gpt data with FIM 0.5
#
# SLURM layout: ONE TASK PER GPU (srun; megaocto reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID). Preemption and
# requeue as in launch/finetune.sh: SIGUSR1 180 s before the limit or SIGTERM -> checkpoint, exit 42 ->
# `scontrol requeue`; the requeued job resumes from `checkpoint.save`. CPU-only cluster:
#   sbatch --gpus-per-node 0 --ntasks-per-node 2 --cpus-per-task 1 launch/pretrain_santacoderpack.sh
#
# Environment (every one optional):
#   PRESET       tiny: launch/configs/tiny-bigcode.yaml with data.kind gpt and FIM 0.5 (needs DATA_PATHS and
#                TOKENIZER; without DATA_PATHS the tiny run uses synthetic data and no FIM)
#   CONFIG       a run config file (default launch/configs/santacoderpack-1b.yaml); wins over PRESET
#   FIM_RATE     --data.fim_rate
#   MEGAOCTO_ROOT  repository root (default: the sbatch submit directory, or this script's parent directory)
#   DATA_PATHS, TOKENIZER, LOAD, SAVE, SAVE_INTERVAL, RUN_DIR, TP, SEQ_LENGTH, ITERS, GLOBAL_BATCH, MICRO_BATCH, LR,
#   DTYPE, PYTHON, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT, MEGAOCTO_LOCAL, MEGAOCTO_NO_REQUEUE: see launch/lib.sh
#
#SBATCH --job-name=santacoderpack
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@180
set -euo pipefail

if [ -n "${MEGAOCTO_ROOT:-}" ]; then ROOT=$MEGAOCTO_ROOT
elif [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "$SLURM_SUBMIT_DIR/launch/lib.sh" ]; then ROOT=$SLURM_SUBMIT_DIR
else ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fi
[ -f "$ROOT/launch/lib.sh" ] || { echo "pretrain_santacoderpack.sh: $ROOT/launch/lib.sh not found: submit from" \
                                       "the megaocto repository root or set MEGAOCTO_ROOT" >&2; exit 2; }
# shellcheck source=launch/lib.sh
source "$ROOT/launch/lib.sh"

PRESET_OVERRIDES=()
case "${PRESET:-}" in
  "") default_config=$ROOT/launch/configs/santacoderpack-1b.yaml ;;
  tiny)
    default_config=$ROOT/launch/configs/tiny-bigcode.yaml
    if [ -n "${DATA_PATHS:-}" ]; then
      PRESET_OVERRIDES=(--data.kind gpt --data.fim_rate "${FIM_RATE:-0.5}" --logging.run_dir runs/tiny-santacoderpack
                   --checkpoint.save runs/tiny-santacoderpack/checkpoints
                   --checkpoint.load runs/tiny-santacoderpack/checkpoints)
    fi ;;
  *) echo "pretrain_santacoderpack.sh: PRESET must be empty or tiny (got '$PRESET')" >&2; exit 2 ;;
esac
[ -n "${FIM_RATE:-}" ] && [ "${PRESET:-}" != tiny ] && PRESET_OVERRIDES+=(--data.fim_rate "$FIM_RATE")
CONFIG=${CONFIG:-$default_config}

set +e
megaocto_train "$CONFIG" "$@"
exit $?
