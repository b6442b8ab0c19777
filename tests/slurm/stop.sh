#!/usr/bin/env bash
# Stop the private cluster that tests/slurm/start.sh STATE_DIR started.
#
#   tests/slurm/stop.sh STATE_DIR
#
# Cancels the cluster's jobs, then stops exactly the daemons recorded in
# STATE_DIR/pids (TERM, then KILL after a few seconds), each only while its pid
# is still the program that was recorded. Never kills by name.
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 STATE_DIR" >&2
    exit 2
fi
STATE="$1"
PIDS="$STATE/pids"
CONF="$STATE/slurm.conf"
export PATH="$PATH:/usr/sbin:/sbin"
[[ -s "$PIDS" ]] || exit 0

alive() {  # alive NAME PID: PID runs the program NAME (and is no zombie)
    local stat
    [[ "${2:-}" =~ ^[0-9]+$ ]] || return 1
    stat="$(cat "/proc/$2/stat" 2>/dev/null)" || return 1
    # /proc/PID/stat: "PID (COMM) STATE ..."; a killed daemon can linger as a
    # zombie (Z) when PID 1 is slow to reap it.
    [[ "$stat" == "$2 ($1) "* ]] && [[ "${stat#"$2 ($1) "}" != [ZX]* ]]
}

# Jobs first, while slurmctld and slurmd still run, so that no slurmstepd or job
# process of this cluster outlives it.
if [[ -f "$CONF" ]] && alive slurmctld "$(awk '$1 == "slurmctld" {print $2}' "$PIDS")"; then
    jobs="$(SLURM_CONF=$CONF timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ')"
    if [[ -n "${jobs// /}" ]]; then
        # shellcheck disable=SC2086
        SLURM_CONF=$CONF timeout 10 scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            left="$(SLURM_CONF=$CONF timeout 5 squeue -h -t R,CG,S -o %i 2>/dev/null)"
            [[ -z "$left" ]] && break
            sleep 0.2
        done
    fi
fi

# Reverse start order: slurmd, slurmctld, munged.
mapfile -t entries < <(tac "$PIDS")
for entry in "${entries[@]}"; do
    read -r name pid <<<"$entry"
    alive "$name" "$pid" && kill -TERM "$pid" 2>/dev/null
done
for entry in "${entries[@]}"; do
    read -r name pid <<<"$entry"
    for ((i = 0; i < 50; i++)); do
        alive "$name" "$pid" || break
        sleep 0.1
    done
    if alive "$name" "$pid"; then
        echo "slurm/stop.sh: $name ($pid) ignored TERM; sending KILL" >&2
        kill -KILL "$pid" 2>/dev/null
    fi
done
: >"$PIDS"
exit 0
