#!/usr/bin/env bash
# The copies scenario with DKIM signing on: bench/gateway-copies.yaml plus an RSA-2048 and
# an ed25519 key for bench.test, so every copy carries two signatures. Compare with
# bench/copies.sh (signing off) in the same session:
#   bench/copies.sh -n 3000 -c 20 && bench/copies-dkim.sh -n 3000 -c 20
set -euo pipefail
cd "$(dirname "$0")/.."
keys=$(mktemp -d)
trap 'rm -rf "$keys"' EXIT
.venv/bin/mailflowr-gateway dkim keygen --domain bench.test --selector rsa \
    --out "$keys/rsa.key" >/dev/null
.venv/bin/mailflowr-gateway dkim keygen --domain bench.test --selector ed \
    --algorithm ed25519 --out "$keys/ed.key" >/dev/null
.venv/bin/python - "$keys" <<'PY'
import os, sys, yaml
keys = sys.argv[1]
config = yaml.safe_load(open("bench/gateway-copies.yaml"))
# written elsewhere: the paths it reads from bench/ become absolute
config["database"]["url"] = "sqlite:///" + os.path.abspath("bench/var/copies.db")
config["policies"]["directory"] = os.path.abspath("bench/policies")
config["dkim"] = {"keys": [
    {"domain": "bench.test", "selector": "rsa", "key_file": f"{keys}/rsa.key"},
    {"domain": "bench.test", "selector": "ed", "algorithm": "ed25519-sha256",
     "key_file": f"{keys}/ed.key"}]}
yaml.safe_dump(config, open(f"{keys}/gateway.yaml", "w"))
PY
(   # a subshell: start_gateway's EXIT trap stops the gateway and peers when it ends
    . bench/gateway.sh
    start_gateway "$keys/gateway.yaml" aiosmtpd
    .venv/bin/python bench/copies.py "$@"
)
