#!/usr/bin/env bash
# Stop the cluster that slurm/local/up.sh started, by the pids it recorded; leaves its state
# folder in place (up.sh reuses it; delete the folder for a clean slate). Jobs still queued or
# running are cancelled first so no task outlives the cluster.
set -uo pipefail

D="$(realpath -m "${SLURM_LOCAL_DIR:-/tmp/dipddpm-slurm}")"
export SLURM_CONF="$D/etc/slurm.conf"

log() { echo "[slurm-local] $*" >&2; }

stop() {  # stop COMM=PIDFILE...: TERM them together, wait up to 15 s, then KILL
    local item name pidfile pid i
    local -A pids=()
    for item in "$@"; do
        name=${item%%=*} pidfile=${item#*=}
        [ -s "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        rm -f "$pidfile"
        # a stale pid file may name an unrelated process by now: only signal the daemon itself
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || continue
        kill -TERM "$pid" 2>/dev/null && pids[$name]=$pid
    done
    for ((i = 0; i < 75; i++)); do
        for name in "${!pids[@]}"; do
            kill -0 "${pids[$name]}" 2>/dev/null || { log "stopped $name (${pids[$name]})"; unset "pids[$name]"; }
        done
        [ ${#pids[@]} = 0 ] && return 0
        sleep 0.2
    done
    for name in "${!pids[@]}"; do
        log "$name (${pids[$name]}) ignored TERM; killing"
        kill -KILL "${pids[$name]}" 2>/dev/null
    done
}

if [ -s "$D/run/slurmctld.pid" ] && [ "$(cat "/proc/$(cat "$D/run/slurmctld.pid")/comm" 2>/dev/null)" = slurmctld ]; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null
        for ((i = 0; i < 50; i++)); do
            [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
fi

# reverse of the start order, daemons that do not depend on each other together
stop slurmd="$D/run/slurmd.pid" slurmctld="$D/run/slurmctld.pid"
stop slurmdbd="$D/run/slurmdbd.pid"
stop mariadbd="$D/mysql/mysqld.pid" munged="$D/munge/munged.pid"
exit 0
