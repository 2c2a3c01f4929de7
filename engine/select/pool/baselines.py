"""Baselines with GOT-D's interface: scores for every candidate, higher = chosen first.

- random: a seeded permutation;
- knn: mean cosine similarity of a candidate to its k nearest target embeddings (faiss);
- dsir: hashed unigram+bigram importance weights log p_target(x) - log p_pool(x) (Xie et al.,
  2023), resampled without replacement by the Gumbel top-k trick, seeded. Our own faithful
  implementation (the published `data-selection` package pins an old numpy), streamed: two
  passes over the pool's texts, a batch at a time;
- grad-cosine: LESS-style cosine between a candidate's projected gradient and the mean of the
  target's normalised projected gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

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


def dsir_scores(pool: Callable[[], Iterable[list[str]]], target: Iterable[list[str]], n: int, buckets: int,
                seed: int) -> np.ndarray:
    """DSIR's score for each of the `n` pool texts. `pool()` yields the pool's texts batch by batch
    (called twice: n-gram totals first, then each text's weight), `target` the target's texts: the
    hashed counts are additive, so the driver holds one batch's sparse counts and the `buckets`-long
    totals, never all texts. Each text's weight and its Gumbel draw are the same as over the whole
    pool at once (the draws come from one seeded stream in pool order)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    vectorizer = HashingVectorizer(n_features=buckets, ngram_range=(1, 2), alternate_sign=False, norm=None,
                                   lowercase=True)

    def totals(batches: Iterable[list[str]]) -> np.ndarray:
        out = np.zeros(buckets)
        for texts in batches:
            out += np.asarray(vectorizer.transform(texts).sum(axis=0)).ravel()
        return out

    weights = _log_distribution(totals(target)) - _log_distribution(totals(pool()))
    rng = np.random.default_rng(seed)
    scores = np.empty(n)
    start = 0
    for texts in pool():
        gumbel = -np.log(-np.log(rng.uniform(1e-12, 1.0, len(texts))))
        scores[start:start + len(texts)] = np.asarray(vectorizer.transform(texts) @ weights).ravel() + gumbel
        start += len(texts)
    if start != n:
        raise AssertionError(f"DSIR scored {start} texts of a pool of {n}")
    return scores


def grad_cosine_scores(pool: ShardedVectors, target: np.ndarray) -> np.ndarray:
    direction = _unit(target.astype(np.float64)).mean(axis=0)
    return np.concatenate([_unit(b.astype(np.float64)) @ direction for b in pool.iter_batches(BATCH)])


def _log_distribution(counts: np.ndarray) -> np.ndarray:
    smoothed = counts + 1.0  # add-one: unseen n-grams keep a finite weight
    return np.log(smoothed / smoothed.sum())


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32 if x.dtype != np.float64 else np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
