#!/usr/bin/env bash
# Installs the peer servers reach-loadtest compares reachd with (docs/benchmarks.md, "Peers,
# side by side"): Soketi (Pusher protocol, from npm, into loadtest/peers/soketi/node_modules)
# and Mosquitto (MQTT, from Debian). Safe to run again.
#
#   loadtest/peers/install.sh [soketi|mosquitto]...     (default: both)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
which=("$@")
[ ${#which[@]} -eq 0 ] && which=(soketi mosquitto)

for peer in "${which[@]}"; do
  case "$peer" in
    soketi)
      command -v npm >/dev/null || { echo "install.sh: npm not found (apt-get install -y nodejs npm)" >&2; exit 1; }
      # package.json pins @soketi/soketi and, through npm "overrides", replaces its
      # uWebSockets.js dependency (a GitHub URL) by the same library published on npm.
      # npm ci: exactly the committed lock, which it never rewrites.
      (cd "$here/soketi" && npm ci --no-audit --no-fund --omit=dev)
      node -e "require('$here/soketi/node_modules/uWebSockets.js')" \
        || { echo "install.sh: uWebSockets.js does not load on $(node --version)" >&2; exit 1; }
      echo "soketi: installed in $here/soketi/node_modules"
      ;;
    mosquitto)
      if ! command -v mosquitto >/dev/null; then
        apt-get install -y mosquitto || { apt-get update && apt-get install -y mosquitto; }
      fi
      echo "mosquitto: $(mosquitto -h 2>&1 | head -1)"
      ;;
    *) echo "install.sh: unknown peer '$peer' (soketi or mosquitto)" >&2; exit 2 ;;
  esac
done
