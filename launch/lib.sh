# Shared wiring of launch/finetune.sh and launch/pretrain_santacoderpack.sh (sourced, not run).
#
# megaocto_train CONFIG [--section.field VALUE ...] runs `megaocto train` on this node or job (the array
# PRESET_OVERRIDES, when set, holds the calling script's own overrides; environment variables and arguments win):
#   * inside a SLURM allocation (SLURM_JOB_ID and SLURM_NTASKS set, MEGAOCTO_LOCAL unset): ONE TASK PER GPU —
#     `srun python -m megaocto.cli train ...`; each task reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID itself
#     (megaocto.parallel.context), MASTER_ADDR is the first node's address and MASTER_PORT 15000 + job id % 20000.
#     Because every task is a megaocto process, the trainer's exit code 42 (preempted: checkpoint saved) reaches
#     this script through srun, which then runs `scontrol requeue $SLURM_JOB_ID`; the requeued job resumes from
#     the checkpoint in `checkpoint.save` (checkpoint.auto_resume).
#   * otherwise: a local `megaocto torchrun --standalone --nproc_per_node NPROC_PER_NODE` (gloo on CPU, NCCL on GPU):
#     torchrun with the failed worker's own exit code (2, 42, ...) and no ChildFailedError traceback (plain torchrun
#     exits 1). The trainer's {run_dir}/exit_reason.json still decides "preempted" when torchrun itself was
#     signalled (it then exits 128 + signal), in both modes.
# Signals: under SLURM the tasks get SIGTERM / SIGUSR1 from SLURM itself; this shell traps SIGTERM (to live on and
# requeue) and forwards a SIGUSR1 sent only to it (--signal=B:USR1@...) to srun, which passes it to every task.
# Locally SIGTERM / SIGUSR1 go to torchrun as SIGTERM (torchrun forwards SIGTERM to its workers). The trainer
# finishes its step, saves and exits 42. On 42 a still-RUNNING job is requeued (a scancel'ed one is not).
#
# Environment read here (all optional; a set variable overrides the config file):
#   PYTHON          python with megaocto installed (default: $ROOT/.venv/bin/python, else python3)
#   NPROC_PER_NODE  local mode: processes to start (default: GPUs from nvidia-smi, else TP, else 1)
#   TP              --parallel.tp            SEQ_LENGTH    --model.seq_length
#   ITERS           --train.iters            GLOBAL_BATCH  --train.global_batch_size
#   MICRO_BATCH     --train.micro_batch_size LR            --optimizer.lr
#   DTYPE           --train.dtype            DATA_PATHS    --data.paths (space separated prefixes)
#   TOKENIZER       --data.tokenizer         LOAD          --checkpoint.load (base weights or a checkpoint)
#   SAVE            --checkpoint.save        SAVE_INTERVAL --checkpoint.save_interval
#   RUN_DIR         --logging.run_dir (metrics.jsonl, exit_reason.json)
#   MASTER_ADDR / MASTER_PORT   SLURM mode: taken as given when set
#   MEGAOCTO_LOCAL=1            ignore a surrounding SLURM allocation and start torchrun locally
#   MEGAOCTO_NO_REQUEUE=1       on exit 42 under SLURM, exit 42 instead of requeueing
# shellcheck shell=bash

EXIT_PREEMPTED=42

megaocto_log() { echo "[megaocto launch $(date +%H:%M:%S)] $*"; }

# The python to run megaocto with (needs ROOT, set by the calling script).
megaocto_find_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
  elif [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python"
  else echo python3
  fi
}

