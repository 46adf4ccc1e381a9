#!/usr/bin/env bash
# One-shot GPU check on a lent CUDA machine, which reaches no network: prepare the wheels it
# lacks here first (bash benchmarks/gpu_wheels.sh), carry ".gpu-wheels" with the run, and run
#   bash benchmarks/gpu_check.sh
# It runs the CUDA tests, then the capture benchmarks on the GPU, and prints a short table.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/llminstr-gpu}
mkdir -p "$OUT"
PY=${PY:-python3}  # on the GPU image, the python that holds torch
export PYTHONPATH=$PWD  # llminstr from the working tree, no install step
if [ -d .gpu-wheels ]; then
  $PY -m pip install -q --no-index --no-deps .gpu-wheels/*.whl 2>&1 | tail -3
fi
$PY - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
import llminstr, zarr, numcodecs, dask
print("llminstr", llminstr.__version__, "zarr", zarr.__version__, "numcodecs", numcodecs.__version__)
PYEOF
echo "== CUDA tests"
timeout 240 $PY -m pytest -q -m cuda tests/test_capture.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/cuda_tests.txt"
echo "== GPU capture benchmarks (overhead on a GPT-2-small shape, sink, memory)"
timeout 300 $PY benchmarks/bench_capture.py --device cuda --quick --json "$OUT/bench_gpu.json" 2>&1 \
  | grep -v "held the model back" | tail -8 | tee "$OUT/bench_gpu.txt"
