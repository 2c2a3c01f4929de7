"""`sift featurize embed`: sentence embeddings into a feature store (resumed shard by shard)."""

from __future__ import annotations

from engine.config import EmbedConfig
from engine.stages import Stage
from engine.stages.features import FeaturesResult, featurize_arguments, show


NEAR_DUPLICATE_ROWS = 50_000  # rows the near-duplicate count looks at: 77 MB at 384 dims, ~20 s on 2 cores


class EmbedResult(FeaturesResult):
    near_duplicates: int  # rows with an earlier row at cosine >= 0.95 (in the sample, if any)
    sample: int | None = None  # rows of a seeded sample the count looked at; None: every kept row

    def line(self) -> str:
        among = "" if self.sample is None else f" in a sample of {self.sample:,}"
        return f"{super().line()}; {self.near_duplicates} near-duplicates at cosine >= 0.95{among}"


def run(cfg: EmbedConfig) -> EmbedResult:
    """Embed, then count near-duplicates as a quick look at the pool. The count is a summary, not
    a filter, so on a large pool it looks at a seeded sample: the driver never holds every vector
    (1.5 KB a row at 384 dims) and the search stays seconds."""
    import numpy as np

    from engine.features.embed import embed
    from engine.index import near_duplicates

    store, stats = embed(cfg)
    vectors = store.vectors()
    rows = None
    if len(vectors) > NEAR_DUPLICATE_ROWS:
        rows = np.sort(np.random.default_rng(0).choice(len(vectors), NEAR_DUPLICATE_ROWS, replace=False))
    looked_at = vectors.read_into(np.empty((len(vectors) if rows is None else len(rows), vectors.shape[1]),
                                           np.float32), rows)
    duplicates = int((near_duplicates(looked_at, threshold=0.95) >= 0).sum())
    return EmbedResult.of(store, stats, near_duplicates=duplicates, sample=None if rows is None else len(rows))


STAGE = Stage("embed", "sentence embeddings (default model: the built-in minilm)", EmbedConfig, EmbedResult, run,
              show, featurize_arguments, inputs=("data", "model"), command=("featurize", "embed"),
              ignore=("batch_size", "actors", "min_actors", "gpus_per_actor", "shard_rows", "replace_mismatch"),
              native_storage=True, replace_stale=True)
