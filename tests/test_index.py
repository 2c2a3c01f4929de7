"""faiss indexes, k-means and near-duplicate removal on real vectors."""

import numpy as np
import pytest

from engine.errors import SiftError
from engine.index import VectorIndex, kmeans, near_duplicates


def _clusters(n=6000, dim=32, centers=12, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centers, dim)) * 4
    labels = rng.integers(0, centers, n)
    x = means[labels] + rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def test_flat_is_exact_and_ivf_recalls_it():
    x, _ = _clusters()
    q = x[:200]
    flat = VectorIndex.build(x)
    assert flat.kind == "flat"
    scores, ids = flat.search(q, 10)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    assert (ids[:, 0] == np.arange(200)).all()
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)]) > 0.99
    ivf = VectorIndex.build(x, kind="ivf", nprobe=8)
    _, ivf_ids = ivf.search(q, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ivf_ids, exact)]) > 0.9
    pq = VectorIndex.build(x, kind="ivfpq", nprobe=8, pq_m=16)
    _, pq_ids = pq.search(q, 10)
    # compressed codes: the true nearest neighbour (other than the query) should be in the top 10
    assert np.mean([b[1] in a for a, b in zip(pq_ids, exact)]) > 0.8


def test_kmeans_is_seeded_and_finds_the_clusters():
    x, labels = _clusters()
    c1, a1 = kmeans(x, 12, seed=3)
    c2, a2 = kmeans(x, 12, seed=3)
    assert np.array_equal(a1, a2) and np.allclose(c1, c2)
    purity = sum(np.bincount(labels[a1 == c]).max() for c in np.unique(a1)) / len(x)
    assert purity > 0.9


def test_near_duplicates_keep_the_first_and_only_remove_close_rows():
    x, _ = _clusters(n=2000)
    rng = np.random.default_rng(1)
    copies = x[:50] + rng.normal(scale=0.005, size=(50, x.shape[1])).astype(np.float32)
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    data = np.vstack([x, copies])
    duplicate_of = near_duplicates(data, threshold=0.99)
    assert (duplicate_of[2000:] == np.arange(50)).all()
    assert (duplicate_of[:50] == -1).all()
    removed = np.flatnonzero(duplicate_of >= 0)
    sims = np.einsum("ij,ij->i", data[removed], data[duplicate_of[removed]])
    assert (sims >= 0.99).all()


def test_bad_vectors_and_missing_gpu_are_clear_errors():
    x, _ = _clusters(n=100)
    with pytest.raises(SiftError, match="contains NaN"):
        VectorIndex.build(np.vstack([x, np.full((1, x.shape[1]), np.nan)]))
    with pytest.raises(SiftError, match="queries have dimension 8, the index holds 32-d vectors"):
        VectorIndex.build(x).search(np.zeros((1, 8)), 3)
    with pytest.raises(SiftError, match="k-means needs 1 <= k <= 100"):
        kmeans(x, 0)
    with pytest.raises(SiftError, match="needs L2-normalised vectors"):
        near_duplicates(x * 3)
    with pytest.raises(SiftError, match="faiss-gpu requested but no GPU"):
        VectorIndex.build(x, gpu=True)
