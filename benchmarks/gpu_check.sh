#!/usr/bin/env bash
# One-shot GPU check on a lent CUDA machine, which reaches no network: prepare the wheels it
# lacks here first (bash benchmarks/gpu_wheels.sh), carry ".gpu-wheels" with the run, and run
#   bash benchmarks/gpu_check.sh
# It runs the CUDA tests (and the staging and capture tests, as a check of that machine's
# library versions), a profile of the hooks in eight variants (benchmarks/gpu_profile.py),
# the capture benchmarks on the GPU, the cost of one small copy (benchmarks/gpu_copy_probe.py),
# and the overhead runs again with deferred copies; each
# section prints a short table. About 5 minutes on an H100: give the device call
# timeout_s=600. Full logs go to $OUT (default /tmp/llminstr-gpu). For Python stacks of a
# captured generate, run benchmarks/gpu_pyspy.sh (about 1.5 minutes) instead.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/llminstr-gpu}
mkdir -p "$OUT"
PY=${PY:-python3}  # on the GPU image, the python that holds torch
export PYTHONUNBUFFERED=1
if [ -d .gpu-wheels ]; then  # into a folder of their own: the image's environment stays as it is
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/llminstr-site .gpu-wheels/*.whl 2>&1 | tail -3
  export PYTHONPATH=$PWD:/tmp/llminstr-site
else
  export PYTHONPATH=$PWD  # llminstr from the working tree, no install step
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
$PY - <<'PYEOF' 2>&1 | tee "$OUT/env.txt"
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
import llminstr, zarr, numcodecs, dask, numpy, numba, transformers
print("llminstr", llminstr.__version__, "zarr", zarr.__version__, "numcodecs", numcodecs.__version__,
      "dask", dask.__version__, "numpy", numpy.__version__, "numba", numba.__version__,
      "transformers", transformers.__version__)
PYEOF

echo "== tests: CUDA staging (device and stand-in), lent chunks, the capture engine"
# (the image has no hdf5plugin: the tests that write HDF5 are left out here, by name; CI runs them)
timeout 150 $PY -m pytest -q -p no:cacheprovider -rs --timeout 60 -k "not hooks_bf16 and not hdf5 and not keyboard_interrupt" \
  tests/test_cuda.py tests/test_staging.py tests/test_writer_lent.py tests/test_capture.py \
  >"$OUT/tests.txt" 2>&1
echo "pytest exit $?"; tail -15 "$OUT/tests.txt"

echo "== hooks during a captured generate: wall and CPU per token, by variant"
timeout 120 $PY benchmarks/gpu_profile.py >"$OUT/profile.txt" 2>&1
echo "profile exit $?"; tail -9 "$OUT/profile.txt"

echo "== capture benchmarks on the GPU"
timeout 300 $PY benchmarks/bench_capture.py --device cuda --json "$OUT/bench_gpu.json" \
  >"$OUT/bench_gpu.txt" 2>&1
echo "bench exit $?"
grep -v "held the model back" "$OUT/bench_gpu.txt" | tail -10

echo "== one small device-to-host copy: host CPU and stream time per call"
timeout 60 $PY benchmarks/gpu_copy_probe.py >"$OUT/copy_probe.txt" 2>&1
echo "probe exit $?"; tail -8 "$OUT/copy_probe.txt"

echo "== the same overhead runs with small copies deferred to the end of each pass"
timeout 180 $PY benchmarks/bench_capture.py --device cuda --defer-copies --skip sink memory \
  --json "$OUT/bench_gpu_deferred.json" >"$OUT/bench_gpu_deferred.txt" 2>&1
echo "bench exit $?"
grep -v "held the model back" "$OUT/bench_gpu_deferred.txt" | tail -6

