#!/usr/bin/env bash
# Counts reachd's user-space instructions per leave + reconnect + rejoin cycle under
# valgrind's callgrind: a count, not a time, so it repeats for the same binary whatever else
# the machine is doing, and a change to the connect path shows even where the CPU time of a
# churn run (+-10 % from run to run) hides it. The kernel's share (the system calls) is not
# counted. See docs/benchmarks.md ("Instructions per churn cycle").
#
#   loadtest/callgrind/churn.sh [REACHD] [OUT]   (defaults: target/release/reachd, /tmp/callgrind-churn-<time>)
#
# reachd runs under callgrind with instrumentation off; the harness (rooms.toml, 200 sockets,
# 20 cycles/s: callgrind runs reachd ~50x slower) connects every socket, then instrumentation
# is switched on for WINDOW seconds (default 20) and off again; the cycles in the window are
# the connections reachd opened in it (reach_connections_opened_total: each cycle reconnects
# once). BATCH_MS (default 50, reachd's default) sets webhooks.record_batch_ms: at 20 cycles/s
# a 50 ms batch holds ~4 presence changes, where a 1,000 cycles/s run's holds ~100; BATCH_MS=2500
# counts batches of that size (each batch's fixed statements then weigh as they do there).
# Needs valgrind (apt-get install valgrind), curl, and
# cargo build --release -p loadtest -p reach-gateway; run from the repository's root.
set -euo pipefail
reachd="$(realpath "${1:-target/release/reachd}")"
out="${2:-/tmp/callgrind-churn-$(date +%s)}"
window="${WINDOW:-20}"
batch_ms="${BATCH_MS:-50}"
mkdir -p "$out"
wrapper="$out/reachd-under-callgrind"
cat >"$wrapper" <<WRAP
#!/usr/bin/env bash
echo \$\$ >"$out/reachd.pid"
exec valgrind --tool=callgrind --callgrind-out-file=$out/callgrind.out --instr-atstart=no "$reachd" "\$@"
WRAP
chmod +x "$wrapper"
admin=http://127.0.0.1:29090
opened() { curl -sf $admin/metrics | awk '$1 == "reach_connections_opened_total" { print $2 }'; }
if opened >/dev/null; then
  echo "churn.sh: something already answers on $admin; stop it first" >&2
  exit 1
fi
target/release/reach-loadtest run -s loadtest/scenarios/rooms.toml --sockets 200 --churn-per-s 20 \
  --hold-s $((window + 20)) --reply-timeout-s 60 --spawn-reachd "$wrapper" \
  --reachd-env REACH_SERVER__LISTEN=127.0.0.1:28080 --reachd-env REACH_SERVER__ADMIN_LISTEN=127.0.0.1:29090 \
  --reachd-env REACH_WEBHOOKS__RECORD_BATCH_MS=$batch_ms \
  --url ws://127.0.0.1:28080/v1/ws --admin $admin --quiet --out "$out/run" >"$out/run.stdout" 2>&1 &
harness=$!
for _ in $(seq 1 180); do
  n="$(opened || true)"
  [ -n "$n" ] && [ "$n" -ge 200 ] && break
  sleep 1
done
sleep 5
pid="$(cat "$out/reachd.pid")"
before="$(opened)"
callgrind_control -i on "$pid" >/dev/null
sleep "$window"
callgrind_control -i off "$pid" >/dev/null
after="$(opened)"
callgrind_control -d "$pid" >/dev/null
wait "$harness" || { echo "churn.sh: the harness failed, see $out/run.stdout" >&2; exit 1; }
dump="$(ls -t "$out"/callgrind.out.* | head -1)"
ir="$(callgrind_annotate "$dump" | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')"
cycles=$((after - before))
echo "$(basename "$reachd"): $cycles cycles, $ir instructions, $((ir / cycles)) per cycle (profile: $dump)"
grep -E '\*\*missed\*\*|errors / unexpected' "$out/run/summary.md"
