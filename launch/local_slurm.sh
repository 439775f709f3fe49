#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the launcher tests and for trying `sbatch launch/*.sh`.
#
#   sudo bash launch/local_slurm.sh install  # only install the Debian packages (what `make test` does)
#   sudo bash launch/local_slurm.sh up       # install (Debian: slurmctld slurmd slurm-client munge), configure, start
#   bash launch/local_slurm.sh status        # the daemons this script started, and sinfo
#   sudo bash launch/local_slurm.sh down     # stop ONLY the daemons `up` started, by the PIDs it recorded
#
# Must run as root on Debian/Ubuntu (apt-get). Works without systemd and without cgroups: the daemons are started
# by hand and processes are tracked with proctrack/linuxproc.
#
# Environment (all optional):
#   SLURM_VCPUS            CPUs the node advertises (default: nproc). More than the real cores lets a 2-core box run
#                          e.g. --ntasks-per-node=4 (SlurmdParameters=config_overrides); default max(nproc, 4).
#   MEGAOCTO_SLURM_STATE   where the PID file and logs of this script live (default /var/lib/megaocto-slurm)
#   SLURM_CONF_PATH        the slurm.conf to write (default /etc/slurm/slurm.conf). An existing file that this
#                          script did not write is never overwritten (set MEGAOCTO_SLURM_FORCE=1 to replace it).
#   MEGAOCTO_SLURM_NO_INSTALL=1   never run apt-get (fail if the binaries are missing)
#   MEGAOCTO_SLURM_CRED_EXPIRE    AuthInfo cred_expire seconds (default 10): also how long a requeued job waits
#                                 before it may start again (SLURM's default 120 s)
#
# Facts this relies on (Debian 12, Slurm 22.05): the package postinst cannot start daemons without systemd;
# /run/munge must be created by hand; Debian's postinst creates /etc/munge/munge.key; slurmctld and slurmd
# daemonize and write their PidFile; `sacct` is unavailable (no accounting) — use `scontrol show job`.
set -euo pipefail

STATE=${MEGAOCTO_SLURM_STATE:-/var/lib/megaocto-slurm}
CONF=${SLURM_CONF_PATH:-/etc/slurm/slurm.conf}
PIDS="$STATE/pids"          # lines "name pid" of the daemons this script started
MARK="# written by megaocto launch/local_slurm.sh"

die() { echo "local_slurm.sh: error: $*" >&2; exit 1; }
say() { echo "local_slurm.sh: $*"; }

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
pid_from() { [ -s "$1" ] && tr -dc '0-9' <"$1" || true; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return
  fi
  [ "${MEGAOCTO_SLURM_NO_INSTALL:-0}" = 1 ] && die "slurmctld/slurmd/sbatch/munged not installed and MEGAOCTO_SLURM_NO_INSTALL=1"
  command -v apt-get >/dev/null || die "apt-get not found: install slurmctld slurmd slurm-client munge yourself"
  say "installing slurmctld slurmd slurm-client munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  local hn cpus real mem override
  hn=$(hostname -s)
  real=$(nproc)
  cpus=${SLURM_VCPUS:-$(( real > 4 ? real : 4 ))}
  mem=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))
  override=""
  [ "$cpus" -gt "$real" ] && override="SlurmdParameters=config_overrides"
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF" && [ "${MEGAOCTO_SLURM_FORCE:-0}" != 1 ]; then
    die "$CONF exists and was not written by this script; refusing to replace it (MEGAOCTO_SLURM_FORCE=1 overrides)"
  fi
  mkdir -p "$(dirname "$CONF")" "$STATE/slurmctld" "$STATE/slurmd" "$STATE/log"
  chown slurm:slurm "$STATE/slurmctld" "$STATE/log"
  cat >"$CONF" <<EOF
$MARK (one node on localhost; see that script)
ClusterName=megaocto
SlurmctldHost=${hn}(127.0.0.1)
AuthType=auth/munge
# cred_expire also delays a requeued job's restart (default 120 s); a one-node test cluster needs no margin.
AuthInfo=cred_expire=${MEGAOCTO_SLURM_CRED_EXPIRE:-10}
CredType=cred/munge
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=30
${override}
NodeName=${hn} NodeAddr=127.0.0.1 CPUs=${cpus} Boards=1 SocketsPerBoard=1 CoresPerSocket=${cpus} ThreadsPerCore=1 RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${hn} Default=YES MaxTime=INFINITE State=UP
EOF
  say "wrote $CONF ($cpus CPUs advertised, $real real)"
}

