#!/usr/bin/env bash
# Builds and runs the loopback write floor (see floor.c): ./run.sh [sockets] [bytes] [rounds]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${TMPDIR:-/tmp}/reach-floor"
cc -O2 -Wall -Wextra -o "$out" "$here/floor.c"
exec "$out" "$@"
