#!/usr/bin/env bash
# Builds deploy/local/Dockerfile's stand-ins for the official HAProxy, Redis, PostgreSQL and
# Prometheus images (reach/haproxy:local, reach/redis:local, reach/postgres:local,
# reach/prometheus:local) on the base that deploy/image.sh makes, with Debian's packages: for
# deploy/compose.yaml on a machine that cannot pull images. Then, from the repository root:
#
#   REACH_HAPROXY_IMAGE=reach/haproxy:local REACH_REDIS_IMAGE=reach/redis:local \
#   REACH_POSTGRES_IMAGE=reach/postgres:local REACH_PROMETHEUS_IMAGE=reach/prometheus:local \
#   docker-compose -f deploy/compose.yaml -p reach up -d
set -euo pipefail
cd "$(dirname "$0")"
base=reach/debian-minbase:bookworm
docker image inspect "$base" >/dev/null 2>&1 || { echo "error: no $base: run deploy/image.sh first" >&2; exit 1; }
if docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=1; else export DOCKER_BUILDKIT=0; fi
for name in haproxy redis postgres prometheus; do
  echo "== reach/$name:local"
  docker build --network host --target "$name" --build-arg BASE_IMAGE="$base" \
    -t "reach/$name:local" . >/dev/null
  docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' "reach/$name:local"
done
