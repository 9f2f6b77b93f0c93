#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for development and for the test suite.
#
#   slurm/local_cluster.sh start    install slurm-wlm + munge when missing (root), write slurm.conf, start
#                                   munged, slurmctld and two slurmd (node1, node2), wait until both are idle
#   slurm/local_cluster.sh stop     stop the daemons started by `start`
#   slurm/local_cluster.sh status   sinfo of the cluster
#   slurm/local_cluster.sh env      the line to `eval` so sbatch/squeue/srun talk to this cluster
#
# Both nodes have NodeAddr 127.0.0.1 and distinct slurmd ports; process tracking by /proc (no cgroups),
# so it runs in containers too. Everything it writes lives under $BIGSCIENCE_SLURM_DIR.
set -euo pipefail

DIR=${BIGSCIENCE_SLURM_DIR:-/var/tmp/bigscience-slurm}
CONF=$DIR/slurm.conf
NODES=(node1 node2)
CPUS_PER_NODE=${BIGSCIENCE_SLURM_CPUS:-4}

log() { echo "local_cluster: $*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    log "needs root (it installs packages and starts munged as the munge user)"
    exit 77
  fi
}

install_packages() {
  local missing=()
  for cmd in slurmctld slurmd sbatch munged; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing slurm-wlm and munge (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  mkdir -p "$DIR/state" "$DIR/log"
  for node in "${NODES[@]}"; do mkdir -p "$DIR/spool/$node"; done
  local port=17001 node_lines=""
  for node in "${NODES[@]}"; do
    node_lines+="NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$(hostname) Port=$port CPUs=$CPUS_PER_NODE RealMemory=4000 State=UNKNOWN"$'\n'
    port=$((port + 1))
  done
  cat >"$CONF.tmp" <<EOF
# Written by slurm/local_cluster.sh: two nodes on one machine.
ClusterName=bigscience-dev
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
KillWait=10
InactiveLimit=0
MessageTimeout=20
SlurmdTimeout=120
$node_lines
PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  mv "$CONF.tmp" "$CONF"
}

start_munge() {
  if pgrep -x munged >/dev/null; then return 0; fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown -R munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge
  chmod 0700 /etc/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0755 /run/munge
  runuser -u munge -- munged
}

# A daemon killed without cleanup can stay a zombie (nothing reaps it in a container): not alive.
alive() {
  [ -s "$1" ] || return 1
  local state
  state=$(awk '{print $3}' "/proc/$(cat "$1")/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

start() {
  need_root
  install_packages
  write_conf
  start_munge
  # A controller that is not running died with its cluster (a stop, a crash, a machine restart): its
  # saved jobs have no processes left, and recovering them would keep the nodes busy. -c starts clean.
  alive "$DIR/slurmctld.pid" || slurmctld -c -f "$CONF"
  for node in "${NODES[@]}"; do
    alive "$DIR/slurmd-$node.pid" || slurmd -c -f "$CONF" -N "$node"
  done
  local deadline=$((SECONDS + 60))
  until [ "$(SLURM_CONF=$CONF sinfo -h -o '%t' 2>/dev/null | sort -u | tr -d '\n')" = "idle" ]; do
    if [ $SECONDS -ge $deadline ]; then
      log "nodes not idle after 60 s; logs in $DIR/log"
      SLURM_CONF=$CONF sinfo -N >&2 || true
      tail -n 20 "$DIR"/log/*.log >&2 || true
      exit 1
    fi
    sleep 1
  done
  log "two nodes up ($CONF)"
}

stop() {
  local pidfile
  for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"; do
    if alive "$pidfile"; then kill "$(cat "$pidfile")"; fi
  done
  for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"; do
    for _ in $(seq 50); do alive "$pidfile" || break; sleep 0.2; done
    rm -f "$pidfile"
  done
  log "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF=$CONF sinfo -N ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
