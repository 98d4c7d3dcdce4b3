#!/usr/bin/env bash
# The test suite: set up (first run only), then pytest. Extra args go to pytest
# (e.g. `-m "not vllm"` for the fast unit tests only).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
set +e
"${SPECSTREAM_VENV:-$ROOT/.venv}/bin/python" -m pytest -q -rfEs --durations=25 --timeout 1500 "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "no tests were selected"; exit 0
fi
exit $rc
