#!/usr/bin/env bash
# One GPU run (< 10 minutes, one H100 or H200, no checkpoint, no network) that proves or disproves each GPU path with
# assertions. The sections (their Python is bench/gpu_check.py; `python -m diffgentor.bench.gpu_check --list`):
#   1 env_sdpa     environment + which SDPA kernels take the engine's attention calls at the real masked-GQA shapes
#   2 attention    torch and FlashInfer paged attention vs an fp32 reference (heads 32/8 and 4/1, page size 16)
#   3 moe          grouped bf16 / FP8 MoE vs the reference at real widths, TP/EP shard sums, TFLOP/s; fused FlashInfer
#   4 fp8_stack    FP8 experts vs bf16 on a 2-layer real-width stack (logits cosine, velocity rel-L2)
#   5 cuda_graphs  decode graphs at real width, batch 1 and 16: replay == static forward, speedup, pool bytes;
#                  whole decode steps graphs on / off at B = 1, 16, 64 (FlashInfer graph-mode decode wrapper)
#   6 e2e_edit     one Distil edit at real width and 2 layers on the default path; measured peak <= plan x 1.1
#   7 vae          VAE decode (1, 2 images) and encode peaks within 10% of the plan
#   8 projection   e2e_edit's per-layer times extrapolated to 32 layers: images/min vs the card's roofline
#   9 parallel_layouts  per-step image time per layout (tp1, cfg2, sp2, tp2, tp2xcfg2, tp2xsp2, ...) that fits the
#                  visible GPUs; one GPU: the multi-rank layouts are skipped with the reason
# At second 0 the FlashInfer JIT builds start in the background (bench/gpu_check.py --jit: attention, fused MoE in
# bf16 and FP8 block scales); `import flashinfer` failing fails the run. Each section writes OUT/<section>.json as
# soon as it ends; the result file gathers them.
#
#   bash bench/gpu_check.sh            # on the GPU machine
#   bash bench/gpu_check.sh --dry-run  # CPU mode: every section's CPU-provable part (also what runs without CUDA)
#
# Offline GPU machines: bring ./wheels made by bench/flashinfer_wheels.sh (installed here when flashinfer is missing).
# Environment: OUT_DIR (default bench/results/gpu_check-<stamp>), RESULT_JSON (default
# bench/results/<card>-gpu-check.json), BUDGET_S (default 570: no section gets more than what is left),
# GPU_CHECK_SECTIONS (a subset, e.g. "env_sdpa moe"). Exit status: the number of failed sections.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ $DRY = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA device: running the CPU-provable parts (as --dry-run)"
  DRY=1
fi
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT_DIR:-bench/results/gpu_check-$STAMP}
mkdir -p "$OUT"
BUDGET=${BUDGET_S:-570}
T0=$(date +%s)
export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-16}
CARD=cpu
[ $DRY = 0 ] && CARD=$("$PY" -c "from diffgentor.bench.gpu_check import card_name; print(card_name())")
RESULT_JSON=${RESULT_JSON:-bench/results/$CARD-gpu-check.json}
FLAG=""
[ $DRY = 1 ] && FLAG="--dry-run"
echo "=== gpu_check: card=$CARD dry_run=$DRY budget=${BUDGET}s out=$OUT"

JIT_PID=""
if [ $DRY = 0 ]; then  # second 0: FlashInfer present (or installed from ./wheels), then its builds in the background
  if ! "$PY" -c "import flashinfer" >/dev/null 2>&1; then
    if ls wheels/*.whl >/dev/null 2>&1; then
      "$PY" -m pip install -q --no-index --no-deps --find-links wheels -r bench/flashinfer_offline.txt
    else
      "$PY" -m pip install -q -e ".[gpu]"
    fi
  fi
  if ! "$PY" -c "import flashinfer; print('flashinfer', flashinfer.__version__)"; then
    echo "!!!!!! import flashinfer failed: the run fails (see docs/flashinfer.md, Installing)"
    exit 1
  fi
  "$PY" -m diffgentor.bench.gpu_check --jit --out "$OUT" >"$OUT/jit.log" 2>&1 &
  JIT_PID=$!
fi

FAILED=0
# run order: the fused MoE is checked last, to give its JIT build the most time
ORDER="env_sdpa attention fp8_stack cuda_graphs vae e2e_edit projection moe parallel_layouts"
declare -A LIMIT=([env_sdpa]=45 [attention]=75 [fp8_stack]=75 [cuda_graphs]=90 [vae]=45 [e2e_edit]=150
  [projection]=15 [moe]=90 [parallel_layouts]=420)
for name in ${GPU_CHECK_SECTIONS:-$ORDER}; do
  left=$((BUDGET - ($(date +%s) - T0) - 5))
  limit=${LIMIT[$name]:-60}
  [ $DRY = 1 ] && limit=$((limit * 4))  # the CPU parts run on a slower device
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "!!!!!! [$name] SKIPPED: the ${BUDGET}s budget is spent"
    FAILED=$((FAILED + 1))
    continue
  fi
  echo "=== [$name] (limit ${limit}s)"
  if timeout "$limit" "$PY" -m diffgentor.bench.gpu_check --section "$name" --out "$OUT" $FLAG >"$OUT/$name.log" 2>&1
  then
    echo "--- [$name] ok"
  else
    FAILED=$((FAILED + 1))
    echo "!!!!!! [$name] FAILED (log: $OUT/$name.log)"
  fi
  grep -E "^(ok|FAIL) " "$OUT/$name.log" | sed 's/^/    /'
done
if [ -n "$JIT_PID" ]; then
  kill "$JIT_PID" 2>/dev/null && echo "FlashInfer JIT builds still running at the end: stopped (see $OUT/jit.log)"
fi

mkdir -p "$(dirname "$RESULT_JSON")"
"$PY" - "$OUT" "$RESULT_JSON" "$CARD" "$DRY" "$FAILED" "$(($(date +%s) - T0))" <<'EOF'
import json, sys
from pathlib import Path

from diffgentor.bench.gpu_check import SECTIONS

out, dest, card, dry, failed, total = sys.argv[1:]
result = {"card": card, "dry_run": dry == "1", "failed_sections": int(failed), "total_s": int(total), "sections": {}}
for name, what in SECTIONS:
    p = Path(out, f"{name}.json")
    result["sections"][name] = json.loads(p.read_text()) if p.is_file() else {"ok": False, "missing": True}
    result["sections"][name]["proves"] = what
jit = Path(out, "jit.json")
if jit.is_file():
    result["jit"] = json.loads(jit.read_text())
Path(dest).write_text(json.dumps(result, indent=2, default=str) + "\n")
print("wrote", dest)
EOF
echo "failed sections: $FAILED in $(($(date +%s) - T0))s"
exit "$FAILED"
