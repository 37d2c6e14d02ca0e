#!/usr/bin/env bash
# One burst against a fresh gateway, measured until every message is processed.
#   bench/burst.sh [SIZE] [MSGS] [SESSIONS]     # default 4096 3000 20
#   EXTRA=$'pipeline:\n  burst_delay: 0' bench/burst.sh     # YAML appended to the config
# Prints the burst's rate, how long processing went on after the last 250 ("drain"),
# how busy each of the gateway's processes was during the burst, and their CPU per
# message from the start of the burst until the last message was processed (what
# compare.sh's CPU column leaves out: that column stops with the burst).
# The gateway runs with bench/gateway-bench.yaml on 127.0.0.1:2535 and a database
# of its own in a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-4096}
msgs=${2:-3000}
sessions=${3:-20}
[ -x .venv/bin/mailflowr-gateway ] || { echo "install first: see README.md" >&2; exit 1; }
source=$(command -v smtp-source || echo /usr/sbin/smtp-source)
[ -x "$source" ] || { echo "smtp-source is missing: apt-get install postfix" >&2; exit 1; }
work=$(mktemp -d)
sed -e "s#127.0.0.1:2525#127.0.0.1:2535#" -e "s#sqlite:///var/gateway.db#sqlite:///$work/gateway.db#" \
    -e "s#directory: plain#directory: $PWD/bench/plain#" \
    bench/gateway-bench.yaml >"$work/gateway.yaml"
[ -n "${EXTRA:-}" ] && printf '%s\n' "$EXTRA" >>"$work/gateway.yaml"
.venv/bin/mailflowr-gateway serve --config "$work/gateway.yaml" >"$work/log" 2>&1 &
gateway=$!
# shellcheck disable=SC2064  # the pid and directory are fixed now
trap "kill -TERM $gateway 2>/dev/null; wait $gateway 2>/dev/null; rm -rf $work" EXIT
for _ in $(seq 1 100); do
    (echo >/dev/tcp/127.0.0.1/2535) 2>/dev/null && break
    sleep 0.1
done
sleep 1
worker=$(pgrep -P "$gateway" | head -1)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # clock ticks, user + system
waiting() {
    .venv/bin/python -c "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute(
        \"select count(*) from messages where status = 'received'\").fetchone()[0])" \
        "$work/gateway.db"
}
m0=$(cpu "$gateway"); w0=$(cpu "$worker"); t0=$(date +%s.%N)
"$source" -s "$sessions" -l "$size" -m "$msgs" -f a@bench.test -t b@bench.test 127.0.0.1:2535
m1=$(cpu "$gateway"); w1=$(cpu "$worker"); t1=$(date +%s.%N)
for _ in $(seq 1 1200); do
    [ "$(waiting)" = 0 ] && break
    sleep 0.05
done
m2=$(cpu "$gateway"); w2=$(cpu "$worker"); t2=$(date +%s.%N)
hz=$(getconf CLK_TCK)
python3 - "$msgs" "$t0" "$t1" "$t2" "$m0" "$m1" "$m2" "$w0" "$w1" "$w2" "$hz" <<'EOF'
import sys
n, t0, t1, t2, m0, m1, m2, w0, w1, w2, hz = map(float, sys.argv[1:])
burst, drain = t1 - t0, t2 - t1
print(f"{n / burst:.0f} msgs/s over {burst:.2f} s; processed {drain:.2f} s after the last 250")
print(f"busy during the burst: main process {(m1 - m0) / hz / burst:.0%}, "
      f"worker process {(w1 - w0) / hz / burst:.0%}")
print(f"CPU per message until processed: main {(m2 - m0) / hz / n * 1000:.2f} ms, "
      f"worker {(w2 - w0) / hz / n * 1000:.2f} ms, "
      f"total {(m2 - m0 + w2 - w0) / hz / n * 1000:.2f} ms")
EOF
