#!/usr/bin/env bash
# Serves the embedded model (SmolLM2-135M-Instruct, float32) with vLLM on this machine's CPU, for
# `specert eval --target http://127.0.0.1:PORT/v1`.
#
#   scripts/serve-embedded.sh [PORT] [extra vLLM arguments...]     (default port 8000; runs in the foreground)
#
# vLLM comes from scripts/install-vllm.sh (SPECERT_VLLM_PYTHON names another interpreter). The model is written once
# as a Hugging Face folder (vLLM cannot read the GGUF) to ~/.cache/specert/smollm2-135m-hf. Every token's
# log-probability is allowed (--max-logprobs -1); float32, because bfloat16 log-probabilities come in steps of 1/8
# and tie. Example, with vLLM's own n-gram speculative decoding:
#   scripts/serve-embedded.sh 8000 --speculative-config '{"method": "ngram", "num_speculative_tokens": 4,
#                                                         "prompt_lookup_min": 2, "prompt_lookup_max": 4}'
set -euo pipefail
PORT=${1:-8000}
shift || true
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
exec "$PYTHON" - "$PORT" "$@" <<'PY'
import os
import sys

sys.path.insert(0, "tests")
from vllm_server import _environment, embedded_hf_folder, vllm_python  # noqa: E402

port, extra = sys.argv[1], sys.argv[2:]
folder = embedded_hf_folder()
python = vllm_python()
command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--served-model-name",
           "smollm2", "--host", "127.0.0.1", "--port", port, "--dtype", "float32", "--enforce-eager",
           "--max-logprobs", "-1", *extra]
print("serving", folder, "at", f"http://127.0.0.1:{port}/v1", file=sys.stderr)
os.execve(str(python), command, _environment(python))
PY
