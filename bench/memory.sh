#!/usr/bin/env bash
# The whole daemon's memory with 2,000 idle connections after a burst, builds alternating:
#   bench/memory.sh [PAUSE] [ROUNDS] [TREE...]
#   bench/memory.sh                     # this checkout, once, 130 s of quiet
#   bench/memory.sh 130 2 . /tmp/base   # and another build (a checkout with its .venv)
#   bench/memory.sh 10 1                # within the parse workers' 100 s of idleness
# Each run starts a fresh daemon from TREE with its bench/gateway-bench.yaml (SQLite in
# its bench/var), sends 3,000 messages of 4 KiB from 100 sessions (smtp_load.py), waits
# PAUSE seconds, opens 2,000 idle connections (smtp_load.py --idle, which lists the RSS
# and PSS of every process of the daemon) and stops the daemon.  Every other round runs
# the trees in reverse order, so that neither always runs first.
set -euo pipefail
cd "$(dirname "$0")/.."
PAUSE=${1:-130} ROUNDS=${2:-1}
shift $(( $# < 2 ? $# : 2 ))
TREES=("$@")
[ ${#TREES[@]} -gt 0 ] || TREES=(.)
here=$PWD
log=$(mktemp)
gateway_pid=
stop_gateway() {
    [ -z "$gateway_pid" ] || { kill -TERM "$gateway_pid" 2>/dev/null; wait "$gateway_pid" 2>/dev/null || true; }
    gateway_pid=
}
trap 'stop_gateway; rm -f "$log"' EXIT

listening() { (echo >/dev/tcp/127.0.0.1/2525) 2>/dev/null; }

run() { # TREE
    local tree=$1
    if listening; then
        echo "something already listens on 127.0.0.1:2525: stop it first" >&2
        exit 1
    fi
    rm -rf "$tree/bench/var"
    (cd "$tree" && exec .venv/bin/mailflowr-gateway serve --config bench/gateway-bench.yaml \
        >"$log" 2>&1) &
    gateway_pid=$!
    for _ in $(seq 1 200); do listening && break; sleep 0.1; done
    listening || { echo "$tree: the gateway did not listen on 127.0.0.1:2525" >&2; cat "$log" >&2; exit 1; }
    echo "== $tree"
    "$here/.venv/bin/python" "$here/bench/smtp_load.py" --port 2525 -n 3000 -c 100 --size 4096 \
        | grep -E '^(accepted|rate)'
    sleep "$PAUSE"
    "$here/.venv/bin/python" "$here/bench/smtp_load.py" --port 2525 --idle 2000 \
        | grep -Ev '^server RSS'
    stop_gateway
}

for round in $(seq 1 "$ROUNDS"); do
    order=("${TREES[@]}")
    if (( round % 2 == 0 )); then
        order=()
        for (( i=${#TREES[@]}-1; i>=0; i-- )); do order+=("${TREES[$i]}"); done
    fi
    for tree in "${order[@]}"; do run "$tree"; done
done
