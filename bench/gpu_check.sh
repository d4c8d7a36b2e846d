#!/usr/bin/env bash
# One short GPU run: fast kernels vs references on the device, then the kernel micro-benchmarks.
#
# Prepare (on a machine with internet; ./wheels is git-ignored):
#   pip download flashinfer-python==0.5.0 --no-deps -d wheels
#   pip download apache-tvm-ffi==0.1.15.post2 --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d wheels
# Run from the repository root:  bash bench/gpu_check.sh   (outputs under bench/results/gpu_check-<stamp>/)
# Every section runs even when an earlier one fails; each failure is printed loudly and the exit status is
# the number of failed sections. FlashInfer's first-use JIT is timed on its own (attention, then MoE, which
# is slow: SKIP_MOE_JIT=1 skips it).
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT_DIR:-bench/results/gpu_check-$STAMP}
mkdir -p "$OUT"
export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp}
export MAX_JOBS=${MAX_JOBS:-16}
FAILED=0
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

section() {  # section NAME TIMEOUT_S CMD...
  local name=$1 limit=$2
  shift 2
  echo "=== [$name] $*" | tee -a "$SUMMARY"
  local t0=$(date +%s.%N)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')")
  if [ $rc -ne 0 ]; then
    FAILED=$((FAILED + 1))
    echo "!!!!!! [$name] FAILED rc=$rc after ${dt}s (log: $OUT/$name.log)" | tee -a "$SUMMARY"
    tail -n 25 "$OUT/$name.log"
  else
    echo "--- [$name] ok in ${dt}s" | tee -a "$SUMMARY"
  fi
}

section env 60 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'; which nvcc && nvcc --version"
if ls wheels/*.whl >/dev/null 2>&1; then
  section install_wheels 180 "$PY" -m pip install --no-index --no-deps --find-links wheels wheels/*.whl
else
  echo "!!!!!! no wheels/ folder: FlashInfer paths will be skipped (see the header to prepare it)" | tee -a "$SUMMARY"
  FAILED=$((FAILED + 1))
fi
section import_flashinfer 120 "$PY" -c "import flashinfer, flashinfer.fused_moe; print(flashinfer.__version__)"
# JIT timing, attention first (prefill FA2/FA3, ragged, decode modules), at the real head shapes
section jit_attention 420 "$PY" -m diffgentor.bench.kernels --skip moe --tokens 64 --warmup 1 --repeat 1 \
  --attn flashinfer-mask flashinfer-segments flashinfer-cascade --out "$OUT/jit_attention.json"
section test_gpu 420 "$PY" -m pytest -q -m gpu tests/test_kernels_fast.py -k "not flashinfer or attention" \
  --junitxml="$OUT/test_gpu.xml"
if [ "${SKIP_MOE_JIT:-0}" != 1 ]; then
  section jit_moe 600 "$PY" -m diffgentor.bench.kernels --skip attention --tokens 8 --warmup 1 --repeat 1 \
    --moe-impls flashinfer --out "$OUT/jit_moe.json"
  section test_gpu_moe_flashinfer 300 "$PY" -m pytest -q -m gpu tests/test_kernels_fast.py -k "moe and flashinfer"
fi
section bench 600 "$PY" -m diffgentor.bench.kernels --repeat 5
cp bench/results/*-kernels.json "$OUT/" 2>/dev/null || true
echo "failed sections: $FAILED (summary: $SUMMARY)" | tee -a "$SUMMARY"
exit "$FAILED"
