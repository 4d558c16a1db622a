#!/usr/bin/env bash
# One prepared script for a lent GPU machine (its results: docs/results.md, "Reference"):
# the CUDA paths the CPU machines cannot exercise, the full-data run and the 1,000-images/class
# row of the quality table. Wheels the GPU image lacks travel in .whl/, Fashion-MNIST in .data/
# (both ignored by git). Results land in $OUT. Each run has its own time cap: checks + quality fit one
# 10-minute call (quality takes what is left of 570 s), bench needs about 5 minutes on its own.
# Usage: bash benchmarks/gpu_check.sh [STEP...]   steps: checks quality bench perf decode exports (default: checks quality;
# the first three have run once: docs/results.md "Reference", docs/benchmarks.md "on CUDA"; perf and decode have not).
# benchmarks/gpu_prepare.sh makes .whl/ and .data/ here first.
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
  tail -6 "$OUT/$name.log"
}
checks() {
  # 1. The quickstart on one GPU under torchrun (bf16 autocast auto, NCCL process group of 1).
  run quickstart 75 torchrun --standalone --nproc_per_node 1 -m trainer run examples/quickstart.yaml
  # 2. Full Fashion-MNIST with the bundled model: the number to put beside the published table.
  run full 210 python3 -m trainer run examples/fashion-mnist-full.yaml
  # 3. fp16 + GradScaler (the last stage cut to 2 epochs), then the same job again: finished, nothing to do.
  sed -e 's/name: quickstart/name: quickstart-fp16/' -e 's/^  seed: 0/  seed: 0\n  speed: {amp: fp16}/' \
    -e 's/epochs: 6/epochs: 2/' examples/quickstart.yaml > /tmp/fp16.yaml
  run fp16 50 python3 -m trainer run /tmp/fp16.yaml
  run fp16-again 20 python3 -m trainer run /tmp/fp16.yaml
}
quality() {
  # 4. The quality table's 1,000 images/class row, seed 0 (6 runs at once, ~270 s; all three seeds do not
  #    fit one session's device time: seeds 1 and 2 were run on the CPU, docs/results.md).
  run quality $((570 - SECONDS)) python3 benchmarks/quality_table.py --budgets 1000 --seeds 0 --parallel 6 \
    --section quality-1000 --out docs/results.md
  cp docs/results.md "$OUT/results.md"
}
# 5. The trainer against the reference's plain loop on CUDA (docs/benchmarks.md, sections trainer-cuda*):
#    Thaw's defaults, then Thaw in fp32 and contiguous memory, to tell precision and layout from the rest.
bench() {
  local common=(--per-class 500 --batch 256 --out docs/benchmarks.md)
  run bench 150 python3 benchmarks/bench_trainer.py "${common[@]}" --section trainer-cuda
  run bench-fp32 150 python3 benchmarks/bench_trainer.py "${common[@]}" --section trainer-cuda-fp32 \
    --thaw-speed amp=off --thaw-speed channelsLast=off
  cp docs/benchmarks.md "$OUT/benchmarks.md"
}
# 6. Speed on the GPU, one call of under 8 minutes (run's timeout_s=540): Thaw's defaults (warm-up beside
#    loading, one batch shape, data on the device, fused SGD, bf16, channelsLast measured) against the plain
#    fp32 loop: steady state and whole stages of 100 and 1,000 steps, EfficientNet-Lite0 at batch 1,024
#    (goal 40,000 img/s), ResNet-50 at 224 px from random init, bf16, batch 256. Sections trainer-cuda-*.
perf() {
  local b=(python3 benchmarks/bench_trainer.py --out docs/benchmarks.md)
  run perf-100 110 "${b[@]}" --per-class 500 --batch 256 --steps 100 --section trainer-cuda-100
  run perf-1000 130 "${b[@]}" --per-class 500 --batch 256 --steps 1000 --cases full --section trainer-cuda-1000
  run perf-b1024 100 "${b[@]}" --per-class 5000 --batch 1024 --steps 200 --cases full --section trainer-cuda-b1024
  run perf-resnet50 120 "${b[@]}" --arch resnet50 --weights none --image-size 224 --per-class 260 --batch 256 \
    --steps 100 --cases full --section trainer-cuda-resnet50
  cp docs/benchmarks.md "$OUT/benchmarks.md"
}
# 7. Decoding on the GPU machine's CPUs and nvJPEG on the device, and a 224 px epoch with data.workers auto
#    (16 CPUs: 8 workers) against 0, where the GPU waits on decoding (section decode-cuda; ~3 minutes).
decode() {
  run decode 300 python3 benchmarks/bench_decode.py --images 400 --per-class 100 --cuda --section decode-cuda \
    --out docs/benchmarks.md
  cp docs/benchmarks.md "$OUT/benchmarks.md"
}
steps=("$@"); [ $# -gt 0 ] || steps=(checks quality)
# 8. The model artifact from a test split held on the GPU (dataOnDevice auto): the quickstart's last
#    stage cut to 1 epoch, with a TorchScript export checked on the test split (~1 minute; ONNX
#    Runtime's wheels would not fit the carry limit beside .data/).
exports() {
  sed -e 's/name: quickstart/name: quickstart-export/' \
    -e 's/^  seed: 0/  seed: 0\n  export: [safetensors, torchscript]/' -e 's/epochs: 6/epochs: 1/' \
    examples/quickstart.yaml > /tmp/export.yaml
  run exports 120 python3 -m trainer run /tmp/export.yaml
}
for step in "${steps[@]}"; do
  case $step in checks | quality | bench | perf | decode | exports) $step ;; *) echo "unknown step $step" >&2; exit 2 ;; esac
done
exit 0
