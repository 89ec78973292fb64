#!/usr/bin/env bash
# Runs the side-by-side comparison of docs/benchmarks.md ("Peers, side by side"): the same
# scenario files and flags against reachd, Soketi and Mosquitto, each server pinned to CPU 0 and
# the harness's workers to CPU 1, each run on a freshly started server after the machine has
# gone quiet (1-minute load below 0.7, waiting at most 10 minutes; the load seen is logged).
#
#   loadtest/peers/compare.sh [REACHD] [OUT]      (defaults: target/release/reachd, /tmp/peers-<time>)
#   ONLY="idle rooms" TARGETS="pusher mqtt" loadtest/peers/compare.sh ...   (a subset)
#   QUIET_LOAD=1.0 ...     (the 1-minute load each run waits for; default 0.7)
#   EXTRA="--sockets 2000" ...   (flags added to every run, e.g. another size)
#   TARGETS="reach reach2 reach3" ...   (reachN: a cluster of N nodes, loadtest/cluster.sh, all
#                                        nodes on CPU 0; needs PostgreSQL and Redis)
#
# Needs: cargo build --release -p loadtest -p reach-gateway; loadtest/peers/install.sh;
# sysctl -w net.core.somaxconn=65535. Run from the repository's root.
set -uo pipefail
reachd="${1:-target/release/reachd}"
out="${2:-/tmp/peers-$(date +%s)}"
lt=target/release/reach-loadtest
peers="$(dirname "${BASH_SOURCE[0]}")"
mkdir -p "$out"
log="$out/compare.log"

wait_quiet() {
  local load
  for _ in $(seq 1 120); do
    load="$(cut -d' ' -f1 /proc/loadavg)"
    awk -v l="$load" -v q="${QUIET_LOAD:-0.7}" 'BEGIN { exit !(l < q) }' && break
    sleep 5
  done
  echo "$(date -u +%H:%M:%S) load before the run: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$log"
}

# name -> scenario flags (identical for every target)
declare -A flags=(
  [idle]="-s loadtest/scenarios/idle-rooms.toml"
  [rooms]="-s loadtest/scenarios/rooms.toml"
  # Connection churn: 1,000 leave (bye) + reconnect + rejoin cycles/s.
  [churn]="-s loadtest/scenarios/rooms.toml --churn-per-s 1000"
  [rooms-abrupt]="-s loadtest/scenarios/rooms.toml --mix 0,1,0 --abrupt-rejoin-ms 2500 --offline-grace-ms 1000"
  # Soketi answers a join to a 10,000-member presence channel in O(members): let the
  # subscriptions take their time, so the active phase starts on a server that has finished.
  [fanout]="-s loadtest/scenarios/fanout.toml --reply-timeout-s 180"
)
# reachd's offline grace must match the scenario's --offline-grace-ms
declare -A reach_env=(
  [rooms-abrupt]="--reachd-env REACH_PRESENCE__OFFLINE_GRACE_MS=1000"
)

for name in ${ONLY:-idle churn rooms rooms-abrupt fanout}; do
  for target in ${TARGETS:-reach pusher mqtt}; do
    dir="$out/$name-$target"
    wait_quiet
    # shellcheck disable=SC2086
    case "$target" in
      reach)
        # Ports of its own, away from reachd-bench.toml's 18080/19090 that other runs use.
        ports="--reachd-env REACH_SERVER__LISTEN=127.0.0.1:28080 --reachd-env REACH_SERVER__ADMIN_LISTEN=127.0.0.1:29090 --url ws://127.0.0.1:28080/v1/ws --admin http://127.0.0.1:29090"
        cmd="$lt run ${flags[$name]} ${EXTRA:-} --spawn-reachd $reachd $ports ${reach_env[$name]:-} --server-cpus 0 --worker-cpus 1 --quiet --out $dir"
        ;;
      reach[0-9]*)
        # The nodes get no extra environment (reach_env): for idle, churn, rooms and fanout.
        cmd="$peers/../cluster.sh ${target#reach} $reachd -- ${flags[$name]} ${EXTRA:-} --worker-cpus 1 --quiet --out $dir"
        ;;
      pusher|mqtt)
        peer=soketi; [ "$target" = mqtt ] && peer=mosquitto
        "$peers/start.sh" "$peer" --cpus 0 >>"$log" 2>&1 || { echo "cannot start $peer" | tee -a "$log"; continue; }
        sleep 2
        cmd="$lt run ${flags[$name]} ${EXTRA:-} --target $target --server-pid $(cat "$peers/run/$peer.pid") --worker-cpus 1 --quiet --out $dir"
        ;;
    esac
    echo "$(date -u +%H:%M:%S) $cmd" | tee -a "$log"
    timeout 900 $cmd >"$dir.stdout" 2>"$dir.stderr"
    echo "$(date -u +%H:%M:%S) exit $? ($name, $target)" | tee -a "$log"
    case "$target" in pusher|mqtt) "$peers/stop.sh" "$peer" >>"$log" 2>&1 ;; esac
  done
done
echo "results: $out" | tee -a "$log"
