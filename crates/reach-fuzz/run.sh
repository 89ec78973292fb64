#!/usr/bin/env bash
# Builds the fuzz targets with cargo fuzz (libFuzzer, coverage-guided; no sanitizer, so it runs on
# the stable toolchain) and runs them. See docs/fuzzing.md.
#
#   crates/reach-fuzz/run.sh                       every target for 60 s
#   crates/reach-fuzz/run.sh --seconds 20 token    one target for 20 s
#   crates/reach-fuzz/run.sh --runs 10000000 frame_json frame_msgpack
#   crates/reach-fuzz/run.sh --merge ...           as above, then adds what grew coverage to corpus/
#   crates/reach-fuzz/run.sh --replay              every committed corpus and regression input once
#
# Every run first replays regressions/<target>/ (inputs that once crashed), then fuzzes from
# corpus/<target>/ (committed, read-only here) and a scratch corpus. A crash stops that target,
# leaves its input in crates/reach-fuzz/artifacts/<target>/ and makes the script exit 1 after
# the others ran. The table at the end gives executions, time and rate per target.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
all=(frame_json frame_msgpack token rest_form rest_request outbox engine)

seconds=60
runs=""
merge=0
replay=0
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --merge) merge=1; shift ;;
    --replay) replay=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
  [[ " ${all[*]} " == *" $t "* ]] || { echo "error: no target $t (targets: ${all[*]})" >&2; exit 2; }
done

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "error: cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
  exit 1
fi

echo "== building the fuzz targets (cargo fuzz build -s none --debug-assertions)"
(cd "$root" && cargo fuzz build -s none --debug-assertions --fuzz-dir crates/reach-fuzz)
bin="$here/target/$(rustc -vV | sed -n 's/^host: //p')/release"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
summary=()
failed=0
for t in "${targets[@]}"; do
  mkdir -p "$here/artifacts/$t" "$scratch/$t" "$here/corpus/$t"
  log="$scratch/$t.log"
  regressions=("$here/regressions/$t"/*)
  if [ -e "${regressions[0]}" ]; then
    echo "== $t: replaying ${#regressions[@]} regression input(s)"
    if ! "$bin/$t" "${regressions[@]}" >"$log" 2>&1; then
      tail -40 "$log"
      echo "error: $t: a regression input crashes again" >&2
      failed=1
      summary+=("$(printf '%-14s %12s %8s %10s  %s' "$t" - - - "REGRESSION CRASH")")
      continue
    fi
  fi
  if [ "$replay" = 1 ]; then
    echo "== $t: replaying corpus/$t once"
    limit=(-runs=0)
  elif [ -n "$runs" ]; then
    echo "== $t: $runs executions"
    limit=(-runs="$runs")
  else
    echo "== $t: $seconds s"
    limit=(-max_total_time="$seconds")
  fi
  start=$(date +%s)
  status=ok
  if ! "$bin/$t" "${limit[@]}" -print_final_stats=1 -max_len=8192 -timeout=10 \
      -artifact_prefix="$here/artifacts/$t/" "$scratch/$t" "$here/corpus/$t" >"$log" 2>&1; then
    status="CRASH (input in crates/reach-fuzz/artifacts/$t/)"
    failed=1
    grep -v '^#' "$log" | tail -40
  fi
  elapsed=$(( $(date +%s) - start ))
  executed=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  executed=${executed:-0}
  rate=$(( executed / (elapsed > 0 ? elapsed : 1) ))
  corpus=$(ls "$scratch/$t" "$here/corpus/$t" | grep -vc ':$' || true)
  summary+=("$(printf '%-14s %12s %8s %10s  %s' "$t" "$executed" "${elapsed}s" "$rate/s" "$status, corpus $corpus")")
  echo "   ${summary[-1]}"
  if [ "$merge" = 1 ] && [ "$status" = ok ]; then
    "$bin/$t" -merge=1 -max_len=8192 "$here/corpus/$t" "$scratch/$t" >>"$log" 2>&1
    echo "   merged: corpus/$t holds $(ls "$here/corpus/$t" | wc -l) inputs"
  fi
done

echo
printf '%-14s %12s %8s %10s  %s\n' target executions time rate result
printf '%s\n' "${summary[@]}"
exit "$failed"