# The --section.field overrides named by the environment variables above.
megaocto_env_overrides() {
  local -n _out=$1
  _out=()
  [ -n "${TP:-}" ] && _out+=(--parallel.tp "$TP")
  [ -n "${SEQ_LENGTH:-}" ] && _out+=(--model.seq_length "$SEQ_LENGTH")
  [ -n "${ITERS:-}" ] && _out+=(--train.iters "$ITERS")
  [ -n "${GLOBAL_BATCH:-}" ] && _out+=(--train.global_batch_size "$GLOBAL_BATCH")
  [ -n "${MICRO_BATCH:-}" ] && _out+=(--train.micro_batch_size "$MICRO_BATCH")
  [ -n "${LR:-}" ] && _out+=(--optimizer.lr "$LR")
  [ -n "${DTYPE:-}" ] && _out+=(--train.dtype "$DTYPE")
  if [ -n "${DATA_PATHS:-}" ]; then
    local p json=""
    for p in $DATA_PATHS; do json+="${json:+, }\"$p\""; done
    _out+=(--data.paths "[$json]")
  fi
  [ -n "${TOKENIZER:-}" ] && _out+=(--data.tokenizer "$TOKENIZER")
  [ -n "${LOAD:-}" ] && _out+=(--checkpoint.load "$LOAD")
  [ -n "${SAVE:-}" ] && _out+=(--checkpoint.save "$SAVE")
  [ -n "${SAVE_INTERVAL:-}" ] && _out+=(--checkpoint.save_interval "$SAVE_INTERVAL")
  [ -n "${RUN_DIR:-}" ] && _out+=(--logging.run_dir "$RUN_DIR")
  return 0
}

# Three lines after config + overrides: logging.run_dir, checkpoint.save, checkpoint.load ("-" when unset); also
# validates the config before any process starts. (A config whose load equals its save, like the tiny presets,
# moves load along with a SAVE override: megaocto.config.loader.RUN_CONFIG_FOLLOWS.)
megaocto_resolve_run_dir() {
  "$PY" - "$@" <<'EOF'
import sys
from megaocto.config.base import ConfigError
from megaocto.config.loader import load_run_config
try:
    cfg = load_run_config(sys.argv[1], sys.argv[2:])
except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
print(cfg.logging.run_dir, cfg.checkpoint.save or "-", cfg.checkpoint.load or "-", sep="\n")
EOF
}

# exit_code recorded in RUN_DIR/exit_reason.json by rank 0 at or after epoch second $2 (empty when absent, null,
# or older: a run that died before writing must not inherit an earlier run's 42).
megaocto_recorded_exit_code() {
  "$PY" - "$1/exit_reason.json" "$2" <<'EOF' 2>/dev/null || true
import json, sys
record = json.load(open(sys.argv[1]))
code = record.get("exit_code") if float(record.get("time") or 0) >= float(sys.argv[2]) else None
print("" if code is None else code)
EOF
}

