#!/usr/bin/env bash
# Python stacks of one captured generate on a lent CUDA machine (about 1.5 minutes; carry
# ".gpu-wheels" from benchmarks/gpu_wheels.sh, which holds py-spy). Writes the raw stacks,
# gzipped, to $OUT/stacks.txt.gz, then a summary of the model thread's time by llminstr
# frame. Seen on an H100 (2026-11-27): --native at 1000 Hz fell 88 s behind and was killed
# with nothing written; without --native at 250 Hz a 192-token run gave 21 MB of raw
# stacks, over the 16 MB a device call returns, hence the gzip.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/llminstr-gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ -d .gpu-wheels ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/llminstr-site .gpu-wheels/*.whl 2>&1 | tail -3
  export PYTHONPATH=$PWD:/tmp/llminstr-site
  SPY=/tmp/llminstr-site/bin/py-spy
else
  export PYTHONPATH=$PWD
  SPY=py-spy
fi
export PYTHONUNBUFFERED=1
timeout 150 "$SPY" record --threads --rate 250 --format raw -o /tmp/stacks.txt -- \
  $PY benchmarks/gpu_growth.py --captured-only --new-tokens "${TOKENS:-192}"
gzip -c /tmp/stacks.txt >"$OUT/stacks.txt.gz"
$PY benchmarks/stack_summary.py /tmp/stacks.txt | tee "$OUT/stack_summary.txt"
