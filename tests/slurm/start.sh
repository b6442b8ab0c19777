#!/usr/bin/env bash
# Start a private single-node SLURM cluster for the test-suite.
#
#   tests/slurm/start.sh STATE_DIR
#
# Installs Debian's slurm-wlm and munge when their daemons are missing, writes
# STATE_DIR/slurm.conf for this host, starts munged, slurmctld and slurmd with
# every socket, pid, log and spool file under STATE_DIR, records the pids of
# what it started in STATE_DIR/pids, waits until the node is idle and prints a
# one-line summary. Nothing is exported globally: callers point the client
# commands at the cluster with SLURM_CONF=STATE_DIR/slurm.conf.
# tests/slurm/stop.sh STATE_DIR stops exactly those pids.
#
# Environment (all optional):
#   ULB_SLURMCTLD_PORT, ULB_SLURMD_PORT  ports (default: 6817/6818, or the next
#                                        free ones when those are taken)
#   ULB_SLURM_WAIT                       seconds to wait for the idle node (60)
#   ULB_SLURM_CRED_EXPIRE                AuthInfo cred_expire, >= 5 (10): a
#                                        requeued job may start again only
#                                        cred_expire + 1 s after the requeue
# Exit codes: 0 up; 1 failed to start (daemon log tails printed, daemons we
# started stopped again); 2 usage; 3 slurm/munge missing and cannot be installed.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 STATE_DIR" >&2
    exit 2
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$1"
STATE="$(cd "$1" && pwd -P)"
chmod 0700 "$STATE"
T0=$(date +%s.%N)
PIDS="$STATE/pids"
CONF="$STATE/slurm.conf"
WAIT_S="${ULB_SLURM_WAIT:-60}"
CRED_EXPIRE="${ULB_SLURM_CRED_EXPIRE:-10}"

