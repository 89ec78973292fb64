#!/usr/bin/env bash
# Builds reach/rust:local, a stand-in for the official Rust image made from Debian's packages
# and the Rust toolchain of this machine (rustup's, for the version rustc reports), so that
# deploy/Dockerfile's multi-stage build can be tried where no registry can be reached:
#
#   deploy/local/rust-image.sh
#   docker build --network host -f deploy/Dockerfile --build-arg BASE_IMAGE=reach/debian-minbase:bookworm \
#     --build-arg RUST_IMAGE=reach/rust:local --build-arg REACH_COMMIT=$(git rev-parse --short=12 HEAD) \
#     -t reach/reachd:multistage .
#
# The build inside downloads the crates from crates.io.
set -euo pipefail
cd "$(dirname "$0")"
base=reach/debian-minbase:bookworm
docker image inspect "$base" >/dev/null 2>&1 || { echo "error: no $base: run deploy/image.sh first" >&2; exit 1; }
sysroot=$(rustc --print sysroot)
[ -x "$sysroot/bin/cargo" ] || { echo "error: no cargo in $sysroot/bin (a rustup toolchain is needed)" >&2; exit 1; }
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp -a ./* "$context/"   # the other stand-ins' files: the classic builder builds every stage before the target
echo "== copying the toolchain ($sysroot)"
cp -a "$sysroot" "$context/toolchain"
rm -rf "$context/toolchain/share/doc"
# The certificate authorities this machine adds (a proxy's, say) are trusted inside as well:
# the build downloads the crates through the same network.
mkdir -p "$context/extra-ca"
cp /usr/local/share/ca-certificates/*.crt "$context/extra-ca/" 2>/dev/null || true
if docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=1; else export DOCKER_BUILDKIT=0; fi
echo "== reach/rust:local"
docker build --network host --target rust --build-arg BASE_IMAGE="$base" -t reach/rust:local "$context" >/dev/null
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' reach/rust:local
