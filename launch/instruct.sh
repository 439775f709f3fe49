#!/bin/bash
# SLURM job array: Inverse-Instruct (or OSS-Instruct) over a large corpus, one shard per array task / GPU.
#
#   INPUT=data/evol-codealpaca.jsonl LOAD=ckpt/wizardcoder OUT=data/inverse/inverse.jsonl \
#       sbatch --array=0-15 launch/instruct.sh                 # 16 shards, one GPU each; resubmit to resume
#   STAGE=merge OUT=data/inverse/inverse.jsonl SHARDS=16 bash launch/instruct.sh   # after all tasks: merge + check
#   STAGE=oss-instruct SEEDS="data/seeds/python.jsonl" TEACHER_URL=http://host:8000/v1 TEACHER_MODEL=m \
#       OUT=data/oss/oss.jsonl sbatch --array=0-7 launch/instruct.sh
#
# Every task runs `megaocto instruct $STAGE --shard $SLURM_ARRAY_TASK_ID/$SHARDS` (no logic here). The outputs are
# append-only and resumable, so a requeued or resubmitted task continues where it stopped; `merge` refuses to write
# the final file until every shard reports complete (and says which to rerun).
#
# Environment:
#   STAGE          inverse-instruct (default) | oss-instruct | summarize | score | merge
#   OUT            final output jsonl (shards write OUT.shard-K-of-N.jsonl) (required)
#   SHARDS         N (default: SLURM_ARRAY_TASK_COUNT, else 1); the task id is K (default 0)
#   INPUT          inverse-instruct: instruction/response jsonl(s), space separated; summarize/score: the previous
#                  stage's output
#   LOAD           megaocto checkpoint for in-process generation/scoring (TP > 1: NPROC=tp, run under torchrun)
#   TEACHER_URL / TEACHER_MODEL   an OpenAI-compatible endpoint instead of LOAD (oss-instruct: the teacher)
#   SEEDS          oss-instruct: seed corpus (jsonl files, source dirs, git repos), space separated
#   NPROC          processes per task (= the checkpoint's tp; default 1)
#   EXTRA          more arguments for the stage, e.g. "--num-instructions 10 --batch-size 64"
#   PYTHON / MEGAOCTO_ROOT   as in launch/finetune.sh
#
#SBATCH --job-name=octo-instruct
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

if [ -n "${MEGAOCTO_ROOT:-}" ]; then ROOT=$MEGAOCTO_ROOT
elif [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "$SLURM_SUBMIT_DIR/launch/lib.sh" ]; then ROOT=$SLURM_SUBMIT_DIR
else ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fi
[ -f "$ROOT/launch/lib.sh" ] || { echo "instruct.sh: $ROOT/launch/lib.sh not found: submit from the megaocto" \
                                       "repository root or set MEGAOCTO_ROOT" >&2; exit 2; }
# shellcheck source=launch/lib.sh
source "$ROOT/launch/lib.sh"
PY=$(megaocto_find_python)

STAGE=${STAGE:-inverse-instruct}
[ -n "${OUT:-}" ] || { echo "instruct.sh: set OUT to the final output jsonl" >&2; exit 2; }
SHARDS=${SHARDS:-${SLURM_ARRAY_TASK_COUNT:-1}}
TASK=${SLURM_ARRAY_TASK_ID:-0}
# shellcheck disable=SC2206
extra=(${EXTRA:-})

if [ "$STAGE" = merge ]; then
  megaocto_log "merge $SHARDS shards -> $OUT"
  exec "$PY" -m megaocto.cli instruct merge --output "$OUT" --shards "$SHARDS"
fi

if [ -n "${LOAD:-}" ]; then
  model=(--load "$LOAD")
elif [ -n "${TEACHER_URL:-}" ]; then
  model=(--teacher-url "$TEACHER_URL" --teacher-model "${TEACHER_MODEL:?set TEACHER_MODEL}")
else
  echo "instruct.sh: set LOAD (a megaocto checkpoint) or TEACHER_URL + TEACHER_MODEL" >&2; exit 2
fi

NPROC=${NPROC:-1}
if [ "$NPROC" -gt 1 ]; then
  launcher=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m megaocto.cli)
else
  launcher=("$PY" -m megaocto.cli)
fi

mkdir -p "$(dirname "$OUT")"
# shellcheck disable=SC2206
inputs=(${INPUT:-})
case "$STAGE" in
  inverse-instruct) args=(--inputs "${inputs[@]:?set INPUT}") ;;
  summarize|score)  args=(--input "${inputs[0]:?set INPUT}") ;;
  oss-instruct)     # shellcheck disable=SC2206
                    seeds=(${SEEDS:?set SEEDS}); args=(--seeds "${seeds[@]}") ;;
  *) echo "instruct.sh: unknown STAGE=$STAGE" >&2; exit 2 ;;
esac
megaocto_log "$STAGE shard $TASK/$SHARDS -> $OUT"
"${launcher[@]}" instruct "$STAGE" "${args[@]}" --output "$OUT" "${model[@]}" --shard "$TASK/$SHARDS" \
    --no-progress "${extra[@]}"
