#!/usr/bin/env bash
# GPU check of `sift serve --backend vllm` (the `vllm` package, CUDA): the parity test against the
# peft reference (tests/test_serve_vllm.py: float32, max |logprob diff| <= 1e-4, same answers) and
# the load benchmark (2000 requests, 32 clients, single adapter vs the M=3 ensemble vs peft),
# offline, in under 10 minutes on one GPU. Run from the repo root on a CUDA machine whose python3
# already has a CUDA torch:
#
#   SIFT_GPU_VLLM=1 bash jobs/gpu_check/prepare.sh   # on a machine with PyPI: wheels (+ vllm's) into .gpu-carry/
#   bash jobs/gpu_check/serve.sh                     # on the GPU machine (no network needed)
#
# vLLM comes from the machine's python3 when it has it, else from .gpu-carry/wheels-vllm (vllm and
# the torch it pins: ~3 GB, more than a 64 MiB carry allows; bring them another way there).
# Writes JSON and logs to ${OUT:-gpu-check-out}/.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
CARRY=.gpu-carry
START=$SECONDS

python3 -m venv --system-site-packages .venv-gpu          # keeps the machine's CUDA torch (and vllm, if any)
.venv-gpu/bin/pip install -q --no-index --find-links "$CARRY/wheels" -e ".[test]" 2>&1 | tail -3
if ! .venv-gpu/bin/python -c "import vllm" 2>/dev/null; then
  if [[ -d $CARRY/wheels-vllm ]]; then
    .venv-gpu/bin/pip install -q --no-index --find-links "$CARRY/wheels-vllm" --find-links "$CARRY/wheels" vllm \
      2>&1 | tail -3
  else
    echo "no vllm on this machine and no $CARRY/wheels-vllm (SIFT_GPU_VLLM=1 bash jobs/gpu_check/prepare.sh)" \
      | tee "$OUT/serve_tests.txt"
    exit 3
  fi
fi
export SIFT_CACHE=$PWD/$CARRY/cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 \
       RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
       SIFT_VLLM_PYTHON=$PWD/.venv-gpu/bin/python
.venv-gpu/bin/python - <<'PY' | tee "$OUT/serve_env.txt"
import torch, vllm
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
print("vllm", vllm.__version__)
PY
# Parity and bad input: the same tests as on CPU, one vLLM engine on the GPU (float32).
timeout 300 .venv-gpu/bin/python -m pytest -q -x -p no:cacheprovider tests/test_serve_vllm.py 2>&1 | tail -15 \
  | tee "$OUT/serve_tests.txt"
# Load: 2000 requests at 32 clients per backend and scenario.
timeout $((560 - (SECONDS - START))) .venv-gpu/bin/python jobs/bench/serve.py --backends vllm,peft \
  --requests 2000 --clients 32 --vllm-python "$SIFT_VLLM_PYTHON" --log-dir "$OUT" \
  > "$OUT/bench_serve.json" 2> "$OUT/bench_serve.err"
cat "$OUT/bench_serve.json"
echo "serve check: $((SECONDS - START)) s"
