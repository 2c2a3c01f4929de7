#!/usr/bin/env bash
# GPU check of featurization: the CUDA paths, their tests and the benchmark, offline, < 10 min on
# one GPU. Run from the repo root on a CUDA machine whose python3 already has a CUDA torch:
#
#   bash jobs/gpu_check/prepare.sh        # on a machine with PyPI: wheels + caches into .gpu-carry/
#   bash jobs/gpu_check/featurize.sh      # on the GPU machine (no network needed)
#
# Writes JSON and logs to ${OUT:-gpu-check-out}/.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
CARRY=.gpu-carry

python3 -m venv --system-site-packages .venv-gpu          # keeps the machine's CUDA torch
.venv-gpu/bin/pip install -q --no-index --find-links "$CARRY/wheels" -e ".[test]" 2>&1 | tail -3
export SIFT_CACHE=$PWD/$CARRY/cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 \
       RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
.venv-gpu/bin/python - <<'PY' | tee "$OUT/env.txt"
import torch, faiss
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
print("faiss gpus", faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)
PY
# The same tests as on CPU, now taking the CUDA paths (actors get num_gpus=1, models on cuda).
timeout 420 .venv-gpu/bin/python -m pytest -q -x tests/test_per_example.py tests/test_projection.py \
  tests/test_feature_store.py tests/test_index.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
timeout 150 .venv-gpu/bin/python jobs/bench/featurize.py --models tiny-llama --batch 32 \
  --embed-rows 20000 --actors 1 > "$OUT/bench_featurize.json" 2> "$OUT/bench_featurize.err"
cat "$OUT/bench_featurize.json"
