"""`sift featurize embed`: sentence embeddings into a feature store (resumed shard by shard)."""

from __future__ import annotations

from engine.config import EmbedConfig
from engine.stages import Stage
from engine.stages.features import FeaturesResult, featurize_arguments, show


class EmbedResult(FeaturesResult):
    near_duplicates: int  # rows with another row at cosine >= 0.95

    def line(self) -> str:
        return f"{super().line()}; {self.near_duplicates} near-duplicates at cosine >= 0.95"


def run(cfg: EmbedConfig) -> EmbedResult:
    import numpy as np

    from engine.features.embed import embed
    from engine.index import near_duplicates

    store, stats = embed(cfg)
    duplicates = int((near_duplicates(np.asarray(store.vectors()), threshold=0.95) >= 0).sum())
    return EmbedResult.of(store, stats, near_duplicates=duplicates)


STAGE = Stage("embed", "sentence embeddings (default model: the built-in minilm)", EmbedConfig, EmbedResult, run,
              show, featurize_arguments, inputs=("data", "model"), command=("featurize", "embed"),
              ignore=("batch_size", "actors", "min_actors", "gpus_per_actor", "shard_rows"), native_storage=True,
              replace_stale=True)
