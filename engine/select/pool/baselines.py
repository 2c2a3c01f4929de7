"""Baselines with GOT-D's interface: scores for every candidate, higher = chosen first.

- random: a seeded permutation;
- knn: mean cosine similarity of a candidate to its k nearest target embeddings (faiss);
- dsir: hashed unigram+bigram importance weights log p_target(x) - log p_pool(x) (Xie et al.,
  2023), resampled without replacement by the Gumbel top-k trick, seeded. Our own faithful
  implementation: the published `data-selection` package pins an old numpy;
- grad-cosine: LESS-style cosine between a candidate's projected gradient and the mean of the
  target's normalised projected gradients.
"""

from __future__ import annotations

import numpy as np

from engine.features.store import ShardedVectors
from engine.index import VectorIndex

BATCH = 65_536


def random_scores(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n)


def knn_scores(pool: ShardedVectors, target: np.ndarray, k: int) -> np.ndarray:
    index = VectorIndex.build(_unit(target), metric="ip")
    out = []
    for batch in pool.iter_batches(BATCH):
        sims, _ = index.search(_unit(batch), k)
        out.append(sims.mean(axis=1))
    return np.concatenate(out).astype(np.float64)


def dsir_scores(pool_texts: list[str], target_texts: list[str], buckets: int, seed: int) -> np.ndarray:
    from sklearn.feature_extraction.text import HashingVectorizer

    vectorizer = HashingVectorizer(n_features=buckets, ngram_range=(1, 2), alternate_sign=False, norm=None,
                                   lowercase=True)
    pool_counts = vectorizer.transform(pool_texts)
    target_counts = vectorizer.transform(target_texts)
    log_p_target = _log_distribution(np.asarray(target_counts.sum(axis=0)).ravel())
    log_p_pool = _log_distribution(np.asarray(pool_counts.sum(axis=0)).ravel())
    log_weights = pool_counts @ (log_p_target - log_p_pool)
    gumbel = -np.log(-np.log(np.random.default_rng(seed).uniform(1e-12, 1.0, len(pool_texts))))
    return np.asarray(log_weights).ravel() + gumbel


def grad_cosine_scores(pool: ShardedVectors, target: np.ndarray) -> np.ndarray:
    direction = _unit(target.astype(np.float64)).mean(axis=0)
    return np.concatenate([_unit(b.astype(np.float64)) @ direction for b in pool.iter_batches(BATCH)])


def _log_distribution(counts: np.ndarray) -> np.ndarray:
    smoothed = counts + 1.0  # add-one: unseen n-grams keep a finite weight
    return np.log(smoothed / smoothed.sum())


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32 if x.dtype != np.float64 else np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
