# Sourced by the bench scripts: start_gateway CONFIG PEER... starts those reference peers
# of ../shared/peers and the gateway on 127.0.0.1:2525 with CONFIG, waits until it
# listens, and stops both when the calling script exits.
PEERS=${PEERS_DIR:-../shared/peers}

start_gateway() {
    local config=$1
    shift
    [ -x .venv/bin/mailflowr-gateway ] || { echo "install first: see README.md" >&2; exit 1; }
    "$PEERS/peers.sh" install >/dev/null
    "$PEERS/peers.sh" start "$@"
    rm -rf bench/var
    .venv/bin/mailflowr-gateway serve --config "$config" &
    gateway_pid=$!
    # shellcheck disable=SC2064  # the peers are fixed now
    trap "kill -TERM $gateway_pid 2>/dev/null; wait $gateway_pid 2>/dev/null; \"$PEERS/peers.sh\" stop $*" EXIT
    for _ in $(seq 1 100); do
        (echo > /dev/tcp/127.0.0.1/2525) 2>/dev/null && return 0
        sleep 0.1
    done
    echo "the gateway did not listen on 127.0.0.1:2525" >&2
    exit 1
}
