#!/usr/bin/env bash
# A SLURM cluster on this machine, for tests and for trying sweeps locally.
#
#   scripts/slurm_cluster.sh start  [STATE_DIR] [NODES]  write slurm.conf, start munge, slurmctld, slurmd
#   scripts/slurm_cluster.sh stop   [STATE_DIR]          stop exactly what was started from STATE_DIR
#   scripts/slurm_cluster.sh status [STATE_DIR]          exit 0 when every node answers, else 1
#
# NODES=1 (default): one node, this machine. NODES>=2: that many nodes, each slurmd in its own
# network namespace with its own address on a bridge (10.233.0.1K), its own hostname (nodeK),
# and a private /etc/hosts naming every node, so jobs see what they see on a real cluster:
# distinct hosts that resolve each other, reachable only over the network. One multi-node
# cluster at a time (the bridge and namespaces have fixed names); it uses its own ports and
# its own munged, so it runs beside a one-node cluster.
#
# Installs nothing: the packages come from `apt-get install -y slurm-wlm munge iproute2`
# (Debian/Ubuntu). Needs root (munge runs as the munge user, the SLURM daemons as root). Every
# daemon writes its pid file into STATE_DIR (default /tmp/testbed-slurm), so `stop` never
# touches other processes. Clients find the cluster through SLURM_CONF=STATE_DIR/slurm.conf,
# which `start` prints.
set -euo pipefail

action=${1:-}
state_dir=${2:-${TESTBED_SLURM_STATE:-/tmp/testbed-slurm}}
nodes=${3:-1}
conf="$state_dir/slurm.conf"
BRIDGE=br-tb
NET=10.233.0

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

need() {
    command -v "$1" >/dev/null 2>&1 || die "$1 not found; install it with: apt-get install -y slurm-wlm munge iproute2"
}

