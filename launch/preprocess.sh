#!/bin/bash
# CPU job: commits jsonl (CommitPack schema) -> CommitPackFT filters -> tokenized Megatron .bin/.idx datasets.
#
#   INPUT="data/commitpack/*.jsonl" TOKENIZER=data/starcoder/tokenizer.json sbatch launch/preprocess.sh
#   OASST=data/oasst/oasst_octopack.jsonl INPUT=... TOKENIZER=... bash launch/preprocess.sh    # no SLURM: runs here
#   FORMAT=commits-pretrain FILTER=0 OUT_PREFIX=data/santacoderpack/commits INPUT=... bash launch/preprocess.sh
#
# Steps (each a `megaocto` command; no logic here):
#   1. FILTER=1: `megaocto filter-commits` (the CommitPackFT rules, drop counts per rule) -> $OUT_DIR/filtered.jsonl
#   2. `megaocto preprocess --format $FORMAT` -> ${OUT_PREFIX}_{inputs,targets}_document (finetune formats) or
#      ${OUT_PREFIX}_text_document (commits-pretrain); the OctoCoder finetune config reads
#      data/octocoder/commitpackft (+ data/octocoder/oasst).
#   3. OASST set: `megaocto preprocess --format qa` of $OASST -> ${OASST_PREFIX}_{inputs,targets}_document
#
# Environment:
#   INPUT         commit .jsonl file(s), space separated; globs are expanded (required)
#   TOKENIZER     tokenizer.json / sentencepiece .model (required; `megaocto tokenizer train` makes one)
#   OUT_DIR       default data/octocoder;  OUT_PREFIX default $OUT_DIR/commitpackft
#   FORMAT        commits-finetune (default; OctoCoder Question/Answer) | commits-pretrain | commits-linediff
#   FILTER        1 (default) runs the CommitPackFT filters first; 0 tokenizes INPUT as is
#   MIN_TOKENS / MAX_TOKENS   the filters' token-length window (default 50 / 768, CommitPackFT's)
#   OASST         optional OASST jsonl with question/answer keys (`--keys question=K answer=K` via OASST_KEYS)
#   OASST_PREFIX  default $OUT_DIR/oasst;  OASST_KEYS e.g. "question=prompt answer=completion"
#   WORKERS       tokenizer processes (default: SLURM_CPUS_PER_TASK, else nproc)
#   PYTHON / MEGAOCTO_ROOT   as in launch/finetune.sh
#
#SBATCH --job-name=octo-preprocess
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

if [ -n "${MEGAOCTO_ROOT:-}" ]; then ROOT=$MEGAOCTO_ROOT
elif [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "$SLURM_SUBMIT_DIR/launch/lib.sh" ]; then ROOT=$SLURM_SUBMIT_DIR
else ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fi
[ -f "$ROOT/launch/lib.sh" ] || { echo "preprocess.sh: $ROOT/launch/lib.sh not found: submit from the megaocto" \
                                       "repository root or set MEGAOCTO_ROOT" >&2; exit 2; }
# shellcheck source=launch/lib.sh
source "$ROOT/launch/lib.sh"
PY=$(megaocto_find_python)

[ -n "${INPUT:-}" ] || { echo "preprocess.sh: set INPUT to the commit .jsonl file(s)" >&2; exit 2; }
[ -n "${TOKENIZER:-}" ] || { echo "preprocess.sh: set TOKENIZER (megaocto tokenizer train makes one)" >&2; exit 2; }
OUT_DIR=${OUT_DIR:-data/octocoder}
OUT_PREFIX=${OUT_PREFIX:-$OUT_DIR/commitpackft}
FORMAT=${FORMAT:-commits-finetune}
WORKERS=${WORKERS:-${SLURM_CPUS_PER_TASK:-$(nproc)}}
mkdir -p "$OUT_DIR" "$(dirname "$OUT_PREFIX")"
# shellcheck disable=SC2206
inputs=($INPUT)

if [ "${FILTER:-1}" = 1 ]; then
  filtered=$OUT_DIR/filtered.jsonl
  megaocto_log "CommitPackFT filters: ${inputs[*]} -> $filtered"
  "$PY" -m megaocto.cli filter-commits --input "${inputs[@]}" --output "$filtered" --tokenizer "$TOKENIZER" \
      --min-tokens "${MIN_TOKENS:-50}" --max-tokens "${MAX_TOKENS:-768}"
  inputs=("$filtered")
fi
megaocto_log "preprocess --format $FORMAT -> ${OUT_PREFIX}_*_document.{bin,idx} ($WORKERS workers)"
"$PY" -m megaocto.cli preprocess --input "${inputs[@]}" --format "$FORMAT" --tokenizer "$TOKENIZER" \
    --output-prefix "$OUT_PREFIX" --workers "$WORKERS"
if [ -n "${OASST:-}" ]; then
  OASST_PREFIX=${OASST_PREFIX:-$OUT_DIR/oasst}
  # shellcheck disable=SC2206
  keys=(${OASST_KEYS:-})
  megaocto_log "preprocess --format qa $OASST -> ${OASST_PREFIX}_{inputs,targets}_document.{bin,idx}"
  "$PY" -m megaocto.cli preprocess --input "$OASST" --format qa ${keys:+--keys "${keys[@]}"} \
      --tokenizer "$TOKENIZER" --output-prefix "$OASST_PREFIX" --workers "$WORKERS"
fi
megaocto_log "done: $(ls "${OUT_PREFIX}"_*_document.idx ${OASST:+"${OASST_PREFIX}"_*_document.idx} | tr '\n' ' ')"
