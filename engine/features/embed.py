"""`sift featurize embed`: sentence embeddings (attention-masked mean pooling) into a store.

Each micro-batch holds texts of similar token length (sorted within a shard), so almost no
compute goes to padding. Pooling averages real tokens only; the GOT-D reference code averaged
padding too, which makes an embedding depend on its batch-mates.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import torch

from engine import executor, storage
from engine.config import EmbedConfig
from engine.data.ingest import examples_path
from engine.features import runner
from engine.features.store import FeatureStore, StoreSpec
from engine.models import builtin, load


class EmbedFeaturizer:
    def __init__(self, cfg: EmbedConfig, threads: int):
        path = builtin.resolve(cfg.model)
        self.cfg = cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load.load_tokenizer(path, cfg.trust_remote_code)
        self.model = load.load_encoder(path, cfg.trust_remote_code).to(self.device)
        self.dim = self.model.config.hidden_size

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        encoded = self.tokenizer(texts, truncation=True, max_length=self.cfg.max_length)["input_ids"]
        order = np.argsort([len(ids) for ids in encoded], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.cfg.batch_size):
            chunk = order[start:start + self.cfg.batch_size]
            batch = self.tokenizer.pad({"input_ids": [encoded[i] for i in chunk]}, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            if self.cfg.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out[chunk] = pooled.cpu().numpy()
        return out

    def __call__(self, frame: pl.DataFrame) -> runner.Featurized:
        return runner.split_finite(frame, self.embed(frame["text"].to_list()))


def spec_for(cfg: EmbedConfig) -> tuple[StoreSpec, object]:
    examples = examples_path(cfg.data)
    model = builtin.resolve(cfg.model)
    dim = json.loads((model / "config.json").read_text())["hidden_size"]
    rows = storage.parquet_rows(examples)
    spec = StoreSpec(
        kind="embeddings",
        fingerprint={
            "model": executor.folder_digest(model),
            "config": executor.settings_digest(cfg, exclude={"model", "batch_size", "shard_rows"}),
            "data": executor.data_digest(examples),
        },
        dim=dim, dtype=cfg.dtype, seed=None, rows=rows, shard_rows=cfg.shard_rows,
    )
    return spec, examples


def embed(cfg: EmbedConfig) -> tuple[FeatureStore, runner.RunStats]:
    """Embed cfg.data into the store at cfg.out (resumed)."""
    spec, examples = spec_for(cfg)
    return runner.run(cfg, spec, EmbedFeaturizer, examples, progress="embed")
