#!/usr/bin/env bash
# One prepared script for a lent GPU machine (see docs/benchmarks.md "GPU check"):
# the CUDA paths the CPU machines cannot exercise. Wheels the GPU image lacks travel in .whl/,
# Fashion-MNIST in .data/ (both ignored by git). Results land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD THAW_FASHION_MNIST=$PWD/.data PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())" | tee -a "$OUT/gpu.txt"
run() {  # name, timeout, args...
  local name=$1 t=$2; shift 2
  local t0=$SECONDS
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc wall=$((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
  tail -8 "$OUT/$name.log"
}
# 1. The quickstart on one GPU under torchrun (bf16 autocast auto, NCCL process group of 1).
run quickstart 120 torchrun --standalone --nproc_per_node 1 -m trainer run examples/quickstart.yaml
# 2. fp16 + GradScaler, then the resume path: the same job run again resumes nothing (finished).
sed -e 's/name: quickstart/name: quickstart-fp16/' -e 's/^  seed: 0/  seed: 0\n  speed: {amp: fp16}/' \
  examples/quickstart.yaml > /tmp/fp16.yaml
run fp16 120 python3 -m trainer run /tmp/fp16.yaml
run fp16-again 40 python3 -m trainer run /tmp/fp16.yaml
# 3. Full Fashion-MNIST with the bundled model: the number to put beside the published table.
run full 270 python3 -m trainer run examples/fashion-mnist-full.yaml
grep -h '"event": "epoch"' "$OUT"/full.log | tail -3 > "$OUT/full-epochs.jsonl"
cp "$OUT/summary.txt" "$OUT/summary-final.txt" 2>/dev/null
exit 0
