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
    # shellcheck disable=SC2086
    "$PEERS/peers.sh" run $ports
fi
