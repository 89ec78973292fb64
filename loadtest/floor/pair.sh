#!/usr/bin/env bash
# The fan-out's cost against the kernel's floor, measured back to back (docs/benchmarks.md,
# "The fan-out writes itself"): ./pair.sh <reachd binary> [pairs] [workers]
#
# Runs the floor (floor.c: one process writing 60 B to each of 10,000 loopback sockets, one
# process reading them) and the `fanout` scenario (10,000 watchers of one flapping user)
# alternately, a floor before and after every fanout run: floor, fanout, floor, fanout, ...,
# floor. reachd is pinned to core 0 and the harness to core 1, as `workers` processes (default
# 1: one process reading every socket, as the floor's reader does; the scenario's own default
# is 2). Prints, per fanout run, the floors on either side (us per write), reachd's CPU per
# delivery and deliveries/s, and their ratios to the two floors' mean (the floor drifts between
# runs minutes apart; the mean of the floors around a run follows it), then the ratios'
# median. Needs `cargo build --release -p loadtest` and a C compiler.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
reachd="$(realpath "${1:?usage: pair.sh <reachd binary> [pairs] [workers]}")"
pairs="${2:-1}"
workers="${3:-1}"
loadtest="${LOADTEST:-$root/target/release/reach-loadtest}"
[ -x "$loadtest" ] || { echo "no $loadtest: cargo build --release -p loadtest" >&2; exit 1; }
# A backlog for 10,000 connects at once (as loadtest/peers/compare.sh asks).
if [ "$(cat /proc/sys/net/core/somaxconn)" -lt 16384 ]; then
    echo "net.core.somaxconn is below 16384: sysctl -w net.core.somaxconn=65535 first" >&2
fi
cd "$root"
floor() {
    local out
    out="$("$here/run.sh" 10000 60 100)"
    floor_us="$(echo "$out" | sed -n 's/^writer: \([0-9.]*\) us.*/\1/p')"
    floor_rate="$(echo "$out" | sed -n 's/.*), \([0-9]*\) writes\/s.*/\1/p')"
    [ -n "$floor_us" ] && [ -n "$floor_rate" ] || { echo "$out" >&2; exit 1; }
}
ratios=()
floor
for i in $(seq 1 "$pairs"); do
    before_us="$floor_us" before_rate="$floor_rate"
    out="$("$loadtest" run -s "$root/loadtest/scenarios/fanout.toml" --workers "$workers" \
        --reply-timeout-s 180 --spawn-reachd "$reachd" --server-cpus 0 --worker-cpus 1 \
        --reachd-env REACH_SERVER__LISTEN=127.0.0.1:28080 \
        --reachd-env REACH_SERVER__ADMIN_LISTEN=127.0.0.1:29090 \
        --url ws://127.0.0.1:28080/v1/ws --admin http://127.0.0.1:29090 2>&1)"
    results="$(echo "$out" | sed -n 's/^results: //p' | tail -1)"
    summary="$results/summary.md"
    [ -f "$summary" ] || { echo "$out" | tail -20 >&2; exit 1; }
    cell() { grep -F "| $1" "$summary" | head -1 | awk -F'|' '{print $3}' | tr -d ' *'; }
    cpu="$(cell 'server CPU per delivery')"
    rate="$(cell 'deliveries (server' | cut -d/ -f2)"
    missed="$(cell '**missed**')"
    floor
    line="$(awk -v f0="$before_us" -v f1="$floor_us" -v fr0="$before_rate" -v fr1="$floor_rate" \
        -v c="$cpu" -v r="$rate" -v m="$missed" -v p="$i" -v res="$results" 'BEGIN {
        f = (f0 + f1) / 2; fr = (fr0 + fr1) / 2
        printf "pair %d: floor %.2f | %.2f us per write (mean %.2f, %d writes/s) | reachd %.2f us per delivery, %d deliveries/s | CPU %.2fx the floor, rate %.2f of it | missed %s | %s\n",
            p, f0, f1, f, fr, c, r, c / f, r / fr, m, res }')"
    echo "$line"
    ratios+=("$(echo "$line" | sed -n 's/.*| CPU \([0-9.]*\)x.*/\1/p')")
done
printf '%s\n' "${ratios[@]}" | sort -n | awk '{ v[NR] = $1 } END {
    m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "CPU per delivery against the floor: median %.2fx over %d runs (%.2f-%.2f)\n", m, NR, v[1], v[NR] }'
