#!/usr/bin/env bash
# Starts one peer server on loopback for reach-loadtest, in the background; its PID goes to
# loadtest/peers/run/<peer>.pid (give it to the harness as --server-pid) and its log to
# loadtest/peers/run/<peer>.log. Stop it with stop.sh.
#
#   loadtest/peers/start.sh soketi    [--cpus LIST]   ws://127.0.0.1:6001/app/<key> (Pusher)
#   loadtest/peers/start.sh mosquitto [--cpus LIST]   mqtt://127.0.0.1:18830
#
# --cpus pins the server with taskset -c, like reach-loadtest's --server-cpus for reachd.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
run="$here/run"
peer="${1:-}"; shift || true
cpus=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpus) cpus="$2"; shift 2 ;;
    --cpus=*) cpus="${1#--cpus=}"; shift ;;
    *) echo "start.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
pin=()
[ -n "$cpus" ] && pin=(taskset -c "$cpus")
mkdir -p "$run"
pidfile="$run/$peer.pid"
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  echo "start.sh: $peer already runs (pid $(cat "$pidfile")); stop.sh $peer first" >&2
  exit 1
fi
# As many sockets as the process may open (the harness's runs use up to 19,000).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

wait_port() { # port
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$(cat "$pidfile")" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

case "$peer" in
  soketi)
    server="$here/soketi/node_modules/@soketi/soketi/bin/server.js"
    [ -f "$server" ] || { echo "start.sh: soketi not installed (run $here/install.sh soketi)" >&2; exit 1; }
    # TEST FIXTURES, NOT SECRETS: the app id, key and secret reach-loadtest's --pusher-app-id,
    # --pusher-key and --pusher-secret default to.
    export SOKETI_DEFAULT_APP_ID=loadtest-fixture-app
    export SOKETI_DEFAULT_APP_KEY=loadtest-fixture-key
    export SOKETI_DEFAULT_APP_SECRET=loadtest-fixture-secret
    # Loopback only: the WebSocket/HTTP listener, the metrics listener, and the cluster
    # discovery (UDP hellos sent to 127.0.0.1 only, socket bound to 127.0.0.1 by soketi.json).
    export SOKETI_HOST=127.0.0.1 SOKETI_PORT=6001
    export SOKETI_METRICS_HOST=127.0.0.1 SOKETI_METRICS_SERVER_PORT=19601
    export SOKETI_CLUSTER_HOST=127.0.0.1 SOKETI_CLUSTER_UNICAST_ADDRESSES=127.0.0.1
    export SOKETI_CLUSTER_BROADCAST_ADDRESS=127.255.255.255
    # Limits raised for load runs: unlimited connections, presence channels of any size.
    export SOKETI_DEFAULT_APP_MAX_CONNS=-1
    export SOKETI_PRESENCE_MAX_MEMBERS=1000000
    export SOKETI_DEBUG=0
    "${pin[@]}" node "$server" start --config="$here/soketi.json" >"$run/soketi.log" 2>&1 &
    echo $! >"$pidfile"
    port=6001
    ;;
  mosquitto)
    command -v mosquitto >/dev/null || { echo "start.sh: mosquitto not installed (run $here/install.sh mosquitto)" >&2; exit 1; }
    "${pin[@]}" mosquitto -c "$here/mosquitto.conf" >"$run/mosquitto.log" 2>&1 &
    echo $! >"$pidfile"
    port=18830
    ;;
  *) echo "usage: start.sh soketi|mosquitto [--cpus LIST]" >&2; exit 2 ;;
esac
if ! wait_port "$port"; then
  echo "start.sh: $peer did not listen on 127.0.0.1:$port; see $run/$peer.log" >&2
  tail -20 "$run/$peer.log" >&2 || true
  exit 1
fi
echo "$peer: pid $(cat "$pidfile") on 127.0.0.1:$port${cpus:+ (cpus $cpus)}"
