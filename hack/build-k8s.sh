#!/usr/bin/env bash
# Build a real Kubernetes control plane and its tools from Go modules (the module proxy is
# the only network here: no dl.k8s.io, no GitHub releases, no Docker).
#
#   hack/build-k8s.sh            build what is missing, print the bin directory last
#   hack/build-k8s.sh --node     also kubelet, kubeadm, kube-proxy, kind, CoreDNS, crictl (kind nodes) and
#                                rancher's local-path-provisioner (the kind cluster's shared StorageClass)
#
# Binaries are cached by version outside the repository, under
# ${THAW_BIN_CACHE:-~/.cache/thaw/bin}/<name>-<version>/<name>, and skipped when present.
# To use binaries you already have, point these at them (envtest's KUBEBUILDER_ASSETS
# works too, for kube-apiserver, etcd and kubectl):
#   THAW_KUBE_APISERVER THAW_KUBE_CONTROLLER_MANAGER THAW_KUBE_SCHEDULER THAW_KUBECTL
#   THAW_ETCD THAW_KWOK THAW_KWOKCTL THAW_HELM THAW_KUEUE THAW_KIND THAW_COREDNS THAW_CRICTL THAW_LOCAL_PATH
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.34.4}
ETCD_VERSION=${ETCD_VERSION:-v3.6.13}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
HELM_VERSION=${HELM_VERSION:-v3.19.5}
KUEUE_VERSION=${KUEUE_VERSION:-v0.17.0}  # its controller queues stage Jobs in the Kueue tests (~4 min cold)
# --node only: what an offline kind node image needs besides the control plane (hack/kind-node.sh)
KIND_VERSION=${KIND_VERSION:-v0.33.0}
COREDNS_VERSION=${COREDNS_VERSION:-v1.12.1}
CRICTL_VERSION=${CRICTL_VERSION:-v1.37.0}
# The kind cluster's StorageClass thaw-shared (ReadWriteMany over a folder every node mounts)
LOCAL_PATH_VERSION=${LOCAL_PATH_VERSION:-v0.0.30}
CACHE=${THAW_BIN_CACHE:-$HOME/.cache/thaw/bin}
BIN=${THAW_BIN_DIR:-$CACHE/current}
WORK=${THAW_BUILD_DIR:-$HOME/.cache/thaw/build}
export CGO_ENABLED=0 GOFLAGS=-mod=mod