record() { echo "$1 $2" >>"$PIDS"; }
recorded() { [ -s "$PIDS" ] && awk -v n="$1" '$1 == n {print $2}' "$PIDS" | tail -n1 || true; }

start_munge() {
  local pid
  pid=$(pid_from /run/munge/munged.pid)
  if alive "$pid"; then
    say "munged already running (pid $pid, not started by this script: left alone by 'down')"
  else
    if [ ! -s /etc/munge/munge.key ]; then
      mungekey --create --keyfile=/etc/munge/munge.key
      chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 1 50); do pid=$(pid_from /run/munge/munged.pid); alive "$pid" && break; sleep 0.1; done
    alive "$pid" || die "munged did not start"
    record munged "$pid"
  fi
  munge -n | unmunge >/dev/null || die "munge round trip failed"
}

start_daemon() {  # name pidfile command...
  local name=$1 pidfile=$2 pid
  shift 2
  pid=$(pid_from "$pidfile")
  if alive "$pid"; then
    die "$name is already running (pid $pid from $pidfile) but was not started by this script; stop it first"
  fi
  "$@"
  for _ in $(seq 1 50); do pid=$(pid_from "$pidfile"); alive "$pid" && break; sleep 0.1; done
  alive "$pid" || { tail -20 "$STATE/log/$name.log" >&2 || true; die "$name did not start"; }
  record "$name" "$pid"
}

cmd_up() {
  [ "$(id -u)" = 0 ] || die "must run as root (installs packages, writes $CONF, starts daemons)"
  if alive "$(recorded slurmctld)" && alive "$(recorded slurmd)"; then
    say "already up (slurmctld $(recorded slurmctld), slurmd $(recorded slurmd))"
    local state
    state=$(SLURM_CONF="$CONF" sinfo -h -N -o %t 2>/dev/null || true)
    case "$state" in
      down*|drain*|drng*|fail*)
        say "node state '$state': scontrol update State=RESUME"
        SLURM_CONF="$CONF" scontrol update NodeName="$(hostname -s)" State=RESUME || true ;;
    esac
    SLURM_CONF="$CONF" sinfo
    return
  fi
  install_packages
  mkdir -p "$STATE"
  if [ -s "$PIDS" ]; then
    # Half up (a daemon this script started died): stop the rest by their recorded PIDs and start afresh, so that
    # nothing this script started is forgotten (and later left running by `down`).
    say "partly up ($(tr '\n' ' ' <"$PIDS")); restarting"
    cmd_down
  fi
  : >"$PIDS"
  write_conf
  export SLURM_CONF="$CONF"
  start_munge
  start_daemon slurmctld "$STATE/slurmctld.pid" /usr/sbin/slurmctld -c -f "$CONF"   # -c: no jobs from an old run
  start_daemon slurmd "$STATE/slurmd.pid" /usr/sbin/slurmd -f "$CONF"
  local state=""
  for _ in $(seq 1 60); do
    state=$(sinfo -h -N -o %t 2>/dev/null || true)
    [ "$state" = idle ] && break
    sleep 0.5
  done
  [ "$state" = idle ] || { tail -20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true; die "node not idle: '$state'"; }
  sinfo
  say "up: $(tr '\n' ' ' <"$PIDS")(recorded in $PIDS)"
}

cmd_down() {
  if [ ! -s "$PIDS" ]; then
    say "nothing to stop (no $PIDS)"
    return
  fi
  local name pid
  # slurmd first (it ends its job steps), then slurmctld, then munged.
  for name in slurmd slurmctld munged; do
    pid=$(recorded "$name")
    [ -n "$pid" ] || continue
    if alive "$pid"; then
      kill "$pid"
      for _ in $(seq 1 40); do alive "$pid" || break; sleep 0.25; done
      alive "$pid" && { kill -9 "$pid" 2>/dev/null || true; say "$name ($pid) killed"; } || say "stopped $name ($pid)"
    fi
  done
  rm -f "$PIDS"
}

cmd_status() {
  if [ -s "$PIDS" ]; then
    local name pid
    while read -r name pid; do
      if alive "$pid"; then say "$name $pid running"; else say "$name $pid gone"; fi
    done <"$PIDS"
    alive "$(recorded slurmctld)" && SLURM_CONF="$CONF" sinfo || true
  else
    say "not started by this script (no $PIDS)"
    return 1
  fi
}

case "${1:-}" in
  install) [ "$(id -u)" = 0 ] || die "must run as root (apt-get)"; install_packages ;;
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: bash launch/local_slurm.sh install|up|down|status" >&2; exit 2 ;;
esac
