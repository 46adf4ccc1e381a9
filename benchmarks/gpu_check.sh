#!/usr/bin/env bash
# One-shot GPU check for a lent CUDA machine (see DEVELOPERS' brief): installs the project,
# runs the CUDA tests, then the capture benchmarks on the GPU, and prints a short table.
# Usage (from the repository root, on the device machine): bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/llminstr-gpu}
mkdir -p "$OUT"
python3 -m venv .venv-gpu >/dev/null 2>&1 || true
PY=.venv-gpu/bin/python
# The machine's own CUDA torch if the system python has one; else whatever pip resolves.
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PY=python3
  $PY -m pip install -q -e ".[dev]" 2>&1 | tail -2
else
  $PY -m pip install -q -e ".[dev]" 2>&1 | tail -2
fi
$PY - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PYEOF
echo "== CUDA tests"
timeout 240 $PY -m pytest -q -m cuda tests/ -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/cuda_tests.txt"
echo "== GPU capture benchmarks (overhead on GPT-2-small shape, sink, memory)"
timeout 300 $PY benchmarks/bench_capture.py --device cuda --quick --json "$OUT/bench_gpu.json" 2>&1 | tail -8 | tee "$OUT/bench_gpu.txt"
