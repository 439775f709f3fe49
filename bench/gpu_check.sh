#!/usr/bin/env bash
# One-GPU readiness check for megaocto (issue 15): within 8 minutes on one CUDA GPU, each part in its own process
# under its own time limit (a slow part cannot eat the rest), then one summary table.
#
#   bash bench/gpu_check.sh              # on a CUDA GPU (the venv: CUDA torch + `pip install -e .`)
#   bash bench/gpu_check.sh --dry-run    # CPU: every part on tiny shapes, Triton under the interpreter (~1 min)
#   DRY_RUN=1 bash bench/gpu_check.sh    # the same
#
# Parts (bench/gpu_check.py has the details):        default limit (s)
#   tests      CUDA-only tests in tests/ (prebuilt CUDA kernels vs torch)      40
#   kernels    every Triton kernel on the GPU vs its torch reference, fwd+bwd 120
#   train      bf16 training steps of tiny-bigcode / tiny-glm2 / tiny-llama    60
#   nccl       single-rank NCCL process group + megaocto ParallelContext       25
#   attention  flash attention fwd+bwd, seq 8192, head dim 128: TFLOP/s vs SDPA (and flash-attn when installed)  90
#   train1b    starcoderbase-1b (1.1B BigCode) training step at seq 8192: tokens/s, MFU (6N + 12*L*H*Q*T)      120
#   lora       LoRA vs full finetuning, same model and batch (bench/lora_bench.py): step time, peak memory       45
#
# Environment: PYTHON (default .venv/bin/python, else python3), OUT_DIR (results, logs; default a new /tmp folder),
# BUDGET_S (total, default 480 = 8 min; a part never gets more than what is left), LIMIT_<PART> (e.g.
# LIMIT_ATTENTION=150), BUILD_CUDA=1 (first build megaocto._cuda_kernels in place, limit LIMIT_BUILD=150, counted in
# the budget; otherwise the `tests` part reports skip when the module is not built). Triton kernels compile (and
# flash attention autotunes) on first use; the compiled kernels stay in Triton's cache (~/.triton/cache), so a second
# run of the check is faster and later parts reuse what earlier ones compiled.
# Exit status: 0 when every part is ok or skip, 1 otherwise, 2 on a usage error.
set -u
cd "$(dirname "$0")/.."

DRY=${DRY_RUN:-0}
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done
case "$DRY" in 0|1) ;; *) echo "gpu_check.sh: DRY_RUN must be 0 or 1 (got '$DRY')" >&2; exit 2 ;; esac

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT_DIR:-$(mktemp -d /tmp/megaocto_gpu_check.XXXXXX)}
mkdir -p "$OUT"
BUDGET=${BUDGET_S:-480}
RESERVE=10  # seconds kept for the summary
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  FLAG=--dry-run
  DEVICE="dry run"
else
  export TRITON_INTERPRET=0  # tests/conftest.py would otherwise turn the interpreter on
  FLAG=
  DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
  DEVICE=${DEVICE:-"no nvidia-smi"}
fi

declare -A LIMIT=([build]=${LIMIT_BUILD:-150} [tests]=${LIMIT_TESTS:-40} [kernels]=${LIMIT_KERNELS:-120}
                  [train]=${LIMIT_TRAIN:-60} [nccl]=${LIMIT_NCCL:-25} [attention]=${LIMIT_ATTENTION:-90}
                  [train1b]=${LIMIT_TRAIN1B:-120} [lora]=${LIMIT_LORA:-45})
START=$(date +%s)
echo "[gpu_check] $DEVICE; results and logs in $OUT; budget $BUDGET s"

# limit_for PART: the part's limit, cut to what is left of the budget (minus the kill grace and the summary)
limit_for() {
  local left=$(( BUDGET - ($(date +%s) - START) - RESERVE - 5 ))
  local lim=${LIMIT[$1]}
  [ "$left" -lt "$lim" ] && lim=$left
  echo "$lim"
}

if [ "${BUILD_CUDA:-0}" = 1 ] && [ "$DRY" = 0 ]; then
  lim=$(limit_for build)
  echo "[gpu_check] building megaocto._cuda_kernels (limit $lim s)"
  MEGAOCTO_BUILD_CUDA=1 timeout -k 5 "$lim" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || echo "[gpu_check] CUDA build failed or timed out (see $OUT/build.log); the tests part will say skip"
fi

for part in tests kernels train nccl attention train1b lora; do
  lim=$(limit_for "$part")
  if [ "$lim" -lt 5 ]; then
    echo "[gpu_check] $part: not run, the $BUDGET s budget is spent"
    continue
  fi
  t0=$(date +%s.%N)
  timeout -k 5 "$lim" "$PY" bench/gpu_check.py "$part" --out "$OUT/$part.json" $FLAG > "$OUT/$part.log" 2>&1
  rc=$?
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  echo "$rc $secs $lim" > "$OUT/$part.rc"
  echo "[gpu_check] $part: exit $rc after $secs s (limit $lim s)"
done

TOTAL=$(( $(date +%s) - START ))
printf '{"dry": %s, "device": "%s", "budget_s": %s, "total_s": %s}\n' \
  "$([ "$DRY" = 1 ] && echo true || echo false)" "$DEVICE" "$BUDGET" "$TOTAL" > "$OUT/meta.json"
"$PY" bench/gpu_check.py summary --dir "$OUT"