log() { echo "slurm/start.sh: $*" >&2; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (runs slurmd/slurmctld as SlurmUser=root)"
    exit 2
fi

# Daemons live in /usr/sbin, which a caller's PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

bin_missing() {
    local b
    for b in munged slurmctld slurmd sinfo sbatch scontrol; do
        command -v "$b" >/dev/null 2>&1 || return 0
    done
    return 1
}

# ---------------------------------------------------------------- install
if bin_missing; then
    if ! command -v apt-get >/dev/null 2>&1; then
        log "slurm/munge are not installed and apt-get is not available to install them"
        exit 3
    fi
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # Keep the packages' postinst from starting the system munged/slurmd/
    # slurmctld services (daemons nobody would stop): a temporary
    # policy-rc.d, only where the machine has none (container images do).
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\n# temporary, tests/slurm/start.sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    APT=(apt-get -q -y -o DPkg::Lock::Timeout=300 install --no-install-recommends slurm-wlm munge)
    if ! "${APT[@]}" >"$STATE/apt.log" 2>&1; then
        log "install failed; running apt-get update and retrying"
        apt-get -q -o DPkg::Lock::Timeout=300 update >>"$STATE/apt.log" 2>&1 || true
        if ! "${APT[@]}" >>"$STATE/apt.log" 2>&1; then
            tail -n 30 "$STATE/apt.log" >&2
            log "apt-get install slurm-wlm munge failed"
            exit 3
        fi
    fi
    if bin_missing; then
        log "slurm-wlm/munge installed but a binary is still missing"
        exit 3
    fi
    if grep -q 'tests/slurm/start.sh' /usr/sbin/policy-rc.d 2>/dev/null; then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
    log "installed in $(elapsed) s"
fi

# ---------------------------------------------------------------- already up?
alive() {  # alive NAME PID: PID runs the program NAME (and is no zombie)
    local stat
    [[ "${2:-}" =~ ^[0-9]+$ ]] || return 1
    stat="$(cat "/proc/$2/stat" 2>/dev/null)" || return 1
    # /proc/PID/stat: "PID (COMM) STATE ..."; a killed daemon can linger as a
    # zombie (Z) when PID 1 is slow to reap it.
    [[ "$stat" == "$2 ($1) "* ]] && [[ "${stat#"$2 ($1) "}" != [ZX]* ]]
}
summary() {
    echo "slurm up in $(elapsed) s: cluster=ulbench node=$NODE cpus=$CPUS mem=${MEM}MB" \
        "ctld_port=$CTLD_PORT slurmd_port=$SLURMD_PORT SLURM_CONF=$CONF"
}
if [[ -s "$PIDS" && -s "$STATE/env" ]]; then
    all=1
    while read -r name pid; do alive "$name" "$pid" || all=0; done <"$PIDS"
    if [[ $all == 1 ]] && [[ "$(SLURM_CONF=$CONF timeout 10 sinfo -h -o %t 2>/dev/null)" == idle* ]]; then
        # shellcheck disable=SC1091
        source "$STATE/env"
        summary
        exit 0
    fi
    log "stale state in $STATE: stopping what is left of it"
    "$HERE/stop.sh" "$STATE" >&2 || true
fi
: >"$PIDS"

# ---------------------------------------------------------------- failure path
fail() {
    log "FAILED: $*"
    local f
    for f in "$STATE"/munged.log "$STATE"/slurmctld.log "$STATE"/slurmd.log; do
        [[ -f "$f" ]] || continue
        echo "----- tail of $f" >&2
        tail -n 25 "$f" >&2
    done
    if [[ -f "$CONF" ]]; then
        echo "----- sinfo / scontrol show node" >&2
        SLURM_CONF=$CONF timeout 5 sinfo -N -l >&2 2>&1 || true
        SLURM_CONF=$CONF timeout 5 scontrol show node >&2 2>&1 || true
    fi
    "$HERE/stop.sh" "$STATE" >&2 || true
    exit 1
}

# ---------------------------------------------------------------- host facts
NODE="$(hostname -s)"
CPUS="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"  # nproc honours OMP_NUM_THREADS, which tests set to 1
MEM_KB="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
MEM=$((MEM_KB * 9 / 10 / 1024))  # a bit under the total, or slurmd drains the node

port_busy() {  # something listens on 127.0.0.1:PORT (or ss says so)
    if command -v ss >/dev/null 2>&1; then
        [[ -n "$(ss -Htln "sport = :$1" 2>/dev/null)" ]] && return 0
    fi
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
pick_port() {  # pick_port START [EXCLUDE]
    local p=$1
    while port_busy "$p" || [[ "$p" == "${2:-}" ]]; do
        p=$((p + 1))
        ((p < 65000)) || fail "no free port found from $1"
    done
    echo "$p"
}
CTLD_PORT="${ULB_SLURMCTLD_PORT:-$(pick_port 6817)}"
SLURMD_PORT="${ULB_SLURMD_PORT:-$(pick_port 6818 "$CTLD_PORT")}"
port_busy "$CTLD_PORT" && fail "port $CTLD_PORT is in use"
port_busy "$SLURMD_PORT" && fail "port $SLURMD_PORT is in use"

# ---------------------------------------------------------------- munge
# The system key (Debian's postinst normally makes it) for anyone using the
# system munged; our own munged runs as root, and munged insists that its key
# is owned by the user it runs as, so it gets a root-owned copy.
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    if id munge >/dev/null 2>&1; then
        chown munge:munge /etc/munge/munge.key
    fi
    chmod 0400 /etc/munge/munge.key
fi
install -m 0400 -o root -g root /etc/munge/munge.key "$STATE/munge.key"
MUNGE_SOCK="$STATE/munge.sock"
if ((${#MUNGE_SOCK} > 100)); then
    fail "state dir path too long for a unix socket: $MUNGE_SOCK"
fi
rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock" "$STATE/munged.pid"
munged --socket="$MUNGE_SOCK" --key-file="$STATE/munge.key" --pid-file="$STATE/munged.pid" \
    --log-file="$STATE/munged.log" --seed-file="$STATE/munged.seed" --num-threads=2 --force \
    </dev/null >>"$STATE/munged.log" 2>&1 || fail "munged did not start"

# wait_pidfile NAME FILE: wait for the daemon's pid file, record the pid.
wait_pidfile() {
    local i pid=""
    for ((i = 0; i < 100; i++)); do
        pid="$(cat "$2" 2>/dev/null || true)"
        pid="${pid//[!0-9]/}"
        if alive "$1" "$pid"; then
            echo "$1 $pid" >>"$PIDS"
            return 0
        fi
        sleep 0.1
    done
    fail "$1 did not write a live pid to $2"
}
wait_pidfile munged "$STATE/munged.pid"
munge --socket="$MUNGE_SOCK" -n </dev/null | unmunge --socket="$MUNGE_SOCK" >/dev/null 2>&1 ||
    fail "munge round trip through $MUNGE_SOCK failed"

# ---------------------------------------------------------------- slurm.conf
mkdir -p "$STATE/ctld" "$STATE/slurmd"
cat >"$CONF" <<EOF
# Written by tests/slurm/start.sh for a private single-node test cluster.
ClusterName=ulbench
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire (job credential lifetime, slurm's minimum 5, default 120 s) also
# holds a requeued job pending with Reason=BeginTime for cred_expire + 1 s.
AuthInfo=socket=$MUNGE_SOCK,cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Finished jobs stay visible to squeue/scontrol for 5 minutes.
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=5
WaitTime=0
UnkillableStepTimeout=60
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
cat >"$STATE/env" <<EOF
NODE=$NODE
CPUS=$CPUS
MEM=$MEM
CTLD_PORT=$CTLD_PORT
SLURMD_PORT=$SLURMD_PORT
EOF

# ---------------------------------------------------------------- slurm daemons
rm -f "$STATE/slurmctld.pid" "$STATE/slurmd.pid"
# -i: ignore state saved by an earlier run in this dir (fresh cluster).
SLURM_CONF=$CONF slurmctld -f "$CONF" -i </dev/null >>"$STATE/slurmctld.out" 2>&1 ||
    fail "slurmctld did not start"
wait_pidfile slurmctld "$STATE/slurmctld.pid"
SLURM_CONF=$CONF slurmd -f "$CONF" -N "$NODE" </dev/null >>"$STATE/slurmd.out" 2>&1 ||
    fail "slurmd did not start"
wait_pidfile slurmd "$STATE/slurmd.pid"

deadline=$(($(date +%s) + WAIT_S))
state=""
while :; do
    state="$(SLURM_CONF=$CONF timeout 10 sinfo -h -o %t 2>/dev/null || true)"
    [[ "$state" == idle* ]] && break
    while read -r name pid; do
        alive "$name" "$pid" || fail "$name (pid $pid) exited"
    done <"$PIDS"
    (($(date +%s) < deadline)) || fail "node not idle after ${WAIT_S} s (sinfo state: '${state}')"
    sleep 0.5
done
summary
