#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests and for trying sweeps locally.
#
#   scripts/slurm_cluster.sh start  [STATE_DIR]   write slurm.conf, start munge, slurmctld, slurmd
#   scripts/slurm_cluster.sh stop   [STATE_DIR]   stop exactly the daemons started from STATE_DIR
#   scripts/slurm_cluster.sh status [STATE_DIR]   exit 0 when the node answers, else 1
#
# Installs nothing: the packages come from `apt-get install -y slurm-wlm munge` (Debian/Ubuntu).
# Needs root (munge runs as the munge user, the SLURM daemons as root). Every daemon writes its
# pid file into STATE_DIR (default /tmp/testbed-slurm), so `stop` never touches other processes.
# Clients find the cluster through SLURM_CONF=STATE_DIR/slurm.conf, which `start` prints.
set -euo pipefail

action=${1:-}
state_dir=${2:-${TESTBED_SLURM_STATE:-/tmp/testbed-slurm}}
conf="$state_dir/slurm.conf"

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

need() {
    command -v "$1" >/dev/null 2>&1 || die "$1 not found; install it with: apt-get install -y slurm-wlm munge"
}

pid_alive() {  # pid_alive PIDFILE
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_idle() {
    SLURM_CONF="$conf" sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'
}

write_conf() {
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    # Leave a quarter of the free memory to the rest of the machine.
    mem_mb=$(awk '/MemAvailable/ {print int($2 / 1024 * 0.75)}' /proc/meminfo)
    mkdir -p "$state_dir/state" "$state_dir/spool" "$state_dir/log"
    cat >"$conf" <<EOF
ClusterName=testbed
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${TESTBED_SLURMCTLD_PORT:-6817}
SlurmdPort=${TESTBED_SLURMD_PORT:-6818}
StateSaveLocation=$state_dir/state
SlurmdSpoolDir=$state_dir/spool
SlurmctldPidFile=$state_dir/slurmctld.pid
SlurmdPidFile=$state_dir/slurmd.pid
SlurmctldLogFile=$state_dir/log/slurmctld.log
SlurmdLogFile=$state_dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
KillWait=30
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    # One munged serves the whole machine; start it only when none answers.
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /etc/munge /var/log/munge /run/munge /var/lib/munge
    [[ -s /etc/munge/munge.key ]] || mungekey -c
    chown -R munge:munge /etc/munge /var/log/munge /run/munge /var/lib/munge
    chmod 400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    # munged's pid lives in /run/munge (owned by munge); remember that this script started it.
    for _ in $(seq 50); do
        [[ -s /run/munge/munged.pid ]] && break
        sleep 0.1
    done
    cp /run/munge/munged.pid "$state_dir/munged.pid"
    munge -n | unmunge >/dev/null || die "munge does not answer after start; see /var/log/munge/munged.log"
}

start() {
    need slurmctld; need slurmd; need sinfo; need munge; need mungekey
    mkdir -p "$state_dir"
    if pid_alive "$state_dir/slurmctld.pid" && pid_alive "$state_dir/slurmd.pid" && node_idle; then
        echo "already running; use: export SLURM_CONF=$conf"
        return
    fi
    write_conf
    start_munge
    pid_alive "$state_dir/slurmctld.pid" || slurmctld -f "$conf"
    pid_alive "$state_dir/slurmd.pid" || slurmd -f "$conf"
    for _ in $(seq 150); do
        if node_idle; then
            echo "started; use: export SLURM_CONF=$conf"
            return
        fi
        sleep 0.2
    done
    die "the node did not become idle within 30 s; see $state_dir/log/"
}

stop() {
    local name pidfile pid
    for name in slurmd slurmctld munged; do
        pidfile="$state_dir/$name.pid"
        [[ -s "$pidfile" ]] || continue
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$pidfile"
    done
    echo "stopped"
}

status() {
    if pid_alive "$state_dir/slurmctld.pid" && pid_alive "$state_dir/slurmd.pid" && node_idle; then
        echo "running; SLURM_CONF=$conf"
    else
        echo "not running"
        return 1
    fi
}

case "$action" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: slurm_cluster.sh start|stop|status [STATE_DIR]" ;;
esac
