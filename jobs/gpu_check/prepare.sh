#!/usr/bin/env bash
# Prepare what jobs/gpu_check/*.sh needs on an offline GPU machine (Python 3.12 there): wheels of
# sift's dependencies except torch, and sift's caches (corpora parquet, tiny-llama) in .gpu-carry/.
# The 64 MiB carry limit of the lent machines leaves out SmolLM2 and MiniLM weights; the check
# uses tiny-llama and whatever models the cache holds.
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=.gpu-carry
mkdir -p "$CARRY/wheels" "$CARRY/cache"
.venv/bin/pip download -q -d "$CARRY/wheels" --python-version 3.12 --only-binary=:all: \
  "ray[data,train,tune,serve,default]" "transformers<5.20" peft polars pot faiss-gpu-cu12 pydantic rich \
  pytest pytest-timeout psutil gguf datasets 2>&1 | tail -3
SIFT_CACHE=$PWD/$CARRY/cache .venv/bin/sift models tiny-llama
# For jobs/gpu_check/serve.sh on a machine without vllm: SIFT_GPU_VLLM=1 adds vllm and the CUDA
# torch it pins (~3 GB: beyond a 64 MiB carry; for machines that take a larger copy).
if [[ -n ${SIFT_GPU_VLLM:-} ]]; then
  .venv/bin/pip download -q -d "$CARRY/wheels-vllm" --python-version 3.12 --only-binary=:all: \
    "vllm>=0.11" "transformers<5.20" 2>&1 | tail -3
fi
du -sh "$CARRY"
