#!/usr/bin/env bash
# Assemble a kind node image without any registry (the air-gapped path; `make kind-up` uses
# it where kind's published image cannot be pulled). Everything comes from package registries:
#   - a Debian bookworm rootfs (mmdebstrap, apt mirror) with systemd, containerd, runc, the
#     CNI plugins and iptables, plus hack/kind-node/ (entrypoint, kubelet unit, containerd
#     config with a per-node bridge network, a runc wrapper for VMs without CAP_SYS_RESOURCE);
#   - kubelet, kubeadm, kubectl (and crictl) built from the same k8s.io/kubernetes module as the test bed's
#     control plane (hack/build-k8s.sh --node);
#   - the images kubeadm runs (kube-apiserver, -controller-manager, -scheduler, kube-proxy,
#     etcd, CoreDNS, pause), built here from those binaries and preloaded into the node's
#     containerd under the names kubeadm uses.
#
#   hack/kind-node.sh          print the image name; build it when missing
#
# The tag is named for a hash of every input, so a cached image is reused only when nothing
# changed; the image is committed to a temporary tag and renamed at the very end, so a
# half-built image is never used.
set -euo pipefail
cd "$(dirname "$0")/.."

REGISTRY=${REGISTRY:-thaw.local}
log() { printf '[kind-node %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
docker info >/dev/null 2>&1 || { log "no Docker engine answers: make docker-up, eval \$(hack/docker.sh env)"; exit 1; }

BIN=$(hack/build-k8s.sh --node 2>/dev/null | tail -1)
[ -x "$BIN/kubeadm" ] || { log "kubeadm missing in $BIN (hack/build-k8s.sh --node failed?)"; exit 1; }
K8S_VERSION=$("$BIN/kubeadm" version -o short)
ETCD_TAG=$("$BIN/etcd" --version | awk '/etcd Version/ {print "v" $3}')
COREDNS_TAG=$("$BIN/coredns" -version | awk -F'[- ]' '/CoreDNS/ {print "v" $2; exit}')
PAUSE_TAG=3.10.1
PACKAGES=systemd,systemd-sysv,dbus,containerd,runc,containernetworking-plugins,iptables,nftables,conntrack,ethtool,iproute2,util-linux,mount,kmod,procps,ca-certificates,jq,socat,ebtables,bash

inputs_hash() {
  {
    echo "$K8S_VERSION $ETCD_TAG $COREDNS_TAG $PAUSE_TAG $PACKAGES"
    cat hack/kind-node.sh hack/kind-node/*
    for b in kubelet kubeadm kubectl crictl kube-apiserver kube-controller-manager kube-scheduler kube-proxy etcd coredns; do
      sha256sum < "$(readlink -f "$BIN/$b")"
    done
  } | sha256sum | cut -c1-12
}
IMAGE="$REGISTRY/kind-node:$K8S_VERSION-$(inputs_hash)"
if docker image inspect "$IMAGE" >/dev/null 2>&1; then echo "$IMAGE"; exit 0; fi

command -v mmdebstrap >/dev/null || { log "mmdebstrap is needed (make install installs it; or apt-get install mmdebstrap)"; exit 1; }
command -v gcc >/dev/null || { log "gcc is needed for the pause binary"; exit 1; }
WORK=$(mktemp -d)
BUILD="thaw-kind-node-build-$$"
cleanup() { docker rm -f "$BUILD" >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT
t0=$SECONDS

# --- the control-plane images: one binary each on a minimal root ---------------------------
# image NAME:TAG BINARY ENTRYPOINT-JSON [ROOTFS-TAR]
image() {
  local name=$1 bin=$2 entry=$3 base=${4:-}
  local dir="$WORK/img-$(basename "${name%%:*}")"
  mkdir -p "$dir/usr/local/bin" "$dir/tmp" "$dir/etc" "$dir/var/run"
  cp "$(readlink -f "$bin")" "$dir/usr/local/bin/$(basename "$bin")"
  echo "nobody:x:65534:65534:nobody:/:/sbin/nologin" > "$dir/etc/passwd"
  if [ -n "$base" ]; then
    # on top of a Debian rootfs (kube-proxy needs iptables, nft and conntrack)
    tar -C "$dir" -rf "$WORK/proxy-root.tar" "./usr/local/bin/$(basename "$bin")"
    docker import --change "ENTRYPOINT $entry" "$WORK/proxy-root.tar" "$name" >/dev/null
  else
    tar -C "$dir" -cf "$dir.tar" .
    docker import --change "ENTRYPOINT $entry" --change "ENV PATH=/usr/local/bin:/usr/bin:/bin" "$dir.tar" "$name" >/dev/null
  fi
}
log "control-plane images for Kubernetes $K8S_VERSION (etcd $ETCD_TAG, CoreDNS $COREDNS_TAG, pause $PAUSE_TAG)"
gcc -static -O2 -o "$WORK/pause" hack/kind-node/pause.c
for c in kube-apiserver kube-controller-manager kube-scheduler; do
  image "registry.k8s.io/$c:$K8S_VERSION" "$BIN/$c" "[\"/usr/local/bin/$c\"]"
done
image "registry.k8s.io/etcd:$ETCD_TAG" "$BIN/etcd" '["/usr/local/bin/etcd"]'
image "registry.k8s.io/coredns/coredns:$COREDNS_TAG" "$BIN/coredns" '["/usr/local/bin/coredns"]'
image "registry.k8s.io/pause:$PAUSE_TAG" "$WORK/pause" '["/usr/local/bin/pause"]'
log "kube-proxy image (Debian rootfs with iptables, nftables, conntrack)"
mmdebstrap --quiet --variant=minbase --include=iptables,nftables,conntrack,kmod \
  --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
  bookworm "$WORK/proxy-root.tar" >&2
image "registry.k8s.io/kube-proxy:$K8S_VERSION" "$BIN/kube-proxy" '["/usr/local/bin/kube-proxy"]' debian
IMAGES=(registry.k8s.io/kube-apiserver:$K8S_VERSION registry.k8s.io/kube-controller-manager:$K8S_VERSION
  registry.k8s.io/kube-scheduler:$K8S_VERSION registry.k8s.io/kube-proxy:$K8S_VERSION
  registry.k8s.io/etcd:$ETCD_TAG registry.k8s.io/coredns/coredns:$COREDNS_TAG registry.k8s.io/pause:$PAUSE_TAG)
docker save "${IMAGES[@]}" -o "$WORK/images.tar"

# --- the node rootfs ------------------------------------------------------------------------
log "node rootfs (mmdebstrap: $PACKAGES)"
mkdir -p "$WORK/files"
cp hack/kind-node/* "$WORK/files/"
for b in kubelet kubeadm kubectl crictl; do cp "$(readlink -f "$BIN/$b")" "$WORK/files/$b"; done
echo "$K8S_VERSION" > "$WORK/files/version"
echo "$ETCD_TAG" > "$WORK/files/etcd-tag"
echo "$COREDNS_TAG" > "$WORK/files/coredns-tag"
cat > "$WORK/files/default-cni.yaml" <<YAML
# kind applies this in place of its kindnetd manifest. This node image's pod network needs no
# daemon: containerd writes each node's bridge config from /etc/containerd/cni.template when the
# kubelet reports the node's pod CIDR; hack/kind.sh routes each node's pod CIDR via its node.
apiVersion: v1
kind: ConfigMap
metadata:
  name: thaw-pod-network
  namespace: kube-system
data:
  plugin: bridge (containerd conf_template)
YAML
F="$WORK/files"
mmdebstrap --quiet --variant=minbase --include="$PACKAGES" \
  --customize-hook="install -m 0755 $F/entrypoint \"\$1/usr/local/bin/entrypoint\"" \
  --customize-hook="install -m 0755 $F/runc-wrapper \"\$1/usr/local/sbin/runc-wrapper\"" \
  --customize-hook="install -m 0755 $F/kubelet $F/kubeadm $F/kubectl $F/crictl \"\$1/usr/bin/\"" \
  --customize-hook="install -D -m 0644 $F/containerd.toml \"\$1/etc/containerd/config.toml\"" \
  --customize-hook="install -m 0644 $F/cni.template \"\$1/etc/containerd/cni.template\"" \
  --customize-hook="install -m 0644 $F/kubelet.service \"\$1/etc/systemd/system/kubelet.service\"" \
  --customize-hook="mkdir -p \"\$1/kind\" && install -m 0644 $F/version $F/etcd-tag $F/coredns-tag \"\$1/kind/\"" \
  --customize-hook="install -D -m 0644 $F/default-cni.yaml \"\$1/kind/manifests/default-cni.yaml\"" \
  --customize-hook='mkdir -p "$1/etc/kubernetes/manifests" "$1/etc/cni/net.d"; rm -f "$1"/etc/cni/net.d/*' \
  --customize-hook='printf "runtime-endpoint: unix:///run/containerd/containerd.sock\n" > "$1/etc/crictl.yaml"' \
  --customize-hook='echo ReadKMsg=no >> "$1/etc/systemd/journald.conf"' \
  --customize-hook='chroot "$1" systemctl enable kubelet.service containerd.service >/dev/null 2>&1' \
  --customize-hook='chroot "$1" systemctl mask systemd-binfmt.service systemd-udevd.service getty@tty1.service console-getty.service >/dev/null 2>&1' \
  --customize-hook='rm -f "$1"/etc/machine-id "$1"/var/lib/dbus/machine-id; : > "$1/etc/machine-id"' \
  --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
  bookworm "$WORK/node-root.tar" >&2
docker import "$WORK/node-root.tar" "$IMAGE.rootfs" >/dev/null

# --- preload the images into the node's containerd, then commit -----------------------------
log "preloading ${#IMAGES[@]} images into the node's containerd"
docker run -d --privileged --name "$BUILD" --entrypoint containerd "$IMAGE.rootfs" >/dev/null
for _ in $(seq 1 30); do docker exec "$BUILD" ctr version >/dev/null 2>&1 && break; sleep 1; done
docker cp "$WORK/images.tar" "$BUILD:/images.tar"
# --no-unpack: the node's /var is a volume on a real filesystem; the CRI unpacks on first use.
docker exec "$BUILD" ctr -n k8s.io images import --no-unpack --all-platforms /images.tar >/dev/null
docker exec "$BUILD" rm /images.tar
docker exec "$BUILD" ctr -n k8s.io images ls -q | grep -v "^sha256:" | sort >&2
docker stop "$BUILD" >/dev/null
docker commit \
  --change 'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]' --change 'CMD []' \
  --change 'ENV container=docker' \
  "$BUILD" "$IMAGE.partial" >/dev/null
docker rm "$BUILD" >/dev/null
docker tag "$IMAGE.partial" "$IMAGE"
docker rmi "$IMAGE.partial" "$IMAGE.rootfs" >/dev/null
docker rmi "${IMAGES[@]}" >/dev/null
# Earlier builds (other input hashes) are of no further use; one a cluster still runs is kept.
docker images --format '{{.Repository}}:{{.Tag}}' "$REGISTRY/kind-node" | grep -vxF "$IMAGE" \
  | xargs -r docker rmi >/dev/null 2>&1 || true
log "built $IMAGE in $((SECONDS - t0)) s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
echo "$IMAGE"
