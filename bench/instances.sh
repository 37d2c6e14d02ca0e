#!/usr/bin/env bash
# One gateway instance against two on one PostgreSQL, loaded with Postfix's smtp-source.
#   bench/instances.sh                         # 3 reps, 4 KiB, 40 sessions, 3,000 messages
#   REPS=5 SIZE=100000 MSGS=1000 bench/instances.sh
# Each rep starts from an empty database: first one instance takes all CONC sessions, then
# two instances take CONC/2 each at the same time (one smtp-source per instance). Prints
# accepted messages per second, the gateways' CPU ms per message and the ratio of two to
# one. PG_URL names the server (default: the local one of the test suite).
set -euo pipefail
cd "$(dirname "$0")/.."
PG_URL=${PG_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/test}
REPS=${REPS:-3} SIZE=${SIZE:-4096} CONC=${CONC:-40} MSGS=${MSGS:-3000}
SMTP_SOURCE=/usr/sbin/smtp-source
PROCSTAT=../shared/peers/procstat.py
[ -x "$SMTP_SOURCE" ] || { echo "smtp-source missing: apt-get install postfix" >&2; exit 1; }
[ -x .venv/bin/mailflowr-gateway ] || { echo "install first: see README.md" >&2; exit 1; }
DB=mailflowr_bench_instances
URL=$(.venv/bin/python -c "import sys; from sqlalchemy.engine import make_url; \
print(make_url(sys.argv[1]).set(database='$DB').render_as_string(hide_password=False))" "$PG_URL")
psql_admin() { .venv/bin/python - "$PG_URL" "$1" <<'PY'
import sys
from sqlalchemy import create_engine, text
engine = create_engine(sys.argv[1], isolation_level="AUTOCOMMIT")
with engine.connect() as conn:
    conn.execute(text(sys.argv[2]))
PY
}
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
export MAILFLOWR_DATABASE__URL=$URL

start() { # PORT...: one gateway per port; sets pids
    local port
    for port in "$@"; do
        MAILFLOWR_SMTP__LISTEN=127.0.0.1:$port .venv/bin/mailflowr-gateway serve \
            --config bench/gateway-bench.yaml >>bench/var/instances.log 2>&1 &
        pids+=($!)
    done
    for port in "$@"; do
        for _ in $(seq 1 100); do
            python3 "$PROCSTAT" listener "$port" >/dev/null 2>&1 && break
            sleep 0.1
        done
    done
}
stop_all() { cleanup; pids=(); }
cpu() { # PORT...: CPU seconds of the gateways listening there, summed
    local total=0 port
    for port in "$@"; do
        total=$(python3 -c "print($total + $(python3 "$PROCSTAT" cpu "$(python3 "$PROCSTAT" listener "$port")"))")
    done
    echo "$total"
}
fresh_db() {
    psql_admin "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)"
    psql_admin "CREATE DATABASE \"$DB\""
    .venv/bin/mailflowr-gateway db upgrade --config bench/gateway-bench.yaml >/dev/null
}
run() { # CONC MSGS PORT... -> "wall_s cpu_s": one smtp-source per port, all at once
    local conc=$1 msgs=$2 port t0 t1 c0 c1 sources=()
    shift 2
    for port in "$@"; do  # warm-up, not counted
        "$SMTP_SOURCE" -s 4 -m 100 -l "$SIZE" -f a@bench.test -t b@bench.test "127.0.0.1:$port"
    done
    sleep 1
    c0=$(cpu "$@")
    t0=$(date +%s%N)
    for port in "$@"; do
        "$SMTP_SOURCE" -s "$conc" -m "$msgs" -l "$SIZE" -f a@bench.test -t b@bench.test \
            "127.0.0.1:$port" &
        sources+=($!)
    done
    for port in "${sources[@]}"; do wait "$port"; done
    t1=$(date +%s%N)
    c1=$(cpu "$@")
    python3 -c "print(f'{($t1 - $t0) / 1e9:.3f} {$c1 - $c0:.2f}')"
}

mkdir -p bench/var
: >bench/var/instances.log
results=()
for rep in $(seq 1 "$REPS"); do
    fresh_db
    start 2531
    read -r wall cpu_s < <(run "$CONC" "$MSGS" 2531)
    stop_all
    one="$wall $cpu_s"
    fresh_db
    start 2531 2532
    read -r wall cpu_s < <(run $((CONC / 2)) $((MSGS / 2)) 2531 2532)
    stop_all
    two="$wall $cpu_s"
    results+=("$one $two")
    echo "rep $rep: one instance $(python3 -c "print(f'{$MSGS / ${one% *}:.0f}')") msgs/s," \
         "two $(python3 -c "print(f'{$MSGS / ${two% *}:.0f}')") msgs/s" >&2
done
printf '%s\n' "${results[@]}" | python3 -c "
import statistics, sys
msgs = $MSGS
rows = [list(map(float, line.split())) for line in sys.stdin if line.strip()]
one = statistics.median(msgs / r[0] for r in rows)
two = statistics.median(msgs / r[2] for r in rows)
cpu1 = statistics.median(r[1] / msgs * 1000 for r in rows)
cpu2 = statistics.median(r[3] / msgs * 1000 for r in rows)
print(f'PostgreSQL, {$SIZE} B, {$CONC} sessions in all, {msgs} messages, median of {len(rows)}')
print(f'one instance   {one:6.0f} msgs/s   gateway CPU {cpu1:.2f} ms/msg')
print(f'two instances  {two:6.0f} msgs/s   gateway CPU {cpu2:.2f} ms/msg')
print(f'ratio          {two / one:.2f}x')
"
