#!/usr/bin/env bash
# One budgeted call on the GPU machine (device tool, repo root): build for sm_90a, the CUDA tests, the headline
# benchmarks, summary.md; everything under $OUT (or ./bench_out), appended stage by stage. The stages, deadlines
# and environment switches are documented in benchmarks/gpu_check.py.
#   usage: bash benchmarks/gpu_check.sh [headline benchmark names...]   (default: all, in order of value)
#   GPU_CHECK_BUDGET_S=480   wall-time budget of the whole call, seconds
#   GPU_CHECK_DRY=1          the same stages on a CPU machine with CPU stand-ins (what tests/test_gpu_check.py runs)
# Peers: download the wheels of benchmarks/peer-wheels.txt into .whl/ (the command is in that file) and name .whl
# in the device tool's carry; they are installed from there when the folder holds any.
set -u
cd "$(dirname "$0")/.." || exit 2
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
