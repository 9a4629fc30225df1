#!/usr/bin/env bash
# Stop the one-node Slurm that slurm/local/start.sh DIR started: only the daemons whose pids it
# recorded in DIR, never any other Slurm or munge on the machine. Jobs still running are cancelled
# first, so no job outlives the cluster. Leaves DIR (logs) in place.
set -uo pipefail

DIR=${1:?usage: stop.sh DIR}
export SLURM_CONF="$DIR/slurm.conf"
[ -f "$SLURM_CONF" ] && scancel --quiet --full --user=root 2>/dev/null || true

stop_pid() {  # TERM, then KILL after 10 s
    local file=$1 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}
stop_pid "$DIR/slurmd.pid"
stop_pid "$DIR/slurmctld.pid"
stop_pid "$DIR/munged.pid"
