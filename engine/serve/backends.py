"""The serving backends' one interface, and the `peft` reference backend.

A backend scores and generates on token ids, for a list of models at once: an adapter name from
the manifest, or None for the bare base model. Everything else (prompts, validation, label sets,
the mixture) lives in engine.serve.service, so both backends are held to the same numbers.

`peft` is engine.ensemble.model.EnsembleModel (the reference scorer of `sift evaluate`): the
models run one after the other over the same prompts, on one worker thread (one PeftModel, one
active adapter at a time). `vllm` (engine.serve.vllm_backend) batches all of them in one engine step.
"""

from __future__ import annotations

import asyncio
import os
import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
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


class Cancelled(Exception):
    """The request whose work this was has gone (timed out or disconnected)."""


class PeftBackend(Backend):
    """Every model call and every swap runs on one worker thread, in arrival order: the PeftModel
    has one active adapter at a time, and the event loop (and /health) never waits on it. Work
    not started when its request is cancelled never runs; work under way stops at the next
    adapter or generated token."""

    name = "peft"

    def __init__(self, cfg: ServeConfig, manifest: LoadedManifest):
        import torch

        from engine.ensemble.model import EnsembleModel
        from engine.models import builtin

        torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="sift-peft")
        self._loads = 0
        self.manifest = manifest
        held, self.names = self._held(manifest)
        self.ensemble = EnsembleModel.load(held, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer = self.ensemble.tokenizer
        self.max_model_len = context_length(builtin.resolve(manifest.base_model), cfg.max_model_len)

    def _held(self, manifest: LoadedManifest) -> tuple[LoadedManifest, dict[str, str]]:
        """`manifest` with each adapter under a name new to the PeftModel (NAME__vK), and the map
        from API names: EnsembleModel.update knows adapters by name, and a retrained adapter
        keeps its name, so every swap loads fresh copies (the base model stays)."""
        self._loads += 1
        names = {a.name: f"{a.name}__v{self._loads}" for a in manifest.adapters}
        return manifest.renamed(names), names

    async def _run(self, fn, *args):
        """`fn(*args, cancel)` on the worker thread; cancelling the caller sets `cancel`."""
        cancel = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(self._worker, fn, *args, cancel)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, even when abandoned
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            future.cancel()  # a no-op once it runs: `cancel` stops it instead
            raise

    async def label_logprobs(self, prompts, token_ids, models):
        return await self._run(self._label_logprobs, prompts, token_ids, models)

    async def generate(self, prompts, models, params):
        return await self._run(self._generate, prompts, models, params)

    async def swap(self, manifest):
        await self._run(self._swap, manifest)

    def _swap(self, manifest: LoadedManifest, cancel: threading.Event) -> None:
        held, names = self._held(manifest)
        try:
            self.ensemble.update(held)
        except SiftError:
            for name in names.values():  # what it loaded before failing: the old adapters stay
                if name in self.ensemble.model.peft_config:
                    self.ensemble.model.delete_adapter(name)
            raise
        self.manifest, self.names = manifest, names

    def _label_logprobs(self, prompts, token_ids, models, cancel: threading.Event):
        out = {}
        for name in models:
            if cancel.is_set():
                raise Cancelled()
            held = None if name is None else self.names[name]
            out[name] = self.ensemble.logprobs(prompts, token_ids, [held])[held].double().numpy()
        return out

    def _generate(self, prompts, models, params: GenParams, cancel: threading.Event):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        from engine.ensemble import labels

        class StopWhenCancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, ids in enumerate(prompts):  # left padding: every prompt ends at the same column
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
        sample = params.temperature > 0
        kwargs = dict(do_sample=sample, temperature=params.temperature if sample else None,
                      top_p=params.top_p if sample else None, top_k=None,
                      stopping_criteria=StoppingCriteriaList([StopWhenCancelled()]))
        device = next(self.ensemble.model.parameters()).device
        out = {}
        for name in models:
            if cancel.is_set():
                raise Cancelled()
            if params.seed is not None:
                torch.manual_seed(params.seed)
            with labels.active(self.ensemble.model, None if name is None else self.names[name]), torch.no_grad():
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
        if cancel.is_set():
            raise Cancelled()
        return out
