#!/usr/bin/env bash
# Build Thaw's two images (Dockerfile targets trainer and operator) with the running engine.
#
#   hack/images.sh [trainer|operator ...]     default: both
#
# Base image: python:3.11 slim where a registry answers; where none does (air-gapped, these
# development machines), a Debian bookworm rootfs with Python 3.11 built from the apt mirror
# by mmdebstrap and imported, cached under a tag named for the hash of what went into it.
# Each image is built to a temporary tag and renamed only when the build succeeded, so a
# half-built image is never used. Tags: $REGISTRY/thaw-<target>:$TAG (default thaw.local/…:dev).
set -euo pipefail
cd "$(dirname "$0")/.."

REGISTRY=${REGISTRY:-thaw.local}
TAG=${TAG:-dev}
PYTHON_IMAGE=${PYTHON_IMAGE:-}
log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
# The classic builder (no buildx here) warns on every build that it is deprecated: keep only real errors.
quiet_build() { DOCKER_BUILDKIT=0 docker build -q "$@" >/dev/null 2> >(grep -v -e DEPRECATED -e BuildKit -e 'environment-variable' -e '^$' >&2); }

if ! docker info >/dev/null 2>&1; then
  log "no Docker engine answers (DOCKER_HOST=${DOCKER_HOST:-unset}): run \`make docker-up\` and"
  log "\`eval \$(hack/docker.sh env)\`, or point DOCKER_HOST at a running engine"
  exit 1
fi

# The CA bundle the host's pip trusts: containers reach PyPI and the mirror through the same path.
host_ca_bundle() {
  local cert
  cert=$(pip config get global.cert 2>/dev/null || true)
  for f in "$cert" /etc/ssl/certs/ca-certificates.crt; do
    [ -n "$f" ] && [ -f "$f" ] && { echo "$f"; return; }
  done
  return 1
}

local_base() {
  local packages=python3,python3-venv,ca-certificates
  local ca hash tag
  ca=$(host_ca_bundle) || { log "no CA bundle found for the base image"; exit 1; }
  hash=$( { echo "bookworm $packages"; cat "$ca"; } | sha256sum | cut -c1-12)
  tag="$REGISTRY/python:3.11-bookworm-$hash"
  if docker image inspect "$tag" >/dev/null 2>&1; then echo "$tag"; return; fi
  command -v mmdebstrap >/dev/null || {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      log "installing mmdebstrap (apt)"
      apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null
    else
      log "no registry answers and mmdebstrap is missing: install it (apt-get install mmdebstrap), or set PYTHON_IMAGE"
      exit 1
    fi
  }
  local work
  work=$(mktemp -d)
  log "building a Debian bookworm + Python 3.11 base from the apt mirror (mmdebstrap, ~1 min)"
  # The host's bundle replaces Debian's (a superset here); PIP_CERT makes pip in venvs use it
  # instead of certifi's.
  mmdebstrap --quiet --variant=minbase --include="$packages" \
    --customize-hook="cp '$ca' \"\$1/etc/ssl/certs/ca-certificates.crt\"" \
    --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
    bookworm "$work/rootfs.tar" >&2
  docker import \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    "$work/rootfs.tar" "$tag.tmp" >/dev/null
  rm -rf "$work"
  docker tag "$tag.tmp" "$tag" && docker rmi "$tag.tmp" >/dev/null
  echo "$tag"
}

base_image() {
  [ -n "$PYTHON_IMAGE" ] && { echo "$PYTHON_IMAGE"; return; }
  local upstream=python:3.11.11-slim-bookworm
  if docker image inspect "$upstream" >/dev/null 2>&1 || timeout 60 docker pull -q "$upstream" >/dev/null 2>&1; then
    echo "$upstream"
  else
    log "no registry answers for $upstream: using a local base"
    local_base
  fi
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(operator trainer)
base=$(base_image)
log "base image: $base"
for target in "${targets[@]}"; do
  case "$target" in trainer|operator) ;; *) log "unknown target $target (trainer, operator)"; exit 2 ;; esac
  image="$REGISTRY/thaw-$target:$TAG"
  t0=$SECONDS
  log "building $image"
  previous=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
  quiet_build --target "$target" --build-arg "PYTHON_IMAGE=$base" -t "$image.partial" .
  docker tag "$image.partial" "$image" && docker rmi "$image.partial" >/dev/null
  # The build this one replaced is left untagged; each trainer build is ~5 GB, and a few left
  # behind fill the disk kind's nodes need. Kept if a container still uses it.
  if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$image")" ]; then
    docker rmi "$previous" >/dev/null 2>&1 || true
  fi
  log "$image: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}') in $((SECONDS - t0)) s"
done
