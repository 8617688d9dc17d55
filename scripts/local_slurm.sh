#!/usr/bin/env bash
# A single-node SLURM on this machine, for trying the `slurm` launcher without a cluster.
#   bash scripts/local_slurm.sh start DIR    start munged, slurmctld and slurmd with everything
#                                            (config, keys, sockets, ports, state, logs) under DIR,
#                                            wait until the node is idle, print the SLURM_CONF export
#   bash scripts/local_slurm.sh status DIR   which daemons run; exit 0 only when all do
#   bash scripts/local_slurm.sh stop DIR     cancel its jobs, stop the daemons it started
# `eval "$(bash scripts/local_slurm.sh start /tmp/slurm)"` sets SLURM_CONF in the calling shell;
# progress goes to stderr, only the export line to stdout. Start and stop are idempotent.
# Needs root and Debian's slurm-wlm and munge (`apt-get install -y slurm-wlm munge`, or
# scripts/install_slurm.sh). One partition, `debug`: this host with its real CPUs and memory.
#   LOCAL_SLURM_TIMEOUT=SECONDS   how long start waits for the node to become idle (default 60)
set -euo pipefail

usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
case $1 in start | stop | status) ;; *) usage ;; esac
cmd=$1
if [ "$cmd" = start ]; then
  mkdir -p "$2"
elif [ ! -d "$2" ]; then
  echo "local_slurm: nothing in $2" >&2
  [ "$cmd" = stop ]; exit  # stop: nothing to do; status: not running
fi
DIR=$(cd "$2" && pwd)
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
export SLURM_CONF=$CONF
# Every daemon (and the slurmstepd processes slurmd forks) carries this, so stop finds stragglers.
MARK="LOCAL_SLURM_DIR=$DIR"

log() { echo "local_slurm: $*" >&2; }
die() { log "$*"; exit 1; }

marked() {  # is process $1 one this script started (its environment carries $MARK)?
  tr '\0' '\n' 2>/dev/null <"/proc/$1/environ" | grep -qxF "$MARK"
}

pid_of() {  # pid of daemon $1 if the one started here is still alive (a reused pid is not), else nothing
  local f=$DIR/run/$1.pid pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if marked "$pid"; then echo "$pid"; fi
}

