"""What the HTTP API does, independent of the backend and of the web framework.

Models a request may name: `ensemble` (the manifest's adapters mixed by a task's weights), any
adapter of the manifest by name, and `base` (the base model without adapter). Nothing else is
loadable: adapters come only from the manifest the server serves (the start-up one, or one a
swap chose from inside manifest_root: engine/serve/swap.py).

Classification scores each label by the next-token log-probability of its answer's first token
after the prompt, over the full vocabulary (`engine.ensemble.labels`: the same prompts, label
tokens and mixture as `sift evaluate`); class probabilities renormalise over the requested labels
and the ensemble's are the weighted mixture plus the task's boosting steps (labels.combine, as
`sift evaluate` scores them). Free-form completions run every weighted adapter on
the prompt; the answer is the text with the largest total weight among the adapters' outputs.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from engine.config import ServeConfig
from engine.ensemble import labels, manifest as manifest_mod
from engine.ensemble.manifest import LoadedManifest
from engine.errors import SiftError
from engine.serve import backends
from engine.serve.backends import Backend, GenParams
from engine.serve.errors import bad, not_found, too_large

ENSEMBLE = "ensemble"
BASE = "base"
MAX_SEED = 2**63 - 1  # torch.manual_seed and vLLM take 64-bit seeds
GREEDY_BELOW = 1e-5  # a temperature under this is greedy decoding (as vLLM does): logits / 1e-300 overflow


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifyRequest(Request):
    task: str
    text: str | list[str]
    labels: list[str] | None = Field(None, description="score only these of the task's labels")
    compare: list[str] = Field(default_factory=list, description="more models to score beside the "
                                                                  "task's adapters: adapter names or 'base'")


class CompletionRequest(Request):
    """OpenAI's /v1/completions, without streaming, n > 1 or logprobs; plus `task`, whose weights
    choose the ensemble's answer (default: the adapters' mean weight over the tasks)."""

    model: str
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: Literal[1] = 1
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: Literal[False] = False
    user: str | None = None
    task: str | None = None


class SwapRequest(Request):
    manifest: str = Field(description="another ensemble.json (or its folder) on the same base model, inside the "
                                      "server's manifest_root (absolute, or relative to it)")


def load_manifest(cfg: ServeConfig) -> LoadedManifest:
    """Read and check the manifest, against the configured LoRA rank too (one-line errors)."""
    if cfg.manifest is None:
        raise SiftError("serve needs a manifest: sift serve path/to/ensemble.json")
    loaded = manifest_mod.load(cfg.manifest)
    check_rank(loaded, cfg.max_lora_rank)
    reserved = sorted({a.name for a in loaded.adapters} & {ENSEMBLE, BASE})
    if reserved:
        raise SiftError(f"adapter name(s) {reserved} are reserved by the API (models 'ensemble' and 'base')")
    return loaded


def check_rank(loaded: LoadedManifest, configured: int | None) -> None:
    if configured is None:
        return
    for entry in loaded.adapters:
        if entry.rank > configured:
            raise SiftError(f"adapter {entry.name!r} has rank {entry.rank}, above the server's max_lora_rank "
                            f"{configured}")


class Service:
    def __init__(self, cfg: ServeConfig, manifest: LoadedManifest, backend: Backend):
        self.cfg = cfg
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.created = int(time.time())
        self.max_lora_rank = cfg.max_lora_rank or manifest.max_lora_rank  # the LoRA slots' size
        self._use(manifest)

    def _use(self, manifest: LoadedManifest) -> None:
        self.manifest = manifest
        self.adapters = [a.name for a in manifest.adapters]
        # Checked once per manifest: every task's labels must be told apart by their first token.
        self.label_ids = {task: dict(zip(entry.labels, labels.label_token_ids(self.tokenizer, manifest.answer,
                                                                                entry.labels)))
                          for task, entry in manifest.tasks.items()}

    def check(self, new: LoadedManifest) -> LoadedManifest:
        """`new` if this server can swap to it: same base and prompt format, adapters that fit
        the slots it started with, labels told apart by their first token; else a SiftError."""
        check_rank(new, self.max_lora_rank)
        reserved = sorted({a.name for a in new.adapters} & {ENSEMBLE, BASE})
        if reserved:
            raise SiftError(f"adapter name(s) {reserved} are reserved by the API")
        if (new.base_model, new.prompt, new.answer, new.max_length, new.quantize) != (
                self.manifest.base_model, self.manifest.prompt, self.manifest.answer, self.manifest.max_length,
                self.manifest.quantize):
            raise SiftError("the new manifest differs in base_model, prompt, answer, max_length or quantize; "
                            "start a new server for it")
        for entry in new.tasks.values():
            labels.label_token_ids(self.tokenizer, new.answer, entry.labels)
        return new

    def admit(self, path: str) -> LoadedManifest:
        """The manifest at `path`, read and checked (blocking file reads: call it in a thread)."""
        return self.check(manifest_mod.load(path))

    async def use(self, manifest: LoadedManifest) -> None:
        """Serve `manifest` (checked) from now on: the backend switches adapters on the loaded
        base; on a SiftError the old ones stay."""
        await self.backend.swap(manifest)
        self._use(manifest)

    @classmethod
    async def create(cls, cfg: ServeConfig) -> "Service":
        manifest = load_manifest(cfg)
        return cls(cfg, manifest, await backends.create(cfg, manifest))

    # -- models ---------------------------------------------------------------------------------

    def models(self) -> dict:
        def card(name: str, kind: str) -> dict:
            return {"id": name, "object": "model", "created": self.created, "owned_by": "sift", "kind": kind}

        return {"object": "list", "data": [card(ENSEMBLE, "ensemble"), card(BASE, "base"),
                                           *(card(a, "adapter") for a in self.adapters)]}

    def health(self) -> dict:
        return {"status": "ok", "backend": self.backend.name, "base_model": self.manifest.base_model,
                "adapters": self.adapters, "tasks": list(self.manifest.tasks)}

    def _model(self, name: str, param: str = "model") -> str | None:
        """A model name to a backend model: an adapter name, or None for the base."""
        if name == BASE:
            return None
        if name in self.adapters:
            return name
        raise not_found(f"unknown model {name!r}; this server has {', '.join([ENSEMBLE, BASE, *self.adapters])}",
                        param)

    def _task(self, name: str):
        if name not in self.manifest.tasks:
            raise not_found(f"unknown task {name!r}; this server has {', '.join(self.manifest.tasks)}", "task")
        return self.manifest.tasks[name]

    def _texts(self, value: str | list[str], param: str) -> list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise bad(f"{param} is an empty list", param)
        if len(texts) > self.cfg.max_batch:
            raise too_large(f"{len(texts)} items in {param}, more than max_batch {self.cfg.max_batch}", param)
        for i, text in enumerate(texts):
            where = param if isinstance(value, str) else f"{param}[{i}]"
            if not text.strip():
                raise bad(f"{where} is empty", param)
            if len(text) > self.cfg.max_prompt_chars:
                raise too_large(f"{where} has {len(text)} characters, more than max_prompt_chars "
                                f"{self.cfg.max_prompt_chars}", param)
        return texts

    # -- classification -------------------------------------------------------------------------

    async def classify(self, req: ClassifyRequest) -> dict:
        entry = self._task(req.task)
        texts = self._texts(req.text, "text")
        chosen = entry.labels if req.labels is None else req.labels
        outside = [lab for lab in chosen if lab not in entry.labels]
        if outside:
            raise bad(f"labels {outside} are not labels of task {req.task!r}: {', '.join(entry.labels)}", "labels")
        if len(set(chosen)) != len(chosen) or len(chosen) < 2:
            raise bad(f"labels must be at least two distinct labels of task {req.task!r}", "labels")
        weights = {name: w for name, w in entry.weights.items() if w > 0}
        extra = [self._model(name, "compare") for name in req.compare]
        models = list(dict.fromkeys([*self.manifest.models(req.task), *extra]))  # boosting: + its adapters, anchor
        prompts = [labels.prompt_ids(self.tokenizer, self.manifest, t, req.task) for t in texts]
        token_ids = [self.label_ids[req.task][lab] for lab in chosen]
        import torch

        logprobs = await self.backend.label_logprobs(prompts, token_ids, models)
        as_tensors = {name: torch.from_numpy(lp) for name, lp in logprobs.items()}
        probs = {name: labels.class_probs(lp).numpy() for name, lp in as_tensors.items()}
        mixed = labels.combine(as_tensors, self.manifest, req.task).numpy()
        results = []
        for i in range(len(texts)):
            per_model = {}
            for name in models:
                lp, p = logprobs[name][i], probs[name][i]
                per_model[BASE if name is None else name] = {
                    "weight": weights.get(name, 0.0),
                    "logprobs": dict(zip(chosen, lp.tolist())),
                    "probs": dict(zip(chosen, p.tolist())),
                    "answer": chosen[int(np.argmax(p))],
                }
            results.append({"probs": dict(zip(chosen, mixed[i].tolist())),
                            "answer": chosen[int(np.argmax(mixed[i]))],
                            "adapters": per_model})
        return {"object": "classification", "model": ENSEMBLE, "backend": self.backend.name, "task": req.task,
                "labels": chosen, "results": results}

    # -- completions ----------------------------------------------------------------------------

    def _weights(self, task: str | None) -> dict[str, float]:
        if task is not None:
            return {n: w for n, w in self._task(task).weights.items() if w > 0}
        total: dict[str, float] = {}
        for entry in self.manifest.tasks.values():
            for name, w in entry.weights.items():
                total[name] = total.get(name, 0.0) + w / len(self.manifest.tasks)
        return {n: w for n, w in total.items() if w > 0}

    async def complete(self, req: CompletionRequest) -> dict:
        if req.model == ENSEMBLE:
            weights = self._weights(req.task)
            models: list[str | None] = list(weights)
        else:
            if req.task is not None:
                raise bad("task only applies to model 'ensemble'", "task")
            models = [self._model(req.model)]
            weights = {}
        texts = self._texts(req.prompt, "prompt")
        if req.max_tokens > self.cfg.max_tokens:
            raise bad(f"max_tokens {req.max_tokens} is more than this server's limit {self.cfg.max_tokens}",
                      "max_tokens")
        prompts = [self.tokenizer(t)["input_ids"] for t in texts]
        for i, ids in enumerate(prompts):
            if len(ids) + req.max_tokens > self.backend.max_model_len:
                raise bad(f"prompt {i} has {len(ids)} tokens: with max_tokens {req.max_tokens} that is more "
                          f"than the context length {self.backend.max_model_len}", "prompt")
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if any(not s for s in stops):
            raise bad("stop strings must not be empty", "stop")
        temperature = 0.0 if req.temperature < GREEDY_BELOW else req.temperature
        params = GenParams(req.max_tokens, temperature, req.top_p, req.seed)
        generated = await self.backend.generate(prompts, models, params)
        choices, completion_tokens = [], 0
        for i in range(len(texts)):
            outs = {}
            for name in models:
                g = generated[name][i]
                text, reason = self._finish(g.token_ids, g.finish_reason, stops)
                outs[BASE if name is None else name] = {"text": text, "finish_reason": reason,
                                                        "tokens": len(g.token_ids)}
                completion_tokens += len(g.token_ids)
            if req.model == ENSEMBLE:
                votes: dict[str, float] = {}
                for name, out in outs.items():
                    votes[out["text"]] = votes.get(out["text"], 0.0) + weights[name]
                best = max(votes, key=lambda t: (votes[t], -list(votes).index(t)))
                chosen = next(o for o in outs.values() if o["text"] == best)
                choice = {"index": i, "text": best, "finish_reason": chosen["finish_reason"], "logprobs": None,
                          "ensemble": {"weight": votes[best],
                                       "adapters": {n: {**o, "weight": weights[n]} for n, o in outs.items()}}}
            else:
                out = next(iter(outs.values()))
                choice = {"index": i, "text": out["text"], "finish_reason": out["finish_reason"], "logprobs": None}
            choices.append(choice)
        prompt_tokens = sum(len(p) for p in prompts) * len(models)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def _finish(self, token_ids: list[int], reason: str, stops: list[str]) -> tuple[str, str]:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        cuts = [text.index(s) for s in stops if s in text]
        if cuts:
            return text[:min(cuts)], "stop"
        return text, reason
