#!/usr/bin/env bash
# One gateway instance against two on one PostgreSQL, loaded with Postfix's smtp-source.
#   bench/instances.sh                         # 3 reps, 4 KiB, 40 sessions, 3,000 messages
#   REPS=5 SIZE=100000 MSGS=1000 bench/instances.sh
# Each rep starts from an empty database: first one instance takes all CONC sessions, then
# two instances take CONC/2 each at the same time (one smtp-source per instance). Prints
# accepted messages per second, the gateways' CPU ms per message, the ratio of two to
# one, and how busy the machine's cores were during the run: all of them, the gateways
# (acceptance and the pipeline running alongside), PostgreSQL when it runs on this
# machine, and the rest (smtp-source, the kernel's loopback TCP).
# PG_URL names the server (default: the local one of the test suite).
# COPIES=1: the whole copies job instead of acceptance alone: bench/gateway-copies.yaml
# (a Cc and a Bcc copy of each message, relayed to the smtp-sink of
# ../shared/peers/e2e.sh on 127.0.0.1:2529, started here), timed until every copy is sent;
# each run prints the copies the sink took: twice the messages, so none went twice.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_URL=${PG_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/test}
REPS=${REPS:-3} SIZE=${SIZE:-4096} CONC=${CONC:-40} MSGS=${MSGS:-3000}
SMTP_SOURCE=/usr/sbin/smtp-source
CONFIG=bench/gateway-bench.yaml
if [ "${COPIES:-0}" = 1 ]; then
    CONFIG=bench/gateway-copies.yaml
    export MAILFLOWR_DELIVERY__RELAY=127.0.0.1:2529
    ../shared/peers/e2e.sh start plain >/dev/null
fi
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
            --config "$CONFIG" >>bench/var/instances.log 2>&1 &
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
settled() { # until no message waits for the pipeline and every copy is sent
    .venv/bin/python - "$URL" <<'PY'
import sys, time
from sqlalchemy import create_engine, text
engine = create_engine(sys.argv[1])
query = text("SELECT (SELECT count(*) FROM messages WHERE status = 'received')"
             " + (SELECT count(*) FROM deliveries WHERE status != 'sent')")
while True:
    with engine.connect() as conn:
        if conn.execute(query).scalar_one() == 0:
            break
    time.sleep(0.05)
PY
}
sink_copies() { # copies the e2e sink has taken since it started
    ../shared/peers/e2e.sh status | sed -n 's/^copies at the sink since it started: //p'
}
cpu() { # -> "busy gateways postgres": CPU seconds since boot of all cores (outside idle,
    # iowait and steal), of the started gateways with their worker processes, and of the
    # local PostgreSQL's processes; read by one awk, so that it takes next to no time
    local gateways="" postgres p
    for p in "${pids[@]}"; do gateways+=" $p $(pgrep -P "$p" | tr '\n' ' ')"; done
    postgres=$(pgrep -x postgres | tr '\n' ' ' || true)
    awk -v gateways="$gateways" -v postgres="$postgres" '
        function tree(list,    n, i, f, line, a, total) {
            n = split(list, a, " "); total = 0
            for (i = 1; i <= n; i++) {
                f = "/proc/" a[i] "/stat"
                if ((getline line < f) > 0) {  # utime stime cutime cstime
                    sub(/^.*\) /, "", line); split(line, v, " ")
                    total += v[12] + v[13] + v[14] + v[15]
                }
                close(f)
            }
            return total / 100
        }
        BEGIN {
            getline line < "/proc/stat"; split(line, c, " ")
            printf "%.2f %.2f %.2f\n", (c[2] + c[3] + c[4] + c[7] + c[8]) / 100,
                tree(gateways), tree(postgres)
        }'
}
fresh_db() {
    psql_admin "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)"
    psql_admin "CREATE DATABASE \"$DB\""
    .venv/bin/mailflowr-gateway db upgrade --config "$CONFIG" >/dev/null
}
run() { # CONC MSGS PORT... -> "wall_s busy_s gateways_s postgres_s": one smtp-source
    # per port, all at once
    local conc=$1 msgs=$2 port t0 t1 c0 c1 k0=0 sources=()
    shift 2
    for port in "$@"; do  # warm-up, not counted
        "$SMTP_SOURCE" -s 4 -m 100 -l "$SIZE" -f a@bench.test -t b@bench.test "127.0.0.1:$port"
    done
    sleep 1
    [ "${COPIES:-0}" = 1 ] && { settled; k0=$(sink_copies); }
    c0=$(cpu)
    t0=$(date +%s%N)
    for port in "$@"; do
        "$SMTP_SOURCE" -s "$conc" -m "$msgs" -l "$SIZE" -f a@bench.test -t b@bench.test \
            "127.0.0.1:$port" &
        sources+=($!)
    done
    for port in "${sources[@]}"; do wait "$port"; done
    [ "${COPIES:-0}" = 1 ] && settled
    t1=$(date +%s%N)
    c1=$(cpu)
    if [ "${COPIES:-0}" = 1 ]; then  # every copy once: twice the messages, no more
        local want=$((2 * msgs * $#)) got
        for _ in $(seq 1 30); do
            got=$(( $(sink_copies) - k0 )); [ "$got" -ge "$want" ] && break; sleep 0.1
        done
        echo "  $# instance(s): copies at the sink $got of $want" >&2
        [ "$got" -eq "$want" ] || echo "  COPY COUNT MISMATCH: $got copies for $want" >&2
    fi
    python3 -c "print(f'{($t1 - $t0) / 1e9:.3f}', *(f'{b - a:.2f}' for a, b in zip(
        map(float, '$c0'.split()), map(float, '$c1'.split()))))"
}

