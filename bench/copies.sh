#!/usr/bin/env bash
# The copies scenario: start the durable aiosmtpd sink of ../shared/peers (2527) as the
# relay, the gateway with bench/gateway-copies.yaml (2525), and run bench/copies.py.
#   bench/copies.sh [-n 3000] [-c 20] [--size 4096]
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${PEERS_DIR:-../shared/peers}
[ -x .venv/bin/mailflowr-gateway ] || { echo "install first: see README.md" >&2; exit 1; }
"$PEERS/peers.sh" install >/dev/null
"$PEERS/peers.sh" start aiosmtpd
rm -rf bench/var
.venv/bin/mailflowr-gateway serve --config bench/gateway-copies.yaml &
gw=$!
trap 'kill -TERM $gw 2>/dev/null; wait $gw 2>/dev/null; "$PEERS/peers.sh" stop aiosmtpd' EXIT
for _ in $(seq 1 100); do
    (echo > /dev/tcp/127.0.0.1/2525) 2>/dev/null && break
    sleep 0.1
done
.venv/bin/python bench/copies.py "$@"
