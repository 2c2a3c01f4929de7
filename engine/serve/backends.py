"""The serving backends' one interface, and the `peft` reference backend.

A backend scores and generates on token ids, for a list of models at once: an adapter name from
the manifest, or None for the bare base model. Everything else (prompts, validation, label sets,
the mixture) lives in engine.serve.service, so both backends are held to the same numbers.

`peft` is engine.ensemble.model.EnsembleModel (the reference scorer of `sift evaluate`): the
models run one after the other over the same prompts, under a lock (one PeftModel, one active
adapter at a time). `vllm` (engine.serve.vllm_backend) batches all of them in one engine step.
"""

from __future__ import annotations

import asyncio
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from engine.config import ServeConfig
from engine.ensemble.manifest import LoadedManifest
from engine.errors import SiftError

MAX_CONTEXT = 4096


@dataclass(frozen=True)
class GenParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Generated:
    token_ids: list[int]
    finish_reason: str  # "stop" (end of sequence) or "length"


class Backend(ABC):
    name: str
    manifest: LoadedManifest
    tokenizer: object
    max_model_len: int

    @abstractmethod
    async def label_logprobs(self, prompts: list[list[int]], token_ids: list[int],
                             models: list[str | None]) -> dict[str | None, np.ndarray]:
        """Per model, (B, L) float64 next-token log-probabilities (over the full vocabulary) of
        `token_ids` after each prompt."""

    @abstractmethod
    async def generate(self, prompts: list[list[int]], models: list[str | None],
                       params: GenParams) -> dict[str | None, list[Generated]]:
        """Per model, one continuation of each prompt."""

    @abstractmethod
    async def swap(self, manifest: LoadedManifest) -> None:
        """Replace the adapters by those of `manifest` (same base, checked); raise a RequestError
        and keep the old ones when they do not load."""

    async def close(self) -> None:
        return None


async def create(cfg: ServeConfig, manifest: LoadedManifest) -> Backend:
    if cfg.backend == "vllm":
        try:
            from engine.serve.vllm_backend import VllmBackend
        except ImportError as exc:
            raise SiftError(vllm_missing(exc)) from None
        return await VllmBackend.create(cfg, manifest)
    return await asyncio.to_thread(PeftBackend, cfg, manifest)


def vllm_missing(exc: BaseException | None = None) -> str:
    why = f" ({exc})" if exc else ""
    return ("the vllm backend needs vLLM, which this Python lacks" + why + ": on CPU run "
            "`bash scripts/setup_vllm.sh` and start `.venv-vllm/bin/sift serve ...`; on GPU "
            "`pip install -e '.[gpu]'`; or use --backend peft")


def context_length(model_path, configured: int | None) -> int:
    import json
    from pathlib import Path

    config = json.loads((Path(model_path) / "config.json").read_text())
    native = config.get("max_position_embeddings") or MAX_CONTEXT
    if configured is not None:
        if configured > native:
            raise SiftError(f"max_model_len {configured} exceeds the model's context of {native} tokens")
        return configured
    return min(native, MAX_CONTEXT)


class PeftBackend(Backend):
    name = "peft"

    def __init__(self, cfg: ServeConfig, manifest: LoadedManifest):
        import torch

        from engine.ensemble.model import EnsembleModel
        from engine.models import builtin

        torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))
        self.manifest = manifest
        self.trust_remote_code = cfg.trust_remote_code
        self.ensemble = EnsembleModel.load(manifest, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer = self.ensemble.tokenizer
        self.max_model_len = context_length(builtin.resolve(manifest.base_model), cfg.max_model_len)
        self._lock = threading.Lock()

    async def label_logprobs(self, prompts, token_ids, models):
        return await asyncio.to_thread(self._label_logprobs, prompts, token_ids, models)

    async def swap(self, manifest):
        from engine.ensemble.model import EnsembleModel
        from engine.serve.errors import bad

        try:
            ensemble = await asyncio.to_thread(EnsembleModel.load, manifest, self.trust_remote_code)
        except SiftError as exc:
            raise bad(str(exc), "manifest") from None
        with self._lock:
            self.ensemble, self.manifest = ensemble, manifest

    async def generate(self, prompts, models, params):
        return await asyncio.to_thread(self._generate, prompts, models, params)

    def _label_logprobs(self, prompts, token_ids, models):
        with self._lock:
            out = self.ensemble.logprobs(prompts, token_ids, models)
        return {name: lp.double().numpy() for name, lp in out.items()}

    def _generate(self, prompts, models, params: GenParams):
        import torch

        from engine.ensemble import labels

        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, ids in enumerate(prompts):  # left padding: every prompt ends at the same column
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
        sample = params.temperature > 0
        kwargs = dict(do_sample=sample, temperature=params.temperature if sample else None,
                      top_p=params.top_p if sample else None, top_k=None)
        device = next(self.ensemble.model.parameters()).device
        out = {}
        with self._lock:
            for name in models:
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                with labels.active(self.ensemble.model, name), torch.no_grad():
                    tokens = self.ensemble.model.generate(
                        input_ids=input_ids.to(device), attention_mask=mask.to(device),
                        max_new_tokens=params.max_tokens, pad_token_id=pad, eos_token_id=eos, **kwargs)
                results = []
                for row in tokens[:, width:].tolist():
                    if eos in row:
                        results.append(Generated(row[:row.index(eos) + 1], "stop"))
                    else:
                        results.append(Generated(row, "length"))
                out[name] = results
        return out