marked_pids() {  # every process this script started, with what they forked (slurmstepd)
  local env pid
  for env in /proc/[0-9]*/environ; do
    pid=${env#/proc/}; pid=${pid%/environ}
    if [ "$pid" != $$ ] && marked "$pid"; then echo "$pid"; fi
  done
}

need_binaries() {
  local b missing=()
  for b in munged slurmctld slurmd sinfo sbatch scancel squeue; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$b")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    die "not installed: ${missing[*]}; install with: apt-get install -y slurm-wlm munge (or: bash scripts/install_slurm.sh)"
  fi
  [ "$(id -u)" -eq 0 ] || die "must run as root (slurmd runs the jobs as their submitting user)"
}
PATH=$PATH:/usr/sbin:/sbin

free_port() {  # an unused TCP port in 20000-59999
  local p i
  for i in $(seq 200); do
    p=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null \
        && ! grep -q "$(printf ':%04X ' "$p")" /proc/net/tcp /proc/net/tcp6 2>/dev/null; then
      echo "$p"; return
    fi
  done
  die "found no free port"
}

write_conf() {
  local node host cpus mem line ctld_port slurmd_port
  node=$(hostname -s)
  # slurmd -C reports what slurmd itself will detect; a node line asking for more is drained.
  line=$(slurmd -C 2>/dev/null | head -n 1 || true)
  cpus=$(sed -n 's/.*\bCPUs=\([0-9]*\).*/\1/p' <<<"$line")
  mem=$(sed -n 's/.*\bRealMemory=\([0-9]*\).*/\1/p' <<<"$line")
  [ -n "$cpus" ] || cpus=$(nproc)
  [ -n "$mem" ] || mem=$(free -m | awk '/^Mem:/ {print $2}')
  host=$(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' <<<"$line")
  [ -n "$host" ] || host=$node
  ctld_port=$(free_port)
  slurmd_port=$(free_port)
  while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port=$(free_port); done
  cat >"$CONF" <<EOF
# Written by scripts/local_slurm.sh: a single-node SLURM, everything under $DIR.
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$DIR/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
# A job asking for more than the node has fails at submission instead of pending forever.
EnforcePartLimits=ALL
MailProg=/bin/true
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  : >"$DIR/plugstack.conf"
}

start_munged() {
  if [ -n "$(pid_of munged)" ]; then return; fi
  [ ${#MUNGE_SOCKET} -lt 100 ] || die "DIR is too long for a unix socket path: $MUNGE_SOCKET"
  mkdir -p "$DIR/munge"
  chmod 755 "$DIR/munge"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    (umask 077; dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none)
  fi
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  env "$MARK" munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/run/munged.pid" --seed-file="$DIR/munge/munged.seed" \
    --log-file="$DIR/log/munged.log" \
    || die "munged failed to start; see $DIR/log/munged.log"
  for _ in $(seq 50); do [ -S "$MUNGE_SOCKET" ] && return; sleep 0.1; done
  die "munged did not create $MUNGE_SOCKET; see $DIR/log/munged.log"
}

node_state() { sinfo -h -N -p debug -o %T 2>/dev/null | head -n 1; }

start() {
  need_binaries
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/log"
  if [ -n "$(pid_of slurmctld)" ] && [ -n "$(pid_of slurmd)" ] && [ -n "$(pid_of munged)" ]; then
    log "already running ($DIR)"
  else
    # Anything half-started goes first, so the config and the daemons agree.
    stop_daemons quiet
    write_conf
    mkdir -p "$DIR/spool/slurmd-$(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' "$CONF")"
    start_munged
    env "$MARK" slurmctld -f "$CONF" || fail "slurmctld failed to start"
    env "$MARK" slurmd -f "$CONF" || fail "slurmd failed to start"
  fi
  local state="" waited=0 limit=${LOCAL_SLURM_TIMEOUT:-60}
  while [ "$waited" -lt $((limit * 2)) ]; do
    state=$(node_state)
    case $state in idle | mixed | allocated) break ;; esac
    sleep 0.5
    waited=$((waited + 1))
  done
  case $state in
    idle | mixed | allocated) log "node $(hostname -s) is $state (partition debug)" ;;
    *) fail "the node is '${state:-unknown}' after ${limit}s, not idle" ;;
  esac
  echo "export SLURM_CONF=$CONF"
}

fail() {  # a failed start: show the logs, leave nothing running
  local f
  for f in "$DIR"/log/*.log; do
    [ -s "$f" ] && { echo "--- $f" >&2; tail -n 15 "$f" >&2; }
  done
  stop_daemons quiet
  die "$*"
}

stop_daemons() {
  local name pid pids quiet=${1:-}
  if [ -n "$(pid_of slurmctld)" ] && command -v scancel >/dev/null; then
    scancel --quiet --user=root 2>/dev/null || true
    for _ in $(seq 20); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.25
    done
  fi
  # All at once: each takes a second or two to exit.
  pids=""
  for name in slurmd slurmctld munged; do
    pid=$(pid_of "$name")
    [ -n "$pid" ] || continue
    [ -n "$quiet" ] || log "stopping $name ($pid)"
    kill "$pid" 2>/dev/null || true
    pids="$pids $pid"
  done
  for pid in $pids; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  # Job steps (slurmstepd) outlive slurmd; they carry the mark slurmd had.
  pids=$(marked_pids)
  if [ -n "$pids" ]; then
    [ -n "$quiet" ] || log "stopping leftover processes: $(echo $pids)"
    kill $pids 2>/dev/null || true
    sleep 1
    pids=$(marked_pids)
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
  fi
  rm -f "$DIR"/run/*.pid
}

status() {
  local name pid ok=0
  for name in munged slurmctld slurmd; do
    pid=$(pid_of "$name")
    if [ -n "$pid" ]; then echo "$name: running ($pid)"; else echo "$name: not running"; ok=1; fi
  done
  if [ "$ok" -eq 0 ]; then
    sinfo -N -l 2>&1 || ok=1
    echo "export SLURM_CONF=$CONF"
  fi
  return "$ok"
}

case $cmd in
  start) start ;;
  stop) stop_daemons; log "stopped ($DIR)" ;;
  status) status ;;
  *) usage ;;
esac
