#!/usr/bin/env bash
# Counts reachd's user-space work per fan-out delivery under valgrind: instructions, and with
# CACHE=1 the simulated cache's data misses (cachegrind's model: first level and last level),
# which is where a delivery's user-space time goes (docs/benchmarks.md, "A delivery's cache
# misses"). Counts, not times: they repeat within 1-3 % for the same binary whatever else the
# machine does, where the CPU time of a fanout run moves +-15 %. The kernel's share is not
# counted.
#
#   loadtest/callgrind/fanout.sh [REACHD] [OUT]   (defaults: target/release/reachd, /tmp/callgrind-fanout-<time>)
#   SOCKETS=2001 FLAPS=1 WINDOW=20 CACHE=1 LL=1048576,16,64 ...   (the defaults)
#
# reachd runs under callgrind with instrumentation off; the harness (fanout.toml with SOCKETS
# sockets, FLAPS flaps/s: callgrind runs reachd ~50x slower) connects and subscribes every
# socket, then instrumentation is switched on for WINDOW seconds and off again; the deliveries
# in the window are reach_updates_queued_total's growth. LL is the simulated last-level cache
# (size,associativity,line): by default one core's 1 MiB second-level cache, as a working set
# of thousands of sockets does not stay in a shared third level. Needs valgrind, curl, and
# cargo build --release -p loadtest -p reach-gateway; run from the repository's root.
set -euo pipefail
reachd="$(realpath "${1:-target/release/reachd}")"
out="${2:-/tmp/callgrind-fanout-$(date +%s)}"
window="${WINDOW:-20}"
sockets="${SOCKETS:-2001}"
cache=()
[ "${CACHE:-1}" = 1 ] && cache=(--cache-sim=yes "--LL=${LL:-1048576,16,64}")
mkdir -p "$out"
wrapper="$out/reachd-under-callgrind"
cat >"$wrapper" <<WRAP
#!/usr/bin/env bash
echo \$\$ >"$out/reachd.pid"
exec valgrind --tool=callgrind ${cache[*]} --callgrind-out-file=$out/callgrind.out --instr-atstart=no "$reachd" "\$@"
WRAP
chmod +x "$wrapper"
admin=http://127.0.0.1:29090
metric() { curl -sf $admin/metrics | awk -v m="$1" '$1 == m { print $2 }'; }
if metric reach_connections_opened_total >/dev/null; then
  echo "fanout.sh: something already answers on $admin; stop it first" >&2
  exit 1
fi
target/release/reach-loadtest run -s loadtest/scenarios/fanout.toml --sockets "$sockets" \
  --flaps-per-s "${FLAPS:-1}" --hold-s $((window + 30)) --reply-timeout-s 120 --spawn-reachd "$wrapper" \
  --reachd-env REACH_SERVER__LISTEN=127.0.0.1:28080 --reachd-env REACH_SERVER__ADMIN_LISTEN=127.0.0.1:29090 \
  --url ws://127.0.0.1:28080/v1/ws --admin $admin --quiet --out "$out/run" >"$out/run.stdout" 2>&1 &
harness=$!
# The active phase has begun once updates flow.
for _ in $(seq 1 300); do
  n="$(metric reach_updates_queued_total || true)"
  [ -n "$n" ] && [ "${n%.*}" -gt "$sockets" ] && break
  sleep 1
done
sleep 3
pid="$(cat "$out/reachd.pid")"
before="$(metric reach_updates_queued_total)"
callgrind_control -i on "$pid" >/dev/null 2>&1
sleep "$window"
callgrind_control -i off "$pid" >/dev/null 2>&1
after="$(metric reach_updates_queued_total)"
callgrind_control -d "$pid" >/dev/null 2>&1
wait "$harness" || { echo "fanout.sh: the harness failed, see $out/run.stdout" >&2; exit 1; }
dump="$(ls -t "$out"/callgrind.out.* | head -1)"
deliveries=$(( ${after%.*} - ${before%.*} ))
callgrind_annotate "$dump" 2>/dev/null | awk -v n="$deliveries" -v bin="$(basename "$reachd")" '
  /^Events recorded:/ { for (i = 3; i <= NF; i++) name[i - 2] = $i }
  /PROGRAM TOTALS/ {
    line = bin ": " n " deliveries;"
    k = 0
    for (i = 1; i <= NF; i++) if ($i ~ /^[0-9,]+$/) { gsub(",", "", $i); k++; line = line sprintf(" %s %.1f", name[k], $i / n) }
    print line " per delivery"
  }' | tee "$out/result.txt"
echo "profile: $dump"
grep -E '\*\*missed\*\*|errors / unexpected' "$out/run/summary.md"