megaocto_train() {
  local config=$1
  shift
  PY=$(megaocto_find_python)
  local -a env_over
  [ -n "${PRESET_OVERRIDES+x}" ] || PRESET_OVERRIDES=()
  megaocto_env_overrides env_over
  # Precedence, lowest first: the config file, the script's preset overrides (PRESET_OVERRIDES array), the
  # environment variables, the command-line arguments.
  local -a args=("${PRESET_OVERRIDES[@]}" "${env_over[@]}" "$@")
  local resolved run_dir
  resolved=$(megaocto_resolve_run_dir "$config" "${args[@]}") || return 2
  run_dir=$(sed -n 1p <<<"$resolved")
  megaocto_log "config $config: checkpoint.save $(sed -n 2p <<<"$resolved"), checkpoint.load $(sed -n 3p <<<"$resolved")"
  args=(--config "$config" "${args[@]}")
  case "$run_dir" in /*) ;; *) run_dir="$PWD/$run_dir" ;; esac

  local mode=local
  [ -n "${SLURM_JOB_ID:-}" ] && [ -n "${SLURM_NTASKS:-}" ] && [ "${MEGAOCTO_LOCAL:-0}" != 1 ] && mode=slurm
  local -a cmd
  if [ "$mode" = slurm ]; then
    local head nodes=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
    [ -n "$nodes" ] || { megaocto_log "SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not: run inside an" \
                                      "allocation (sbatch/salloc) or set MEGAOCTO_LOCAL=1"; return 2; }
    head=$(scontrol show hostnames "$nodes" | head -n1)
    # NodeAddr, not the node name: emulated or unresolvable node names still give a usable address.
    export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "$head" | grep -oP 'NodeAddr=\K\S+' || echo "$head")}
    export MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    # Slurm >= 22.05: srun no longer inherits sbatch's --cpus-per-task.
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
    megaocto_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $nodes: $SLURM_NTASKS tasks," \
                 "one per GPU; master $MASTER_ADDR:$MASTER_PORT; run dir $run_dir"
    cmd=(srun --kill-on-bad-exit=1 "$PY" -m megaocto.cli train "${args[@]}")
  else
    local nproc=${NPROC_PER_NODE:-}
    if [ -z "$nproc" ]; then
      nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
      [ "${nproc:-0}" -gt 0 ] || nproc=${TP:-1}
    fi
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    megaocto_log "local torchrun: $nproc processes on $(hostname -s); run dir $run_dir"
    cmd=("$PY" -m megaocto.cli torchrun --standalone --nnodes 1 --nproc_per_node "$nproc"
         -m megaocto.cli train "${args[@]}")
  fi
  megaocto_log "${cmd[*]}"

  local started
  started=$(date +%s)
  "${cmd[@]}" &
  local child=$! rc got_signal=0
  # Forward the preemption signals; torchrun only handles SIGTERM (it passes that to its workers).
  # shellcheck disable=SC2064
  if [ "$mode" = slurm ]; then
    # SLURM signals the tasks itself on scancel / preemption / time limit (and --signal without B:); this shell
    # must only survive SIGTERM to reach the requeue below. SIGUSR1 sent to the batch shell alone
    # (--signal=B:USR1@...) is passed on; srun forwards it to every task.
    trap "got_signal=1; megaocto_log 'SIGTERM: the tasks get it from SLURM; waiting for them'" TERM
    trap "got_signal=1; megaocto_log 'SIGUSR1: forwarding to srun'; kill -USR1 $child 2>/dev/null" USR1
  else
    trap "got_signal=1; megaocto_log 'SIGTERM: forwarding to torchrun'; kill -TERM $child 2>/dev/null" TERM
    trap "got_signal=1; megaocto_log 'SIGUSR1: forwarding to torchrun as SIGTERM'; kill -TERM $child 2>/dev/null" USR1
  fi
  # shellcheck disable=SC2064
  trap "got_signal=1; kill -INT $child 2>/dev/null" INT
  rc=""
  while :; do
    wait "$child"
    local status=$?
    # 127: the previous `wait` already returned the child's status (a signal landed just after it exited).
    if [ "$status" = 127 ] && [ -n "$rc" ]; then break; fi
    rc=$status
    # A trapped signal interrupts `wait` (status 128+n); wait again for the real exit status.
    if [ "$got_signal" = 1 ]; then got_signal=0; continue; fi
    break
  done
  trap - TERM USR1 INT

  local recorded
  recorded=$(megaocto_recorded_exit_code "$run_dir" "$started")
  if [ "$rc" != 0 ] && { [ "$rc" = "$EXIT_PREEMPTED" ] || [ "$recorded" = "$EXIT_PREEMPTED" ]; }; then
    if [ "$mode" = slurm ] && [ "${MEGAOCTO_NO_REQUEUE:-0}" != 1 ]; then
      # Requeue only a job that is still RUNNING: after `scancel` it is CANCELLED (the user meant it), and a
      # job preempted with PreemptMode=REQUEUE is requeued by SLURM itself.
      local state
      state=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -oP 'JobState=\K\S+' || true)
      if [ "$state" = RUNNING ]; then
        megaocto_log "preempted: checkpoint saved (exit_reason.json in $run_dir); scontrol requeue $SLURM_JOB_ID"
        if scontrol requeue "$SLURM_JOB_ID"; then
          return 0
        fi
        megaocto_log "scontrol requeue failed; resubmit the same command to resume"
      else
        megaocto_log "preempted: checkpoint saved; job state ${state:-unknown}, so no requeue from here" \
                     "(cancelled, or SLURM requeues it itself); resubmit the same command to resume"
      fi
    else
      megaocto_log "preempted: checkpoint saved; run the same command again to resume"
    fi
    return "$EXIT_PREEMPTED"
  fi
  if [ "$rc" != 0 ] && [ -n "$recorded" ] && [ "$recorded" != 0 ]; then
    rc=$recorded   # a signalled torchrun (or plain torchrun's 1) hides the code; the trainer recorded the real one
  fi
  megaocto_log "megaocto train exited with $rc (run dir $run_dir)"
  return "$rc"
}
