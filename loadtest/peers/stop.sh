#!/usr/bin/env bash
# Stops a peer server started by start.sh (by the PID it recorded), and waits for it to exit.
#
#   loadtest/peers/stop.sh soketi|mosquitto|all
set -euo pipefail
run="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/run"
peers=("${1:-all}")
[ "${peers[0]}" = all ] && peers=(soketi mosquitto)
for peer in "${peers[@]}"; do
  pidfile="$run/$peer.pid"
  [ -f "$pidfile" ] || continue
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "$peer: stopped (pid $pid)"
  fi
  rm -f "$pidfile"
done
