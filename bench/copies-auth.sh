#!/usr/bin/env bash
# The cost of mail authentication end to end: the copies scenario (bench/copies.py) with
# every inbound message DKIM-signed (RSA-2048) by author.test, sent from author.test, and
# a DNS test zone on loopback publishing its key, SPF (pass for 127.0.0.1) and DMARC
# (p=reject). Run both in one session and compare:
#   bench/copies-auth.sh off -n 3000 -c 20   # no checks of inbound mail, no signing
#   bench/copies-auth.sh on -n 3000 -c 20    # DKIM, SPF, ARC and DMARC checks; every
#                                            # copy SRS-rewritten, ARC-sealed, DKIM-signed
# and, to see where the cost is, "verify" (the checks only) or "sign" (the copies only).
# AUTH_WORKERS=N sets auth.workers (the processes that check, seal and sign; default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: bench/copies-auth.sh off|verify|sign|on [copies.py options]}
shift
work=$(mktemp -d)
zone_pid=
trap 'rm -rf "$work"; [ -z "$zone_pid" ] || kill "$zone_pid" 2>/dev/null' EXIT
for key in author:author.test bench:bench.test; do
    .venv/bin/mailflowr-gateway dkim keygen --domain "${key#*:}" --selector s1 \
        --out "$work/${key%%:*}.key" | awk '/ IN TXT / {print}' >"$work/${key%%:*}.zone"
done
head -c 24 /dev/urandom | base64 >"$work/srs.secret"
chmod 600 "$work/srs.secret"
.venv/bin/python - "$work" "$mode" <<'PY'
import os, sys, yaml
work, mode = sys.argv[1], sys.argv[2]
config = yaml.safe_load(open("bench/gateway-copies.yaml"))
# written elsewhere: the paths it reads from bench/ become absolute
config["database"]["url"] = "sqlite:///" + os.path.abspath("bench/var/copies.db")
config["policies"]["directory"] = os.path.abspath("bench/policies")
config["delivery"]["dns_servers"] = ["127.0.0.1:5399"]
config["auth"] = {"workers": int(os.environ.get("AUTH_WORKERS", "1"))}
if mode in ("on", "sign"):
    config["dkim"] = {"keys": [{"domain": "bench.test", "selector": "s1",
                                "key_file": f"{work}/bench.key"}]}
    config["srs"] = {"secret_file": f"{work}/srs.secret"}
if mode in ("off", "sign"):
    config["auth"].update(verify_dkim=False, check_spf=False, check_arc=False,
                          check_dmarc=False)
yaml.safe_dump(config, open(f"{work}/gateway.yaml", "w"))
PY
.venv/bin/python - "$work" <<'PY' &
import re, sys, time
sys.path.insert(0, ".")
from tests.dns_server import ZoneServer, txt
work = sys.argv[1]
zone = {("author.test", "TXT"): txt("v=spf1 ip4:127.0.0.0/8 -all"),
        ("_dmarc.author.test", "TXT"): txt("v=DMARC1; p=reject")}
for name in ("author", "bench"):
    line = open(f"{work}/{name}.zone").read()
    zone[(f"s1._domainkey.{name}.test", "TXT")] = txt("".join(re.findall(r'"([^"]*)"', line)))
ZoneServer(zone, port=5399)  # the port the configuration above names
time.sleep(3600)
PY
zone_pid=$!
(   # a subshell: start_gateway's EXIT trap stops the gateway and peers when it ends
    . bench/gateway.sh
    start_gateway "$work/gateway.yaml" aiosmtpd
    .venv/bin/python bench/copies.py --sender bench@author.test \
        --sign-key "$work/author.key:author.test:s1" "$@"
)
