"""faiss indexes chosen by size, k-means and near-duplicate removal; faiss-gpu when present.

Index choice (inner product, i.e. cosine on normalised embeddings, or L2):
- up to `FLAT_MAX` vectors: exact (Flat), nothing to train;
- up to `IVF_FLAT_MAX`: IVF with ~4 sqrt(N) lists, exact distances inside probed lists;
- beyond: IVF + product quantisation (m sub-vectors of 8 bits), memory ~m bytes per vector.
"""

from __future__ import annotations

import math
from typing import Literal

import faiss
import numpy as np

from engine.errors import SiftError

FLAT_MAX = 100_000
IVF_FLAT_MAX = 2_000_000
Metric = Literal["ip", "l2"]


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _resolve_gpu(gpu: bool | None) -> bool:
    """None: use GPUs when faiss-gpu sees any; True: require them."""
    count = gpu_count()
    if gpu and count == 0:
        raise SiftError("faiss-gpu requested but no GPU is visible to faiss; install it with pip install '.[gpu]' "
                        "on a CUDA machine, or drop the GPU option")
    return bool(count) if gpu is None else gpu


def _as_float32(vectors: np.ndarray, what: str) -> np.ndarray:
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0:
        raise SiftError(f"{what}: expected a non-empty (n, dim) array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise SiftError(f"{what}: contains NaN or infinite values")
    return array


class VectorIndex:
    def __init__(self, index: faiss.Index, metric: Metric, kind: str):
        self.index, self.metric, self.kind = index, metric, kind

    @classmethod
    def build(cls, vectors: np.ndarray, metric: Metric = "ip", kind: str = "auto", nprobe: int = 16,
              pq_m: int | None = None, seed: int = 0, gpu: bool | None = None) -> "VectorIndex":
        data = _as_float32(vectors, "index vectors")
        n, dim = data.shape
        if kind == "auto":
            kind = "flat" if n <= FLAT_MAX else ("ivf" if n <= IVF_FLAT_MAX else "ivfpq")
        faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
        if kind == "flat":
            index = faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
        else:
            nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
            m = pq_m or next((m for m in (64, 48, 32, 24, 16, 12, 8, 4, 2) if dim % m == 0 and dim // m >= 4), 1)
            spec = f"IVF{nlist},Flat" if kind == "ivf" else f"IVF{nlist},PQ{m}"
            index = faiss.index_factory(dim, spec, faiss_metric)
            sample = np.random.default_rng(seed).choice(n, size=min(n, 64 * nlist), replace=False)
            index.cp.seed = seed
            index.train(data[np.sort(sample)])
            index.nprobe = min(nprobe, nlist)
        if _resolve_gpu(gpu):
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(data)
        return cls(index, metric, kind)

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (q, k), best first; ids are row numbers of the indexed vectors."""
        data = _as_float32(queries, "queries")
        if data.shape[1] != self.index.d:
            raise SiftError(f"queries have dimension {data.shape[1]}, the index holds {self.index.d}-d vectors")
        return self.index.search(data, min(k, len(self)))


def kmeans(vectors: np.ndarray, k: int, niter: int = 20, seed: int = 0, spherical: bool = False,
           gpu: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(centroids (k, dim), assignment (n,)) for coresets and domain clusters; seeded."""
    data = _as_float32(vectors, "k-means vectors")
    if not 1 <= k <= len(data):
        raise SiftError(f"k-means needs 1 <= k <= {len(data)} points, got k={k}")
    km = faiss.Kmeans(data.shape[1], k, niter=niter, seed=seed, spherical=spherical, gpu=_resolve_gpu(gpu),
                      max_points_per_centroid=max(256, math.ceil(len(data) / k)), verbose=False)
    km.train(data)
    _, assignment = km.index.search(data, 1)
    return km.centroids, assignment[:, 0]


def near_duplicates(vectors: np.ndarray, threshold: float = 0.95, k: int = 32,
                    gpu: bool | None = None) -> np.ndarray:
    """For L2-normalised vectors: duplicate_of[i] = the earlier row i duplicates, or -1 if kept.

    Greedy in row order: a kept row removes its later neighbours with cosine >= threshold; a
    removed row removes nothing, so no chain of small steps removes a row unlike any kept one.
    Neighbours come from a kNN search (k per row), so a group larger than k may keep extras.
    """
    data = _as_float32(vectors, "vectors")
    if not np.allclose(np.linalg.norm(data[: min(len(data), 1000)], axis=1), 1, atol=1e-3):
        raise SiftError("near-duplicate removal needs L2-normalised vectors (cosine = inner product)")
    index = VectorIndex.build(data, metric="ip", gpu=gpu)
    duplicate_of = np.full(len(data), -1, dtype=np.int64)
    for start in range(0, len(data), 65536):
        scores, ids = index.search(data[start:start + 65536], k + 1)
        for row, (s, nbrs) in enumerate(zip(scores, ids), start):
            if duplicate_of[row] != -1:
                continue
            later = nbrs[(s >= threshold) & (nbrs > row)]
            later = later[duplicate_of[later] == -1]
            duplicate_of[later] = row
    return duplicate_of
