#!/usr/bin/env bash
# One short GPU check (< 10 minutes): install the `gpu` extra if missing, the `gpu` tests (torch fast paths, FP8,
# FlashInfer attention and MoE in bf16 and FP8 against the torch references at the real layer shapes), the kernel
# micro-benchmarks, and a whole-engine run of a random model with the real layer shapes but 2 of 32 layers at
# 1024x1024 with think, extrapolated to 32 layers (bench/engine_run.py). Writes bench/results/<card>-gpu-check.json.
#
# Run from anywhere:  bash bench/gpu_check.sh
# Without a GPU (or with FORCE_CPU=1) the CPU sections run (environment, memory plans, an engine smoke run of the
# same code path on tiny shapes) and every GPU section is SKIPPED loudly.
# An offline GPU machine needs the FlashInfer wheels brought along (./wheels is git-ignored); prepare them with
#   pip download flashinfer-python==0.6.17 --no-deps -d wheels
#   pip download apache-tvm-ffi --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d wheels
# Environment: OUT_DIR (logs; default bench/results/gpu_check-<stamp>), RESULT_JSON (default
# bench/results/<card>-gpu-check.json), BUDGET_S (whole-script budget, default 570 s: a section never gets more
# than what is left), FORCE_CPU=1, SKIP_MOE_JIT=1 (skip FlashInfer's slow fused-MoE JIT).
# Every section logs its timing and the script continues past failures; the exit status is the number of failed
# sections (skipped ones do not count).
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT_DIR:-bench/results/gpu_check-$STAMP}
mkdir -p "$OUT"
export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp}
export MAX_JOBS=${MAX_JOBS:-16}
BUDGET=${BUDGET_S:-570}
T_START=$(date +%s)
FAILED=0
SUMMARY="$OUT/summary.txt"
SECTIONS="$OUT/sections.tsv"
: >"$SUMMARY"
: >"$SECTIONS"

HAVE_GPU=0
if [ "${FORCE_CPU:-0}" != 1 ] && "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
  >/dev/null 2>&1; then
  HAVE_GPU=1
fi
if [ $HAVE_GPU = 1 ]; then
  CARD=$("$PY" -c "import re, torch; n = torch.cuda.get_device_name(0).lower(); \
m = re.search(r'\b([abhlg]\d{2,3})\b', n); print(m.group(1) if m else re.sub(r'[^a-z0-9]+', '-', n).strip('-'))")
else
  CARD=cpu
fi
RESULT_JSON=${RESULT_JSON:-bench/results/$CARD-gpu-check.json}
echo "=== gpu_check: card=$CARD have_gpu=$HAVE_GPU budget=${BUDGET}s logs=$OUT" | tee -a "$SUMMARY"

record() {  # record NAME STATUS SECONDS
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$OUT/$1.log" >>"$SECTIONS"
}

section() {  # section NAME TIMEOUT_S CMD...
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - T_START) - 10))
  if [ "$left" -lt 15 ]; then
    echo "!!!!!! [$name] SKIPPED: the ${BUDGET}s budget is spent" | tee -a "$SUMMARY"
    record "$name" skipped-budget 0
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== [$name] (limit ${limit}s) $*" | tee -a "$SUMMARY"
  local t0 t1 rc dt
  t0=$(date +%s.%N)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  if [ $rc -ne 0 ]; then
    FAILED=$((FAILED + 1))
    echo "!!!!!! [$name] FAILED rc=$rc after ${dt}s (log: $OUT/$name.log)" | tee -a "$SUMMARY"
    tail -n 25 "$OUT/$name.log"
    record "$name" "failed-rc$rc" "$dt"
  else
    echo "--- [$name] ok in ${dt}s" | tee -a "$SUMMARY"
    record "$name" ok "$dt"
  fi
}

gpu_section() {  # like section, but SKIPPED (loudly) without a CUDA device
  if [ $HAVE_GPU != 1 ]; then
    echo "!!!!!! [$1] SKIPPED: no CUDA device (GPU-only section)" | tee -a "$SUMMARY"
    record "$1" skipped-no-gpu 0
    return
  fi
  section "$@"
}

# ------------------------------------------------------------------------------------------------ environment
section env 60 bash -c "'$PY' -c 'import torch; print(torch.__version__, torch.version.cuda, \
torch.cuda.is_available() and torch.cuda.get_device_name(0), torch.cuda.is_available() and \
torch.cuda.get_device_capability(0))'; (nvidia-smi || true); (which nvcc && nvcc --version || true)"

