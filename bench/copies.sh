#!/usr/bin/env bash
# The copies scenario: start the durable aiosmtpd sink of ../shared/peers (2527) as the
# relay, the gateway with bench/gateway-copies.yaml (2525), and run bench/copies.py.
#   bench/copies.sh [-n 3000] [-c 20] [--size 4096] [--rate 150]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/gateway.sh
start_gateway bench/gateway-copies.yaml aiosmtpd
.venv/bin/python bench/copies.py "$@"
