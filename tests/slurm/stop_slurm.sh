#!/usr/bin/env bash
# Stop the test cluster started by tests/slurm/start_slurm.sh [DIR]: slurmd, slurmctld, munged,
# each by the pid in its pid file under DIR. Leaves DIR (config and logs) for inspection.
set -uo pipefail

DIR="${1:-${ZEROFORGE_SLURM_DIR:-/tmp/zeroforge-slurm}}"
[ -d "$DIR" ] || exit 0

stop() {  # stop NAME: TERM the pid in DIR/NAME.pid, KILL it after 10 s
    local pidfile="$DIR/$1.pid" pid
    [ -f "$pidfile" ] || return 0
    pid="$(cat "$pidfile")"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
}

# Jobs still running belong to this test cluster; end them before their slurmd goes away.
if [ -f "$DIR/slurm.conf" ] && [ -f "$DIR/slurmctld.pid" ]; then
    SLURM_CONF="$DIR/slurm.conf" scancel --full --signal=KILL --user=root 2>/dev/null || true
    SLURM_CONF="$DIR/slurm.conf" scancel --user=root 2>/dev/null || true
fi
stop slurmd
stop slurmctld
stop munged
echo "stop_slurm: stopped (config and logs remain in $DIR)" >&2