log() { printf '[build-k8s %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# link NAME PATH: expose a binary under $BIN/NAME.
link() { mkdir -p "$BIN"; ln -sf "$2" "$BIN/$1"; }

# from_env NAME VAR: use a user-supplied binary if VAR (or KUBEBUILDER_ASSETS) provides it.
from_env() {
  local name=$1 var=$2
  if [ -n "${!var:-}" ]; then
    [ -x "${!var}" ] || { log "$var=${!var} is not executable"; exit 1; }
    link "$name" "${!var}"; log "$name: using \$$var (${!var})"; return 0
  fi
  if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/$name" ]; then
    link "$name" "$KUBEBUILDER_ASSETS/$name"; log "$name: using \$KUBEBUILDER_ASSETS"; return 0
  fi
  return 1
}

cached() { [ -x "$CACHE/$1-$2/$1" ]; }

kube_ldflags() {
  local v=$1 major minor
  major=$(echo "$v" | sed -E 's/^v([0-9]+)\..*/\1/')
  minor=$(echo "$v" | sed -E 's/^v[0-9]+\.([0-9]+).*/\1/')
  local f=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    f+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    f+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "-s -w$f"
}

# build_kubernetes NAME...: k8s.io/kubernetes/cmd/NAME for each, from one generated module.
build_kubernetes() {
  local todo=()
  for name in "$@"; do
    local var="THAW_$(echo "$name" | tr 'a-z-' 'A-Z_')"
    from_env "$name" "$var" && continue
    if cached "$name" "$K8S_VERSION"; then link "$name" "$CACHE/$name-$K8S_VERSION/$name"; else todo+=("$name"); fi
  done
  [ ${#todo[@]} -eq 0 ] && { log "kubernetes $K8S_VERSION ($*): cached"; return; }
  log "kubernetes $K8S_VERSION: building ${todo[*]} (cold: ~15 min on 2 cores for the control plane)"
  local dir="$WORK/kubernetes-$K8S_VERSION" minor
  minor=${K8S_VERSION#v1.}
  mkdir -p "$dir"
  (
    cd "$dir"
    # Replace directives of a dependency are ignored, so repeat upstream's staging
    # replacements here, pointing at the published v0.<minor>.<patch> modules.
    local mod
    mod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    {
      echo "module thaw.dev/k8s-build"
      echo
      grep -E '^go ' "$mod"
      grep -E '^godebug ' "$mod" || true
      echo
      echo "require k8s.io/kubernetes $K8S_VERSION"
      echo
      grep -E '=> ./staging/src/' "$mod" | awk -v v="v0.$minor" '{print "replace " $1 " => " $1 " " v}'
    } > go.mod
    printf 'package tools\n\nimport (\n' > tools.go
    for name in "${todo[@]}"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$name" >> tools.go; done
    printf ')\n' >> tools.go
    go mod tidy >/dev/null 2>&1 || go mod tidy
    for name in "${todo[@]}"; do
      log "  go build $name"
      local out="$CACHE/$name-$K8S_VERSION"
      mkdir -p "$out"
      go build -trimpath -ldflags "$(kube_ldflags "$K8S_VERSION")" -o "$out/$name.tmp" "k8s.io/kubernetes/cmd/$name"
      mv "$out/$name.tmp" "$out/$name"
    done
  )
  for name in "${todo[@]}"; do link "$name" "$CACHE/$name-$K8S_VERSION/$name"; done
}

build_etcd() {
  from_env etcd THAW_ETCD && return
  if cached etcd "$ETCD_VERSION"; then link etcd "$CACHE/etcd-$ETCD_VERSION/etcd"; log "etcd $ETCD_VERSION: cached"; return; fi
  log "etcd $ETCD_VERSION: building"
  local dir="$WORK/etcd-$ETCD_VERSION"
  mkdir -p "$dir" "$CACHE/etcd-$ETCD_VERSION"
  (
    cd "$dir"
    # `go install` of the server fails on its own replace directives; a wrapper that
    # requires the module and builds its main package works.
    [ -f go.mod ] || go mod init thaw.dev/etcd-build >/dev/null 2>&1
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null 2>&1 || go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
    cat > main.go <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
    go mod tidy >/dev/null 2>&1 || go mod tidy
    go build -trimpath -ldflags "-s -w" -o "$CACHE/etcd-$ETCD_VERSION/etcd.tmp" .
    mv "$CACHE/etcd-$ETCD_VERSION/etcd.tmp" "$CACHE/etcd-$ETCD_VERSION/etcd"
  )
  link etcd "$CACHE/etcd-$ETCD_VERSION/etcd"
}

# go_install NAME VERSION PACKAGE VAR
go_install() {
  local name=$1 version=$2 pkg=$3 var=$4
  from_env "$name" "$var" && return
  if cached "$name" "$version"; then link "$name" "$CACHE/$name-$version/$name"; log "$name $version: cached"; return; fi
  log "$name $version: building"
  mkdir -p "$CACHE/$name-$version"
  GOBIN="$CACHE/$name-$version" go install -trimpath -ldflags "-s -w" "$pkg@$version"
  link "$name" "$CACHE/$name-$version/$name"
}

main() {
  command -v go >/dev/null || { log "a Go toolchain is needed (https://go.dev/dl); none found on PATH"; exit 1; }
  local t0=$SECONDS
  mkdir -p "$CACHE" "$WORK"
  build_etcd
  build_kubernetes kube-apiserver kube-controller-manager kube-scheduler kubectl
  go_install kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok THAW_KWOK
  go_install kwokctl "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwokctl THAW_KWOKCTL
  go_install helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm THAW_HELM
  go_install kueue "$KUEUE_VERSION" sigs.k8s.io/kueue/cmd/kueue THAW_KUEUE
  if [ "${1:-}" = --node ]; then
    build_kubernetes kubelet kubeadm kube-proxy
    go_install kind "$KIND_VERSION" sigs.k8s.io/kind THAW_KIND
    go_install coredns "$COREDNS_VERSION" github.com/coredns/coredns THAW_COREDNS
    go_install crictl "$CRICTL_VERSION" sigs.k8s.io/cri-tools/cmd/crictl THAW_CRICTL
    go_install local-path-provisioner "$LOCAL_PATH_VERSION" github.com/rancher/local-path-provisioner THAW_LOCAL_PATH
  fi
  log "done in $((SECONDS - t0)) s; binaries in $BIN"
  echo "$BIN"
}

main "$@"
