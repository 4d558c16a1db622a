#!/usr/bin/env bash
# System packages the demo and the tests use, from Debian where apt is available:
#   dataset-fashion-mnist  the demo's data (elsewhere the trainer falls back to torchvision's download)
#   prometheus, promtool   a real Prometheus for the metrics tests and the rule tests
#   mmdebstrap             the kind tests' node image and the images' base, built offline from
#                          the apt mirror (hack/kind-node.sh, hack/images.sh); with its
#                          recommends (gpg, mount, uidmap), as verified there
set -euo pipefail
want=()
full=()
[ -f "${THAW_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}/train-images-idx3-ubyte.gz" ] || want+=(dataset-fashion-mnist)
command -v prometheus >/dev/null && command -v promtool >/dev/null || want+=(prometheus)
command -v mmdebstrap >/dev/null || full+=(mmdebstrap)
[ ${#want[@]} -eq 0 ] && [ ${#full[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing ${want[*]} ${full[*]} (Debian packages)"
  apt-get update -qq >/dev/null
  [ ${#want[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
  # The package starts a system Prometheus on :9090 where systemd runs; the tests start their own.
  [ ${#full[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${full[@]}" >/dev/null
else
  echo "cannot install ${want[*]} ${full[*]} (no apt or not root): the tests that need them will fail" >&2
fi