pid_alive() {  # pid_alive PIDFILE
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_count() {  # nodes of the cluster in STATE_DIR, as written by start
    if [[ -s "$state_dir/nodes" ]]; then cat "$state_dir/nodes"; else echo 1; fi
}

all_idle() {  # every configured node answers
    local want up
    want=$(node_count)
    up=$(SLURM_CONF="$conf" sinfo -h -N -o '%T' 2>/dev/null | grep -cE '^(idle|mixed|allocated)' || true)
    [[ "$up" -ge "$want" ]]
}

daemons_alive() {
    local k
    pid_alive "$state_dir/slurmctld.pid" || return 1
    if [[ $(node_count) -eq 1 ]]; then
        pid_alive "$state_dir/slurmd.pid" || return 1
    else
        for k in $(seq "$(node_count)"); do pid_alive "$state_dir/slurmd-node$k.pid" || return 1; done
    fi
}

write_conf() {
    local host cpus mem_mb k
    host=$(hostname -s)
    cpus=$(nproc)
    # Leave a quarter of the free memory to the rest of the machine.
    mem_mb=$(awk '/MemAvailable/ {print int($2 / 1024 * 0.75)}' /proc/meminfo)
    mkdir -p "$state_dir/state" "$state_dir/spool" "$state_dir/log"
    {
        echo "ClusterName=testbed"
        if [[ $nodes -eq 1 ]]; then
            echo "SlurmctldHost=$host"
            echo "AuthType=auth/munge"
            echo "SlurmctldPort=${TESTBED_SLURMCTLD_PORT:-6817}"
            echo "SlurmdPort=${TESTBED_SLURMD_PORT:-6818}"
            echo "SlurmdSpoolDir=$state_dir/spool"
            echo "SlurmdPidFile=$state_dir/slurmd.pid"
            echo "SlurmdLogFile=$state_dir/log/slurmd.log"
        else
            # The controller listens on the bridge; each node's slurmd on its own address.
            echo "SlurmctldHost=$host($NET.1)"
            echo "AuthType=auth/munge"
            echo "AuthInfo=socket=$state_dir/munge/munge.sock"
            echo "SlurmctldPort=${TESTBED_SLURMCTLD_PORT:-6917}"
            echo "SlurmdPort=${TESTBED_SLURMD_PORT:-6918}"
            echo "SlurmdSpoolDir=$state_dir/spool/%n"
            echo "SlurmdPidFile=$state_dir/slurmd-%n.pid"
            echo "SlurmdLogFile=$state_dir/log/slurmd-%n.log"
            # A node whose slurmd stops answering is declared DOWN after this long.
            echo "SlurmdTimeout=30"
        fi
        cat <<EOF
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$state_dir/state
SlurmctldPidFile=$state_dir/slurmctld.pid
SlurmctldLogFile=$state_dir/log/slurmctld.log
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
EOF
        if [[ $nodes -eq 1 ]]; then
            echo "NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
            echo "PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP"
        else
            # The nodes share this machine's cores: each offers one CPU and an equal share of memory.
            for k in $(seq "$nodes"); do
                echo "NodeName=node$k NodeAddr=$NET.1$k CPUs=1 RealMemory=$((mem_mb / nodes)) State=UNKNOWN"
            done
            echo "PartitionName=debug Nodes=node[1-$nodes] Default=YES MaxTime=INFINITE State=UP"
        fi
    } >"$conf"
    echo "$nodes" >"$state_dir/nodes"
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

start_private_munge() {
    # A munged of this cluster only, on a unix socket every namespace reaches (same file system).
    local dir="$state_dir/munge"
    mkdir -p "$dir"
    chmod 755 "$dir"  # slurmd and job steps (root) and munged (munge) all reach the socket
    [[ -s "$dir/munge.key" ]] || mungekey -c -k "$dir/munge.key"
    chown -R munge:munge "$dir"
    chmod 400 "$dir/munge.key"
    runuser -u munge -- /usr/sbin/munged --socket="$dir/munge.sock" --key-file="$dir/munge.key" \
        --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munged.seed"
    for _ in $(seq 50); do
        [[ -s "$dir/munged.pid" ]] && break
        sleep 0.1
    done
    cp "$dir/munged.pid" "$state_dir/munged.pid"
    munge -n -S "$dir/munge.sock" | unmunge -S "$dir/munge.sock" >/dev/null \
        || die "the private munged does not answer; see $dir/munged.log"
}

setup_network() {
    local k
    teardown_network
    ip link add "$BRIDGE" type bridge
    ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    {
        echo "127.0.0.1 localhost"
        echo "$NET.1 $(hostname -s)"
        for k in $(seq "$nodes"); do echo "$NET.1$k node$k"; done
    } >"$state_dir/hosts"
    for k in $(seq "$nodes"); do
        ip netns add "tbns$k"
        ip link add "vtb$k-h" type veth peer name "vtb$k-n"
        ip link set "vtb$k-n" netns "tbns$k"
        ip link set "vtb$k-h" master "$BRIDGE" up
        # The same interface name on every node, as on a real cluster (GLOO_SOCKET_IFNAME=eth0).
        ip -n "tbns$k" link set "vtb$k-n" name eth0
        ip -n "tbns$k" addr add "$NET.1$k/24" dev eth0
        ip -n "tbns$k" link set eth0 up
        ip -n "tbns$k" link set lo up
    done
}

teardown_network() {
    local ns pid
    for ns in $(ip netns list 2>/dev/null | awk '/^tbns[0-9]+/ {print $1}'); do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
}

start_node() {  # start_node K: slurmd in namespace tbnsK, with its own hostname and /etc/hosts
    local k=$1
    mkdir -p "$state_dir/spool/node$k"
    # nsenter, not `ip netns exec`: the latter remounts /sys and slurmd loses the cgroup mounts.
    nsenter --net="/run/netns/tbns$k" unshare --uts --mount --propagation private sh -c \
        'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -f "$3" -N "$1"' \
        sh "node$k" "$state_dir/hosts" "$conf"
}

start() {
    need slurmctld; need slurmd; need sinfo; need munge; need mungekey
    [[ "$nodes" =~ ^[1-9][0-9]?$ ]] || die "NODES must be a whole number from 1 to 99, not '$nodes'"
    mkdir -p "$state_dir"
    if daemons_alive && [[ $(node_count) -eq $nodes ]] && all_idle; then
        echo "already running; use: export SLURM_CONF=$conf"
        return
    fi
    if [[ $nodes -eq 1 ]]; then
        write_conf
        start_munge
        pid_alive "$state_dir/slurmctld.pid" || slurmctld -f "$conf"
        pid_alive "$state_dir/slurmd.pid" || slurmd -f "$conf"
    else
        need ip; need nsenter; need unshare
        # A clean start: no job of an earlier cluster in this folder comes back to life.
        stop_daemons
        rm -rf "$state_dir/state" "$state_dir/spool"
        write_conf
        setup_network
        start_private_munge
        slurmctld -f "$conf"
        for k in $(seq "$nodes"); do start_node "$k"; done
    fi
    for _ in $(seq 150); do
        if all_idle; then
            echo "started; use: export SLURM_CONF=$conf"
            return
        fi
        sleep 0.2
    done
    die "the nodes did not become idle within 30 s; see $state_dir/log/"
}

stop_daemons() {
    local pidfile pid
    for pidfile in "$state_dir"/slurmd*.pid "$state_dir/slurmctld.pid" "$state_dir/munged.pid"; do
        [[ -s "$pidfile" ]] || continue
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$pidfile"
    done
}

stop() {
    stop_daemons
    [[ $(node_count) -gt 1 ]] && teardown_network
    echo "stopped"
}

status() {
    if daemons_alive && all_idle; then
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
    *) die "usage: slurm_cluster.sh start|stop|status [STATE_DIR] [NODES]" ;;
esac
