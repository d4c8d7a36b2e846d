#!/usr/bin/env bash
# Download FlashInfer and what its import and JIT need (bench/flashinfer_offline.txt; no torch) as wheels for CPython
# 3.11 (this project's) and 3.12 (the GPU machines': torch 2.11 + CUDA 13) on x86-64 Linux, into DEST (default
# ./wheels, git-ignored). Bring DEST to the offline machine; bench/gpu_check.sh installs from it.
#   bash bench/flashinfer_wheels.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-wheels}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 linux_x86_64; do
  PLATFORMS+=(--platform "$p")
done
mkdir -p "$DEST"
for version in 3.11 3.12; do
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$version" "${PLATFORMS[@]}" -d "$DEST" \
    -r bench/flashinfer_offline.txt
done
ls "$DEST"
