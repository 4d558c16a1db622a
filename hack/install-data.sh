#!/usr/bin/env bash
# Fashion-MNIST for the demo: Debian's dataset-fashion-mnist where apt is available;
# elsewhere the trainer falls back to torchvision's download into the data cache.
set -euo pipefail
dir=${THAW_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing dataset-fashion-mnist (Debian package)"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
  echo "dataset-fashion-mnist not installed and apt unavailable: the trainer will try torchvision's download"
fi
