#!/usr/bin/env bash
# Runs one reach-loadtest scenario against a cluster of N reachd nodes on this machine: a fresh
# PostgreSQL database (reach_bench) and Redis database (9), nodes on ports 18080+i (admin
# 19090+i), every node pinned to SERVER_CPUS; the harness gets the nodes' URLs (user u connects
# to node u % N) and their PIDs, so memory and CPU are the sums over the nodes. Redis's own CPU
# over the run is printed at the end (it is not in the harness's figures).
#
#   loadtest/cluster.sh N [REACHD] -- <reach-loadtest run flags>
#   loadtest/cluster.sh 2 -- -s loadtest/scenarios/idle.toml --sockets 10000 --worker-cpus 1 --out /tmp/c2-idle
#
# Environment: SERVER_CPUS (taskset -c list for the nodes, default 0), PG (PostgreSQL server URL,
# default postgres://postgres@127.0.0.1:5432), REDIS (default redis://127.0.0.1:6379/9), KEEP_DB=1
# (keep the database of the last run instead of a fresh one).
# Needs psql, redis-cli and curl; cargo build --release -p loadtest -p reach-gateway; run from the
# repository's root. Each node must stay under the open-file cap: at most ~19,000 sockets each.
set -euo pipefail
nodes="${1:?usage: loadtest/cluster.sh N [REACHD] -- <reach-loadtest run flags>}"
shift
reachd=target/release/reachd
if [ $# -gt 0 ] && [ "$1" != "--" ]; then reachd="$1"; shift; fi
[ "${1:-}" = "--" ] && shift
lt=target/release/reach-loadtest
pg="${PG:-postgres://postgres@127.0.0.1:5432}"
redis="${REDIS:-redis://127.0.0.1:6379/9}"
cpus="${SERVER_CPUS:-0}"
logs="$(mktemp -d /tmp/reach-cluster-XXXXXX)"

if [ "${KEEP_DB:-0}" = 1 ]; then
  psql "$pg/postgres" -q -c 'CREATE DATABASE reach_bench' 2>/dev/null || true
else
  psql "$pg/postgres" -q -c 'DROP DATABASE IF EXISTS reach_bench' -c 'CREATE DATABASE reach_bench'
fi
redis-cli -u "$redis" FLUSHDB >/dev/null

pids=()
stop() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap stop EXIT

urls=()
for i in $(seq 0 $((nodes - 1))); do
  MALLOC_ARENA_MAX=2 \
  REACH_STORAGE__POSTGRES_URL="$pg/reach_bench" REACH_CLUSTER__REDIS_URL="$redis" \
  REACH_CLUSTER__NODE_ID="bench-$i" \
  REACH_SERVER__LISTEN="127.0.0.1:$((18080 + i))" REACH_SERVER__ADMIN_LISTEN="127.0.0.1:$((19090 + i))" \
    taskset -c "$cpus" "$reachd" --config loadtest/reachd-bench.toml >"$logs/node-$i.log" 2>&1 &
  pids+=("$!")
  urls+=("ws://127.0.0.1:$((18080 + i))/v1/ws")
done
for i in $(seq 0 $((nodes - 1))); do
  ready=
  for _ in $(seq 1 600); do
    curl -fs "http://127.0.0.1:$((19090 + i))/readyz" >/dev/null && { ready=1; break; }
    kill -0 "${pids[$i]}" 2>/dev/null || { echo "node $i exited: $logs/node-$i.log" >&2; exit 1; }
    sleep 0.1
  done
  [ -n "$ready" ] || { echo "node $i not ready after 60 s: $logs/node-$i.log" >&2; exit 1; }
done

redis_cpu() {
  local pid
  pid="$(pgrep -x redis-server | head -1)" || { echo 0; return; }
  awk '{ print $14 + $15 }' "/proc/$pid/stat"
}
url_list="$(IFS=,; echo "${urls[*]}")"
pid_list="$(IFS=,; echo "${pids[*]}")"
r0="$(redis_cpu)"
status=0
"$lt" run "$@" --url "$url_list" --admin http://127.0.0.1:19090 --server-pid "$pid_list" || status=$?
r1="$(redis_cpu)"
echo "Redis CPU during the run (all phases): $(awk -v a="$r0" -v b="$r1" 'BEGIN { printf "%.2f", (b - a) / 100 }') s; node logs: $logs"
exit "$status"
