#!/usr/bin/env bash
# Run on the development machine (it reaches PyPI): downloads into .gpu-wheels/ the few
# Python 3.12 wheels that the lent GPU machines' image lacks (it has torch, numpy, h5py,
# numba, transformers, pytest; it reaches no network), plus py-spy for stacks taken by hand.
# About 7 MB: carry it with the run (carry [".gpu-wheels"]), then run
# benchmarks/gpu_check.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
rm -rf .gpu-wheels && mkdir -p .gpu-wheels
"$PIP" download -q --only-binary=:all: --no-deps --implementation cp --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  -d .gpu-wheels \
  "zarr==3.1.6" "numcodecs>=0.13" "crc32c>=2.4" google-crc32c donfig "dask==2026.8.0" partd locket \
  "jsonschema>=4.20" referencing rpds-py jsonschema-specifications typing_extensions \
  pytest-timeout py-spy
du -sh .gpu-wheels
