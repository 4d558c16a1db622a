#!/usr/bin/env bash
# Prepares, here (no GPU needed), what benchmarks/gpu_check.sh carries to a lent GPU machine:
# .whl/ — the packages its image lacks (pydantic and its three companions; that image has Python
# 3.12 and its own torch 2.11), and .data/ — Fashion-MNIST from Debian's dataset-fashion-mnist.
# Both stay out of git (.git/info/exclude). Then, with the device tool:
#   run(command="bash benchmarks/gpu_check.sh perf", carry=[".whl", ".data"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
for d in /.whl/ /.data/; do grep -qxF "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir -p .whl .data
pkgs=()
for p in pydantic pydantic-core annotated-types typing-inspection; do pkgs+=("$p==$(version "$p")"); done
platforms=()
for n in 2_28 2_27 2_17; do platforms+=(--platform "manylinux_${n}_x86_64"); done
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${pkgs[@]}"
cp /usr/share/datasets/fashion-mnist/*.gz .data/
du -sh .whl .data
