#!/bin/bash
# Instruction tuning: OctoCoder (StarCoder 15.5B, default) or OctoGeeX (CodeGeeX2-6B, MODEL=octogeex) as OctoPack
# trained them; Magicoder-DS-6.7B (MODEL=magicoder), Magicoder-S-DS-6.7B (MODEL=magicoder-s) and InverseCoder-DS-6.7B
# (MODEL=inversecoder, two sequential stages in one job) as Magicoder / InverseCoder trained them.
#
#   sbatch launch/finetune.sh                          # from the repository root; log: octo-finetune-<jobid>.out
#   MODEL=octogeex sbatch launch/finetune.sh
#   MODEL=magicoder sbatch launch/finetune.sh          # then MODEL=magicoder-s (continues from its checkpoint)
#   MODEL=inversecoder sbatch launch/finetune.sh       # stage 1 (self-generated data, 1 epoch), then stage 2
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
#   MODEL        octocoder (default; launch/configs/octocoder-15b.yaml) | octogeex (launch/configs/octogeex-6b.yaml) |
#                octocoder-lora (octocoder-15b-lora.yaml) | magicoder (magicoder-ds-6.7b.yaml) |
#                magicoder-s (magicoder-s-ds-6.7b.yaml) |
#                inversecoder (inversecoder-ds-6.7b-stage1.yaml, then inversecoder-ds-6.7b-stage2.yaml)
#   PRESET       tiny: launch/configs/tiny-bigcode.yaml (octogeex: tiny-glm2.yaml; octocoder-lora: tiny-bigcode-lora.yaml;
#                magicoder, magicoder-s and both inversecoder stages: tiny-llama-sft.yaml) — tests and the demo
#   CONFIG       a run config file; wins over MODEL/PRESET (inversecoder: STAGE1_CONFIG / STAGE2_CONFIG)
# MODEL=inversecoder runs stage 1 to its end, then stage 2 with checkpoint.load = stage 1's checkpoint.save and
# checkpoint.finetune (weights only; a fresh optimizer and LR schedule). A stage 1 whose run dir records a finished
# run (exit_reason.json "finished"/"already_done" and a checkpoint in its save dir) is skipped, so a requeued job
# resumes the stage it was preempted in, from that stage's own checkpoint. Per stage: RUN_DIR=D puts stage k in
# D/stagek (checkpoints in D/stagek/checkpoints); STAGE1_DATA_PATHS / STAGE2_DATA_PATHS replace DATA_PATHS (SAVE and
# DATA_PATHS are refused: both stages would share them); STAGE1_ARGS / STAGE2_ARGS add overrides (space
# separated) to one stage; the script's arguments go to both.
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
  magicoder) full="magicoder-ds-6.7b.yaml"; tiny="tiny-llama-sft.yaml" ;;
  magicoder-s) full="magicoder-s-ds-6.7b.yaml"; tiny="tiny-llama-sft.yaml" ;;
  inversecoder) full="inversecoder-ds-6.7b-stage1.yaml"; tiny="tiny-llama-sft.yaml" ;;
  *) echo "finetune.sh: MODEL must be octocoder, octogeex, octocoder-lora, magicoder, magicoder-s or inversecoder (got '$MODEL')" >&2
     exit 2 ;;
esac
case "${PRESET:-}" in
  "") default_config=$ROOT/launch/configs/$full ;;
  tiny) default_config=$ROOT/launch/configs/$tiny ;;
  *) echo "finetune.sh: PRESET must be empty or tiny (got '$PRESET')" >&2; exit 2 ;;
esac
CONFIG=${CONFIG:-$default_config}

# Prints "finished" when RUN_DIR/exit_reason.json says the run reached its end (finished / already_done).
megaocto_finished_reason() {
  "$PY" - "$1/exit_reason.json" <<'EOF' 2>/dev/null || true
import json, sys
reason = json.load(open(sys.argv[1])).get("reason")
print("finished" if reason in ("finished", "already_done") else "")
EOF
}

