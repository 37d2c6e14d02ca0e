#!/usr/bin/env bash
# Start the gateway on 127.0.0.1:2525 with bench/gateway-bench.yaml, start the reference
# peers (Postfix 2526, aiosmtpd sink 2527, Haraka 2528 if installed) from
# ../shared/peers, and load them all with Postfix's smtp-source in one run.
#   bench/compare.sh            # peers.sh run: 1/20/100 sessions x 4 KiB/100 KiB, 5 reps
#   bench/compare.sh once 20 4096 3000
# Knobs of peers.sh (REPS, CONCS, SIZES, MSGS_SMALL, MSGS_LARGE, SETTLE) pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
# Seconds of quiet after each run (peers.sh waits for Postfix's queue to empty, then
# this). The gateway processes what it accepted once the burst pauses (pipeline.burst_delay):
# 3.5-4 s for 3,000 messages of 4 KiB, 2.5-3.5 s for 1,000 of 100 KiB. Less, and that went
# on during the next server's run, taking that server's CPU.
export SETTLE=${SETTLE:-8}
. bench/gateway.sh
start_gateway bench/gateway-bench.yaml postfix aiosmtpd haraka   # Haraka only if installed
ports="2525 2526 2527"
(echo > /dev/tcp/127.0.0.1/2528) 2>/dev/null && ports="$ports 2528"
if [ "${1:-run}" = once ]; then
    shift
    for port in $ports; do
        echo "port $port: $("$PEERS/peers.sh" once "$port" "$@")"
    done
else
    # The gateway processes what it accepted after its run; that must not overlap the
    # next server's run. Twice a second, while smtp-source loads another port, count
    # the gateway's messages not processed yet (needs the sqlite3 command).
    watch_overlap() {
        local target n
        while kill -0 $$ 2>/dev/null && sleep 0.5; do
            target=$(pgrep -a smtp-source | grep -o '127\.0\.0\.1:[0-9]*' | head -1) || continue
            [ "$target" = 127.0.0.1:2525 ] && continue
            n=$(sqlite3 bench/var/gateway.db \
                "select count(*) from messages where status='received'" 2>/dev/null) || continue
            [ "${n:-0}" -gt 0 ] && echo "$target $n" >>bench/var/overlap
        done
    }
    watcher=
    if command -v sqlite3 >/dev/null; then watch_overlap & watcher=$!; fi
    # shellcheck disable=SC2086
    "$PEERS/peers.sh" run $ports
    if [ -n "$watcher" ]; then
        kill "$watcher" 2>/dev/null || true
        if [ -s bench/var/overlap ]; then
            echo "WARNING: the gateway was still processing during another server's run" \
                 "(port, messages waiting): $(sort -u bench/var/overlap | head -5 | tr '\n' ' ')"
        else
            echo "the gateway had processed everything before each other server's run"
        fi
    else
        echo "(install sqlite3 to check that the gateway's processing did not overlap other runs)"
    fi
fi