mkdir -p bench/var
: >bench/var/instances.log
results=()
for rep in $(seq 1 "$REPS"); do
    fresh_db
    start 2531
    read -r one < <(run "$CONC" "$MSGS" 2531)
    stop_all
    fresh_db
    start 2531 2532
    read -r two < <(run $((CONC / 2)) $((MSGS / 2)) 2531 2532)
    stop_all
    results+=("$one $two")
    echo "rep $rep: one instance $(python3 -c "print(f'{$MSGS / ${one%% *}:.0f}')") msgs/s," \
         "two $(python3 -c "print(f'{$MSGS / ${two%% *}:.0f}')") msgs/s" >&2
done
printf '%s\n' "${results[@]}" | python3 -c "
import statistics, sys
msgs = $MSGS
rows = [list(map(float, line.split())) for line in sys.stdin if line.strip()]
job = 'every copy delivered' if '${COPIES:-0}' == '1' else 'acceptance'
print(f'PostgreSQL, {$SIZE} B, {$CONC} sessions in all, {msgs} messages, {job}, '
      f'median of {len(rows)}')
print(f'{\"\":14s} {\"msgs/s\":>6s}  gateway CPU   cores busy of $(nproc): all, gateways, PostgreSQL, rest')
rate, cost = [], []
for name, at in (('one instance', 0), ('two instances', 4)):
    med = lambda f: statistics.median(f(r[at:at + 4]) for r in rows)
    rate.append(med(lambda r: msgs / r[0]))
    cost.append(med(lambda r: r[1] / msgs))  # CPU seconds of the whole machine per message
    busy, gw, pg = (med(lambda r: r[i] / r[0]) for i in (1, 2, 3))
    print(f'{name:14s} {rate[-1]:6.0f} {med(lambda r: r[2] / msgs * 1000):6.2f} ms/msg'
          f'   {busy:.2f}, {gw:.2f}, {pg:.2f}, {busy - gw - pg:.2f}')
print(f'ratio          {rate[1] / rate[0]:.2f}x')
bound = $(nproc) / cost[0]
print(f'at one instance\'s {cost[0] * 1000:.2f} ms of machine CPU per message, $(nproc) cores '
      f'allow at most {bound:.0f} msgs/s: {bound / rate[0]:.2f}x one instance')
"
