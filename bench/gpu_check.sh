#!/usr/bin/env bash
# GPU check of the scale-out paths (FSDP2 learner in bf16 on CUDA, collective weight sync between two
# processes on one GPU). Needs torch + transformers + this repo; not part of CI. See bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
exec "$PY" bench/gpu_check.py