# inversecoder_stage resolve|train N CONFIG [overrides...]: resolve the dirs of (megaocto_resolve_run_dir) or train
# stage N with its own RUN_DIR / SAVE / DATA_PATHS / STAGEN_ARGS (locals, which megaocto_env_overrides reads).
inversecoder_stage() {
  local mode=$1 n=$2 config=$3
  shift 3
  local RUN_DIR=${BASE_RUN_DIR:+$BASE_RUN_DIR/stage$n}
  local SAVE=${BASE_RUN_DIR:+$BASE_RUN_DIR/stage$n/checkpoints}
  local data_var="STAGE${n}_DATA_PATHS" args_var="STAGE${n}_ARGS"
  local DATA_PATHS=${!data_var:-}
  local -a stage_args env_over
  # shellcheck disable=SC2206
  stage_args=(${!args_var:-})
  if [ "$mode" = resolve ]; then
    megaocto_env_overrides env_over
    megaocto_resolve_run_dir "$config" "${env_over[@]}" "$@" "${stage_args[@]}"
  else
    megaocto_train "$config" "$@" "${stage_args[@]}"
  fi
}

if [ "$MODEL" = inversecoder ]; then
  [ -z "${SAVE:-}" ] && [ -z "${DATA_PATHS:-}" ] || {
    echo "finetune.sh: MODEL=inversecoder has two stages: set RUN_DIR (stage k goes to RUN_DIR/stagek, checkpoints" \
         "inside), STAGE1_DATA_PATHS and STAGE2_DATA_PATHS instead of SAVE / DATA_PATHS" >&2; exit 2; }
  PY=$(megaocto_find_python)
  BASE_RUN_DIR=${RUN_DIR:-}
  stage1_config=${STAGE1_CONFIG:-$CONFIG}
  if [ -n "${PRESET:-}" ]; then stage2_default=$ROOT/launch/configs/$tiny
  else stage2_default=$ROOT/launch/configs/inversecoder-ds-6.7b-stage2.yaml
  fi
  stage2_config=${STAGE2_CONFIG:-$stage2_default}
  # PRESET=tiny: one config for both stages; the stage lengths are InverseCoder's (1 epoch, then 2)
  tiny1=(); tiny2=()
  [ -n "${PRESET:-}" ] && { tiny1=(--train.epochs 1); tiny2=(--train.epochs 2); }
  resolved=$(inversecoder_stage resolve 1 "$stage1_config" "${tiny1[@]}" "$@") || exit 2
  run_dir1=$(sed -n 1p <<<"$resolved"); save1=$(sed -n 2p <<<"$resolved")
  [ "$save1" != - ] || { echo "finetune.sh: inversecoder stage 1 needs checkpoint.save (stage 2 loads it)" >&2; exit 2; }
  set +e
  if [ -n "$(megaocto_finished_reason "$run_dir1")" ] && [ -f "$save1/latest_checkpointed_iteration.txt" ]; then
    megaocto_log "inversecoder stage 1 already finished ($run_dir1/exit_reason.json, checkpoint in $save1): skipping it"
  else
    megaocto_log "inversecoder stage 1 of 2: $stage1_config"
    inversecoder_stage train 1 "$stage1_config" "${tiny1[@]}" "$@"
    rc=$?
    [ "$rc" = 0 ] || exit "$rc"
    if [ -z "$(megaocto_finished_reason "$run_dir1")" ]; then  # requeued, or stopped by exit_interval
      megaocto_log "inversecoder stage 1 stopped before its end; stage 2 starts after it (run this again)"
      exit 0
    fi
  fi
  megaocto_log "inversecoder stage 2 of 2: $stage2_config, from stage 1's weights in $save1"
  inversecoder_stage train 2 "$stage2_config" "${tiny2[@]}" --checkpoint.load "$save1" --checkpoint.finetune true "$@"
  exit $?
fi

set +e
megaocto_train "$CONFIG" "$@"
exit $?
