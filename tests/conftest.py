"""Shared fixtures: one embedded Ray for the whole session (it takes seconds to start), and
helpers that write small real input files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine import runtime
from engine.config import RuntimeConfig


# Ray workers unpickle test-defined UDFs by module name (tests.test_x): let them import `tests`.
ROOT = Path(__file__).resolve().parent.parent
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def ray_session():
    info = runtime.start(RuntimeConfig(num_cpus=2))
    yield info
    runtime.stop()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tweets_ingest(tmp_path_factory, ray_session) -> Path:
    """An ingest folder of 600 real tweets (labels: negative / neutral / positive)."""
    from engine.config import IngestConfig
    from engine.data import corpora
    from engine.data.ingest import ingest

    root = tmp_path_factory.mktemp("tweets")
    corpora.load("tweets").sample(600, seed=0).write_parquet(root / "tweets.parquet")
    ingest(IngestConfig(inputs=[str(root / "tweets.parquet")], out=root / "ingest"))
    return root / "ingest"


ENSEMBLE_TASKS = {"wordnet-animal-plant": ["animal", "plant"], "fortunes-law-politics": ["law", "politics"]}


def write_random_adapter(folder: Path, seed: int, r: int = 4) -> Path:
    """A tiny-llama LoRA with seeded non-zero weights (a fresh LoRA's B is zero: it would equal
    the base model and hide any mix-up between adapters)."""
    import torch

    from engine.config import LoraSpec
    from engine.models import builtin, load, lora

    model = lora.add_lora(load.load_causal_lm(builtin.resolve("tiny-llama")), LoraSpec(r=r, seed=seed))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory) -> Path:
    """An ensemble manifest on tiny-llama: three random adapters, two tasks with their weights."""
    from engine.ensemble import manifest

    root = tmp_path_factory.mktemp("ensemble")
    adapters = []
    for k in range(3):
        write_random_adapter(root / "adapters" / f"group-{k}", seed=10 + k)
        adapters.append(manifest.AdapterEntry(name=f"group-{k}", path=f"adapters/group-{k}",
                                              tasks=list(ENSEMBLE_TASKS), rank=4))
    tasks = {
        "wordnet-animal-plant": manifest.TaskEntry(labels=ENSEMBLE_TASKS["wordnet-animal-plant"],
                                                   weights={"group-0": 0.5, "group-1": 0.3, "group-2": 0.2}),
        "fortunes-law-politics": manifest.TaskEntry(labels=ENSEMBLE_TASKS["fortunes-law-politics"],
                                                    weights={"group-1": 0.6, "group-2": 0.4}),
    }
    return manifest.write(manifest.Manifest(base_model="tiny-llama", max_lora_rank=8, adapters=adapters,
                                            tasks=tasks), root)


@pytest.fixture(scope="session")
def reference(tiny_manifest):
    """The tiny manifest in the transformers + PEFT reference scorer, for comparing servers to."""
    from engine.ensemble import manifest
    from engine.ensemble.model import EnsembleModel

    return EnsembleModel.load(manifest.load(tiny_manifest))
