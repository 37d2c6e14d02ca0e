#!/usr/bin/env bash
# The copies job end to end beside Postfix (../shared/peers/e2e.sh): every message gets a
# Cc and a Bcc copy relayed to the counting smtp-sink on 127.0.0.1:2529, timed from the
# first connection until the last copy is out.  Runs alternate in one session:
#   bench/e2e.sh [plain|auth] [SIZE] [N] [PAIRS] [TREE...]
#   bench/e2e.sh plain 4096 3000 3                # Postfix, this checkout; 3 rounds
#   bench/e2e.sh plain 4096 3000 5 . /tmp/base    # Postfix, this checkout, another build
# A round runs Postfix and each TREE (a checkout with its .venv) once; every other round in
# reverse order, so that neither side always runs first.  Each gateway run starts a fresh
# daemon (bench/gateway-copies.yaml with the relay on the sink, SQLite in a temporary
# directory) and stops it afterwards.  In auth mode the gateway checks DKIM/SPF/ARC/DMARC
# inbound (the DNS of e2e.sh on 127.0.0.1:53) and SRS-rewrites, ARC-seals and DKIM-signs
# every copy with e2e.sh's RSA-2048 key for bench.test.
# In plain mode the gateway's checks of inbound mail are off, as plain Postfix has none
# (E2E_CHECKS=on keeps the shipped defaults: DKIM, SPF, ARC, DMARC against the machine's DNS).
# E2E_GATEWAY_ENV: extra environment for the daemon (e.g. MAILFLOWR_PIPELINE__BURST_DELAY=0).
# PROFILE=DIR: py-spy records each gateway run's processes into DIR.
# RATE=R: offer the N messages at R msgs/s (open loop: a steady flow, not a burst) with
# bench/copies.py, which prints the latency from each 250 to the record of its last copy
# and the backlog over time; gateway runs only (Postfix has no such record).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-plain} SIZE=${2:-4096} N=${3:-3000} PAIRS=${4:-3}
shift $(( $# < 4 ? $# : 4 ))
TREES=("$@")
[ ${#TREES[@]} -gt 0 ] || TREES=(.)
E2E=${PEERS_DIR:-../shared/peers}/e2e.sh
AUTH_DIR=/etc/postfix-e2e-auth
work=$(mktemp -d)
gateway_pid=
cleanup() {
    [ -z "$gateway_pid" ] || { kill -TERM "$gateway_pid" 2>/dev/null; wait "$gateway_pid" 2>/dev/null; }
    rm -rf "$work"
}
trap cleanup EXIT

"$E2E" start "$MODE" >/dev/null
if [ "$MODE" = auth ]; then
    head -c 24 /dev/urandom | base64 >"$work/srs.secret"
    chmod 600 "$work/srs.secret"
fi
python3 - "$work" "$MODE" "$AUTH_DIR" <<'PY'
import os, sys, yaml
work, mode, auth_dir = sys.argv[1:4]
config = yaml.safe_load(open("bench/gateway-copies.yaml"))
config["delivery"]["relay"] = "127.0.0.1:2529"
config["database"]["url"] = f"sqlite:///{work}/gateway.db"
config["policies"]["directory"] = os.path.abspath("bench/policies")
if mode == "plain":  # as plain Postfix: no DKIM, SPF, ARC or DMARC checks of inbound mail
    config["auth"] = {"verify_dkim": False, "check_spf": False, "check_arc": False,
                      "check_dmarc": False}
if os.environ.get("E2E_CHECKS") == "on":
    config.pop("auth", None)
if mode == "auth":
    config["delivery"]["dns_servers"] = ["127.0.0.1:53"]
    config["dkim"] = {"keys": [{"domain": "bench.test", "selector": "s1",
                                "key_file": f"{auth_dir}/dkim/bench.private"}]}
    config["srs"] = {"secret_file": f"{work}/srs.secret"}
yaml.safe_dump(config, open(f"{work}/gateway.yaml", "w"))
PY
pending="sqlite3 $work/gateway.db \"select (select count(*) from messages where status='received') + (select count(*) from deliveries where status!='sent')\""

cpu_of() { # PID: CPU seconds of the process, then of each of its children with their own
    # children (live), from /proc; the children the zygote forked count as the daemon's
    python3 - "$1" <<'PY'
import os, sys
tick = os.sysconf("SC_CLK_TCK")
def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / tick
def kids(pid):
    return sorted((int(k) for task in os.listdir(f"/proc/{pid}/task")
                   for k in open(f"/proc/{pid}/task/{task}/children").read().split()))
def named(pid):
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()
def tree(pid):
    return cpu(pid) + sum(tree(k) for k in kids(pid))
pid = int(sys.argv[1])
own, children = cpu(pid), []
for k in kids(pid):
    if named(k) == "mailflowr-forks":  # the zygote: its CPU is the daemon's, its children
        own += cpu(k)                  # the daemon's processes
        children += kids(k)
    else:
        children.append(k)
print(own, *(tree(k) for k in children))
PY
}

run_gateway() { # TREE
    local tree=$1 line
    rm -f "$work"/gateway.db*
    (cd "$tree" && exec env ${E2E_GATEWAY_ENV:-} MAILFLOWR_PRIVACY__KEY_FILE="$work/privacy.key" \
        .venv/bin/mailflowr-gateway serve --config "$work/gateway.yaml" \
        >>"$work/gateway.log" 2>&1) &
    gateway_pid=$!
    for _ in $(seq 1 200); do
        (echo >/dev/tcp/127.0.0.1/2525) 2>/dev/null && break
        sleep 0.1
    done
    local spies=()
    if [ -n "${PROFILE:-}" ]; then
        mkdir -p "$PROFILE"
        "$tree/.venv/bin/py-spy" record -r 100 --subprocesses -f raw -p "$gateway_pid" \
            -o "$PROFILE/$(basename "$(realpath "$tree")")-$gateway_pid.txt" >/dev/null 2>&1 &
        spies+=($!)
        sleep 1
    fi
    local before after
    before=$(cpu_of "$gateway_pid")
    if [ -n "${RATE:-}" ]; then
        line=$(.venv/bin/python bench/copies.py --port 2525 --db "sqlite:///$work/gateway.db" \
            -n "$N" -c 20 --size "$SIZE" --rate "$RATE" | sed 's/^/    /') || line="FAILED: $line"
        line=$'\n'"$line"$'\n'
    else
        line=$("$E2E" run-gateway "$SIZE" "$N" "$pending") || line="FAILED: $line"
    fi
    after=$(cpu_of "$gateway_pid")
    for s in "${spies[@]}"; do kill -INT "$s" 2>/dev/null || true; done
    for s in "${spies[@]}"; do wait "$s" 2>/dev/null || true; done
    echo "gateway[$tree] $line  CPU ms/msg main/children $(python3 -c "import sys
b, a, n = sys.argv[1].split(), sys.argv[2].split(), int(sys.argv[3])
print(' / '.join(f'{(float(y) - float(x)) * 1000 / n:.2f}' for x, y in zip(b, a)))" "$before" "$after" "$N")"
    kill -TERM "$gateway_pid" 2>/dev/null
    wait "$gateway_pid" 2>/dev/null || true
    gateway_pid=
}

for ((round = 0; round < PAIRS; round++)); do
    order=(postfix "${TREES[@]}")
    if ((round % 2)); then
        reversed=()
        for ((i = ${#order[@]} - 1; i >= 0; i--)); do reversed+=("${order[i]}"); done
        order=("${reversed[@]}")
    fi
    for side in "${order[@]}"; do
        if [ "$side" = postfix ]; then
            [ -z "${RATE:-}" ] || continue
            echo "postfix $("$E2E" run-postfix "$SIZE" "$N")"
        else
            run_gateway "$side"
        fi
    done
done
