#!/usr/bin/env bash
# A real SLURM cluster on this one host, for the SLURM tests (tests/slurm) and for trying the sbatch scripts:
#   sudo scripts/slurm_cluster.sh start    # install munge + slurm-wlm if missing, write /etc/slurm/slurm.conf, start
#   sudo scripts/slurm_cluster.sh status   # the daemons this script started, and `sinfo`
#   sudo scripts/slurm_cluster.sh stop     # stop them (munged too, if this script started it)
#   scripts/slurm_cluster.sh running       # exit code 0 when this script's cluster runs with the config it would write
# Idempotent: `start` on a running cluster with the same config does nothing; with another config (another
# SLURM_LOCAL_NODES) it restarts the daemons. Root only (slurmd runs jobs as their users).
#
# The cluster: SLURM_LOCAL_NODES slurmd daemons on this host (default 2: "<host>-1" and "<host>-2", each announcing
# all of this host's CPUs, so a 2-node job is possible; Debian's SLURM is built with multiple-slurmd support),
# or with SLURM_LOCAL_NODES=1 a single node named $(hostname -s); one partition `local`, every node in it;
# ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, select/cons_tres with CR_Core, no accounting database
# (`scontrol show job` keeps finished jobs for MinJobAge=600 s; no sacct). A requeued job may start again 5 s later
# (cred_expire, default 120 s) and the scheduler looks every second, so preemption tests take seconds, not minutes.
# State, logs and pid files live in SLURM_LOCAL_DIR (default /var/lib/rlhf-slurm); it refuses to overwrite an
# /etc/slurm/slurm.conf that it did not write.
set -euo pipefail

ACTION=${1:-start}
DIR=${SLURM_LOCAL_DIR:-/var/lib/rlhf-slurm}
NODES=${SLURM_LOCAL_NODES:-2}
CONF=/etc/slurm/slurm.conf
MARK="# written by rlhf scripts/slurm_cluster.sh"
HOST=$(hostname -s)
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # this process's CPUs (nproc would follow OMP_NUM_THREADS)

say() { echo "slurm_cluster: $*"; }
die() { echo "slurm_cluster: $*" >&2; exit 1; }

node_names() {
  if [ "$NODES" = 1 ]; then echo "$HOST"; else for i in $(seq 1 "$NODES"); do echo "$HOST-$i"; done; fi
}

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || die "munge and slurm-wlm are not installed, and installing them needs root"
  command -v apt-get >/dev/null || die "munge and slurm-wlm are not installed, and this is not a Debian/Ubuntu host"
  say "installing munge and slurm-wlm (about a minute)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq munge slurm-wlm >/dev/null
}

config() {
  local i port
  cat <<EOF
$MARK: a single-host cluster for tests; \`scripts/slurm_cluster.sh stop\` stops it.
ClusterName=rlhf-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=1,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=600
KillWait=30
EOF
  i=0
  for name in $(node_names); do
    port=$((17001 + i)); i=$((i + 1))
    echo "NodeName=$name NodeHostname=$HOST Port=$port CPUs=$CPUS State=UNKNOWN"
  done
  echo "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

daemons_alive() {
  alive "$DIR/slurmctld.pid" || return 1
  for name in $(node_names); do alive "$DIR/slurmd-$name.pid" || return 1; done
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  munge_works && return
  [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; }
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 1 50); do munge_works && break; sleep 0.1; done
  munge_works || die "munged did not start (see /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$DIR/munged.pid"  # ours: `stop` stops it
}

wait_idle() {
  local want state
  want=$(node_names | wc -l)
  for _ in $(seq 1 150); do
    state=$(sinfo -h -N -o '%N %T' 2>/dev/null || true)
    if [ "$(grep -c ' idle$' <<<"$state" || true)" -ge "$want" ]; then
      say "ready: $(node_names | tr '\n' ' ')(partition local, $CPUS CPUs each)"
      return
    fi
    # A node left down or drained by an earlier run of the cluster comes back.
    { grep -E ' (down|drain|drained|draining)' <<<"$state" || true; } | cut -d' ' -f1 | sort -u | while read -r name; do
      scontrol update NodeName="$name" State=RESUME 2>/dev/null || true
    done
    sleep 0.2
  done
  die "the nodes did not become idle; sinfo: $(sinfo -N 2>&1 | tr '\n' ';'); see $DIR/log/"
}

stop() {
  local f
  for f in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/munged.pid"; do
    [ -f "$f" ] || continue
    if alive "$f"; then
      kill "$(cat "$f")"
      for _ in $(seq 1 100); do alive "$f" || break; sleep 0.1; done
    fi
    rm -f "$f"
  done
}

start() {
  install
  [ "$(id -u)" = 0 ] || die "starting slurmctld and slurmd needs root"
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script (a real cluster's config?); not touching it"
  fi
  mkdir -p "$DIR/state" "$DIR/log" /etc/slurm
  local wanted
  wanted=$(config)
  if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$wanted" ] && daemons_alive; then
    say "already running"
    wait_idle
    return
  fi
  stop
  printf '%s\n' "$wanted" >"$CONF"
  for name in $(node_names); do mkdir -p "$DIR/spool/$name"; done
  start_munge
  slurmctld -c -f "$CONF"  # -c: a fresh start, no jobs left from an earlier run
  for name in $(node_names); do slurmd -f "$CONF" -N "$name"; done
  wait_idle
}

case "$ACTION" in
  start) start ;;
  stop) stop; say "stopped" ;;
  status)
    for f in "$DIR"/*.pid; do [ -f "$f" ] && { alive "$f" && echo "$(basename "$f" .pid): running (pid $(cat "$f"))" || echo "$(basename "$f" .pid): not running"; }; done
    sinfo -N 2>&1 || true ;;
  running) [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$(config)" ] && daemons_alive ;;
  config) config ;;
  *) die "usage: $0 start|stop|status|running|config" ;;
esac
