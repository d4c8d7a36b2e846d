#!/usr/bin/env bash
# The GPU install (README "Install on a GPU machine"; the Dockerfile runs this same script): this checkout, editable,
# with FlashInfer, into the current Python. That Python must already have a CUDA build of torch (>= 2.6; the PyTorch
# CUDA images ship one; else: pip install torch --index-url https://download.pytorch.org/whl/cu128): the package's
# own requirement is a range, so pip keeps the torch it finds, and the CPU pin (constraints-cpu.txt) is not used.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  echo "install_gpu: $PYTHON has no CUDA build of torch; install one first, e.g." >&2
  echo "  $PYTHON -m pip install torch --index-url https://download.pytorch.org/whl/cu128" >&2
  exit 1
fi
# the old distribution name `diffgentor` is also an unrelated PyPI project: neither may shadow this checkout
"$PYTHON" -m pip uninstall -q -y diffgentor >/dev/null 2>&1 || true
"$PYTHON" -m pip install -e '.[gpu]'
"$PYTHON" -c "import torch, diffgentor; print('diffgentor', diffgentor.__version__, 'with torch', torch.__version__, \
'CUDA', torch.version.cuda, '-', torch.cuda.device_count(), 'GPU(s) visible')"
