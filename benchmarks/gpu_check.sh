#!/usr/bin/env bash
# One call on the GPU machine (device tool, repo root): build the extension with CUDA, run the CUDA tests with
# OPTIM_REQUIRE_CUDA=1 (a skipped CUDA test is a failure), then the benchmarks. Logs and JSON go to $OUT
# (the device tool's output folder) or ./bench_out. The machine's own torch is used (build isolation off).
#   usage: bash benchmarks/gpu_check.sh [benchmark names...]   (default: steps stiefel)
set -uo pipefail  # pipefail: a pipeline fails when pytest does, whatever tee/tail do
out=${OUT:-bench_out}
mkdir -p "$out"
if (( $# )); then benchmarks=("$@"); else benchmarks=(steps stiefel); fi
status=0
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"9.0a;8.0+PTX"}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$out/device.txt"

echo "== build"
start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "built in $(( $(date +%s) - start )) s"

echo "== CUDA tests"
OPTIM_REQUIRE_EXTENSION=1 OPTIM_REQUIRE_CUDA=1 python3 -m pytest -m cuda -q -p no:cacheprovider 2>&1 \
  | tee "$out/cuda_tests.log" | tail -15 || status=1

echo "== all tests on the GPU machine (CPU ones too)"
OPTIM_REQUIRE_EXTENSION=1 OPTIM_REQUIRE_CUDA=1 python3 -m pytest -q -p no:cacheprovider -x 2>&1 \
  | tee "$out/all_tests.log" | tail -5 || status=1

for name in "${benchmarks[@]}"; do
  echo "== benchmark $name"
  python3 -m benchmarks "$name" --device cuda --out "$out" 2>&1 | tee "$out/$name.txt" || status=1
done
exit $status
