#!/usr/bin/env bash
# Builds the reachd runtime image on this machine without pulling anything: the base is made
# from Debian's packages (debootstrap --variant=minbase, with ca-certificates, docs and apt's
# lists left out, then `docker import`ed as reach/debian-minbase:bookworm, once), reachd is
# built here (cargo build --release) and put on deploy/Dockerfile's `runtime-base` target (the
# runtime stage of the multi-stage build) built on that base.
#
#   deploy/image.sh [TAG]        # default tag: reach/reachd:<version>; also tagged :local
#
# REACH_IMAGE_PROFILE=debug puts the debug build in (what .ci/run does: the tests' build, no
# second one); the default is the release build.
#
# Needs a running Docker daemon, debootstrap and root (or sudo) for debootstrap, and a Debian
# mirror (DEBIAN_MIRROR, default deb.debian.org). Builds with BuildKit when the client has
# buildx, else with the classic builder (`runtime-base` is the first stage, so either builds
# only what it needs). REBUILD_BASE=1 makes the base again. The binary is stripped of its
# debug information (symbols stay). Prints the images' sizes.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
tag=${1:-reach/reachd:$version}
base=reach/debian-minbase:bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
work="${CARGO_TARGET_DIR:-$PWD/target}/image"
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

command -v docker >/dev/null || { echo "error: docker is not installed" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "error: no Docker daemon answers (start one: see docs/operations.md)" >&2; exit 1; }

if [ "${REBUILD_BASE:-0}" = 1 ] || ! docker image inspect "$base" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { echo "error: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
  echo "== base image $base: debootstrap --variant=minbase bookworm ($mirror)"
  rootfs="$work/rootfs"
  as_root rm -rf "$rootfs"
  mkdir -p "$work"
  as_root debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  # What a container never reads: documentation, manuals, translations, apt's package lists
  # and caches, logs of the installation.
  as_root sh -c "rm -rf '$rootfs'/usr/share/doc/* '$rootfs'/usr/share/man/* '$rootfs'/usr/share/info/* \
    '$rootfs'/usr/share/locale/* '$rootfs'/var/cache/apt/* '$rootfs'/var/lib/apt/lists/* \
    '$rootfs'/var/cache/debconf/*-old '$rootfs'/var/log/*"
  as_root tar -C "$rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
  as_root rm -rf "$rootfs"
fi

profile=${REACH_IMAGE_PROFILE:-release}
echo "== reachd: cargo build --profile $profile"
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
cargo build --profile "$([ "$profile" = debug ] && echo dev || echo "$profile")" --locked \
  -p reach-gateway --bin reachd
context="$work/context"
rm -rf "$context"
mkdir -p "$context"
cp "${CARGO_TARGET_DIR:-$PWD/target}/$profile/reachd" "$context/reachd"
if command -v strip >/dev/null; then strip --strip-debug "$context/reachd"; fi
if docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=1; else export DOCKER_BUILDKIT=0; fi

echo "== image $tag (deploy/Dockerfile's runtime-base on $base, plus this reachd)"
# The runtime stage alone (it needs nothing from the build context), then the binary on top.
docker build --network host -f deploy/Dockerfile --target runtime-base \
  --build-arg BASE_IMAGE="$base" -t reach/reachd-runtime:base "$context" >/dev/null
printf 'FROM reach/reachd-runtime:base\nCOPY reachd /usr/local/bin/reachd\n' \
  | docker build --network host -f - --label "org.opencontainers.image.revision=$commit" \
    --label "org.opencontainers.image.version=$version" -t "$tag" -t reach/reachd:local "$context"
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' "$base"
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' "$tag"
