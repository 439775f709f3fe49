#!/bin/bash
# OctoPack instruction tuning: OctoCoder (StarCoder 15.5B, default) or OctoGeeX (CodeGeeX2-6B, MODEL=octogeex).
#
#   sbatch launch/finetune.sh                          # from the repository root; log: octo-finetune-<jobid>.out
#   MODEL=octogeex sbatch launch/finetune.sh
#   MODEL=octocoder-lora sbatch launch/finetune.sh     # OctoCoder's LoRA recipe (launch/configs/octocoder-15b-lora.yaml)
#   sbatch --nodes 2 launch/finetune.sh --train.iters 60   # extra args are `megaocto train` overrides
#   bash launch/finetune.sh                            # no SLURM: local torchrun (gloo on CPU without a GPU)
#   PRESET=tiny TP=2 bash launch/finetune.sh           # tiny model on synthetic data, 2 CPU processes
#
# SLURM layout: ONE TASK PER GPU (srun starts `python -m megaocto.cli train` 8 times per node; megaocto reads
# SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID). MASTER_ADDR = first node's NodeAddr, MASTER_PORT = 15000 + job id % 20000.
# Preemption: SIGUSR1 180 s before the time limit (--signal) or SIGTERM from scancel/preemption reaches every task;
# the trainer saves and exits 42; this script then runs `scontrol requeue`, and the requeued job resumes from the
# checkpoint in `checkpoint.save` at the same step and data position. On a CPU-only cluster submit with e.g.
#   sbatch --gpus-per-node 0 --ntasks-per-node 2 --cpus-per-task 1 launch/finetune.sh
#
# Environment (every one optional):
#   MODEL        octocoder (default; launch/configs/octocoder-15b.yaml) | octogeex (launch/configs/octogeex-6b.yaml)
#                | octocoder-lora (launch/configs/octocoder-15b-lora.yaml; PRESET=tiny: tiny-bigcode-lora.yaml)
#   PRESET       tiny: launch/configs/tiny-bigcode.yaml (octogeex: tiny-glm2.yaml) — tests and the demo
#   CONFIG       a run config file; wins over MODEL/PRESET
#   MEGAOCTO_ROOT  repository root (default: the sbatch submit directory, or this script's parent directory)
#   DATA_PATHS, TOKENIZER, LOAD, SAVE, SAVE_INTERVAL, RUN_DIR, TP, SEQ_LENGTH, ITERS, GLOBAL_BATCH, MICRO_BATCH, LR,
#   DTYPE, PYTHON, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT, MEGAOCTO_LOCAL, MEGAOCTO_NO_REQUEUE: see launch/lib.sh
#
#SBATCH --job-name=octo-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@180
set -euo pipefail

if [ -n "${MEGAOCTO_ROOT:-}" ]; then ROOT=$MEGAOCTO_ROOT
elif [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "$SLURM_SUBMIT_DIR/launch/lib.sh" ]; then ROOT=$SLURM_SUBMIT_DIR
else ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fi
[ -f "$ROOT/launch/lib.sh" ] || { echo "finetune.sh: $ROOT/launch/lib.sh not found: submit from the megaocto" \
                                       "repository root or set MEGAOCTO_ROOT" >&2; exit 2; }
# shellcheck source=launch/lib.sh
source "$ROOT/launch/lib.sh"

MODEL=${MODEL:-octocoder}
case "$MODEL" in
  octocoder) full="octocoder-15b.yaml"; tiny="tiny-bigcode.yaml" ;;
  octogeex) full="octogeex-6b.yaml"; tiny="tiny-glm2.yaml" ;;
  octocoder-lora) full="octocoder-15b-lora.yaml"; tiny="tiny-bigcode-lora.yaml" ;;
  *) echo "finetune.sh: MODEL must be octocoder, octogeex or octocoder-lora (got '$MODEL')" >&2; exit 2 ;;
esac
case "${PRESET:-}" in
  "") default_config=$ROOT/launch/configs/$full ;;
  tiny) default_config=$ROOT/launch/configs/$tiny ;;
  *) echo "finetune.sh: PRESET must be empty or tiny (got '$PRESET')" >&2; exit 2 ;;
esac
CONFIG=${CONFIG:-$default_config}

set +e
megaocto_train "$CONFIG" "$@"
exit $?