# ------------------------------------------------------------------------------------------------ the gpu extra
install_gpu_extra() {
  if "$PY" -c "import flashinfer" >/dev/null 2>&1; then
    echo "flashinfer already installed"
  elif ls wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install --no-index --no-deps --find-links wheels wheels/*.whl
  else
    "$PY" -m pip install -e ".[gpu]"
  fi
  "$PY" -c "import flashinfer, flashinfer.fused_moe; print('flashinfer', flashinfer.__version__)"
}
export -f install_gpu_extra
export PY OUT CARD
gpu_section install_gpu_extra 180 bash -c install_gpu_extra

# ------------------------------------------------------------------------------------------------ memory plans
plan_memory() {  # the README layouts on the real config (weights, activations, KV) and this card's own plan
  "$PY" - "$OUT" "$CARD" <<'EOF'
import json, sys
from diffgentor.bench.engine_run import write_real_config
from diffgentor.server.cli import main

out, card = sys.argv[1], sys.argv[2]
ckpt = write_real_config(f"{out}/real_config")
layouts = [["--gpu", "h200", "--quantization", "fp8"], ["--gpu", "h100", "--tensor-parallel-size", "8"],
           ["--gpu", "h100", "--tensor-parallel-size", "4", "--quantization", "fp8"],
           ["--gpu", "h100", "--tensor-parallel-size", "4", "--quantization", "fp8", "--expert-parallel"]]
if card in ("h100", "h200", "b200"):
    layouts.append(["--gpu", card, "--quantization", "fp8"])
for args in layouts:
    print("$ diffgentor plan-memory", " ".join(args), flush=True)
    rc = main(["plan-memory", str(ckpt), *args])
    assert rc == 0, f"{args} does not fit"
EOF
}
export -f plan_memory
section plan_memory 120 bash -c plan_memory

# ------------------------------------------------------------------------------------------------ correctness
gpu_section test_gpu_torch 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8.py \
  tests/test_kernels_fast.py -k "not flashinfer" --junitxml="$OUT/test_gpu_torch.xml"

# ------------------------------------------------------------------------------------------------ CUDA graphs
# decode-only steps: capture + replay == eager (gpu test), then decode step time eager vs graph replay
gpu_section test_gpu_cuda_graph 180 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_graph.py \
  --junitxml="$OUT/test_gpu_cuda_graph.xml"
gpu_section bench_decode 240 "$PY" -m diffgentor.bench.decode --shapes real --layers 2 --device cuda \
  --batch 1 16 64 --context 2048 --modes eager graphs --steps 10 --save-result "$OUT/decode.json"

# ------------------------------------------------------------------------------------------------ whole engine
if [ $HAVE_GPU = 1 ]; then
  section engine_real 300 "$PY" -m diffgentor.bench.engine_run --shapes real --layers 2 --size 1024x1024 \
    --think-tokens 256 --steps 50 --out "$OUT/engine_run.json"
else
  echo "!!!!!! [engine_real] SKIPPED: no CUDA device; running the same code path on tiny shapes (engine_smoke)" \
    | tee -a "$SUMMARY"
  record engine_real skipped-no-gpu 0
  section engine_smoke 240 "$PY" -m diffgentor.bench.engine_run --shapes tiny --device cpu --layers 2 \
    --size 256x256 --think-tokens 2 --steps 1 --kv-blocks 128 --out "$OUT/engine_smoke.json"
fi

# ------------------------------------------------------------------------------------------------ kernels
gpu_section bench_kernels 150 "$PY" -m diffgentor.bench.kernels --repeat 5 --out "$OUT/kernels.json"
gpu_section test_gpu_flashinfer_attention 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_kernels_fast.py -k "flashinfer and attention" --junitxml="$OUT/test_gpu_flashinfer_attention.xml"
gpu_section engine_real_fp8 240 "$PY" -m diffgentor.bench.engine_run --shapes real --layers 2 --size 1024x1024 \
  --think-tokens 64 --steps 20 --quantization fp8 --out "$OUT/engine_run_fp8.json"
if [ "${SKIP_MOE_JIT:-0}" != 1 ]; then  # FlashInfer's fused MoE JIT takes minutes: last, within what is left
  gpu_section test_gpu_flashinfer_moe 420 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_fast.py \
    tests/test_fp8.py -k "moe and flashinfer or flashinfer_fp8" --junitxml="$OUT/test_gpu_flashinfer_moe.xml"
else
  echo "!!!!!! [test_gpu_flashinfer_moe] SKIPPED: SKIP_MOE_JIT=1" | tee -a "$SUMMARY"
  record test_gpu_flashinfer_moe skipped-by-request 0
fi

# ------------------------------------------------------------------------------------------------ result file
mkdir -p "$(dirname "$RESULT_JSON")"
"$PY" - "$OUT" "$RESULT_JSON" "$CARD" "$HAVE_GPU" "$FAILED" "$(($(date +%s) - T_START))" <<'EOF'
import json, sys
from pathlib import Path

out, dest, card, have_gpu, failed, total = sys.argv[1:]
sections = []
for line in Path(out, "sections.tsv").read_text().splitlines():
    name, status, seconds, log = line.split("\t")
    sections.append({"name": name, "status": status, "seconds": float(seconds), "log": log})
result = {"card": card, "have_gpu": have_gpu == "1", "failed_sections": int(failed), "total_s": int(total),
          "sections": sections}
for name in ("engine_run", "engine_run_fp8", "engine_smoke", "kernels", "decode"):
    p = Path(out, f"{name}.json")
    if p.is_file():
        try:
            result[name] = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            result[name] = {"unreadable": str(e)}
Path(dest).write_text(json.dumps(result, indent=2) + "\n")
print("wrote", dest)
EOF
echo "failed sections: $FAILED in $(($(date +%s) - T_START))s (summary: $SUMMARY, result: $RESULT_JSON)" \
  | tee -a "$SUMMARY"
exit "$FAILED"
