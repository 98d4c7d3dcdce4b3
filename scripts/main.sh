#!/usr/bin/env bash
# The main job on the embedded default: set up (first run only), then run
# SmolLM2-135M-Instruct through vLLM with and without specstream and print
# tokens/s of both, the ratio and the acceptance length. Extra args go to
# `specstream demo` (e.g. --dtype float32 --max-tokens 64).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
exec "$ROOT/.venv/bin/specstream" demo "$@"
