"""GOT-D over a pool in a feature store: solve on a support, extend by a Ray Data pass."""

from __future__ import annotations

import time

import numpy as np

from engine.config import SelectPoolConfig
from engine.features.store import FeatureStore
from engine.index import kmeans
from engine.select import ot


def gotd_scores(store: FeatureStore, target: np.ndarray, cfg: SelectPoolConfig) -> tuple[np.ndarray, dict]:
    """Scores (higher = chosen first) and the solve's report for every vector in `store`."""
    ot.default_eps_check(cfg.eps)
    vectors = store.vectors()
    n = len(vectors)
    weights = None
    if n <= cfg.full_max:
        support_kind, support = "full", np.asarray(vectors)
    elif cfg.support == "sample":
        support_kind, support = "sample", vectors[ot.support_sample(n, cfg.support_size, cfg.seed)]
    else:
        sample = vectors[ot.support_sample(n, 20 * cfg.support_size, cfg.seed)]
        support, assignment = kmeans(sample, cfg.support_size, niter=10, seed=cfg.seed)
        weights = np.bincount(assignment, minlength=cfg.support_size).astype(np.float64)
        support_kind, support, weights = "kmeans", support[weights > 0], weights[weights > 0]
    solution = ot.sinkhorn_potentials(support, target, cfg.eps, cfg.threshold, cfg.max_iter, a=weights,
                                      device=_device())
    started = time.perf_counter()
    g = c_transform_store(store, solution)
    extend_s = time.perf_counter() - started
    gradient = ot.calibrated_gradient(g)
    scores = -gradient if cfg.variant == "clean" else gradient
    report = {
        "support": support_kind,
        "support_size": int(solution.support),
        "target_size": int(len(target)),
        "eps": cfg.eps,
        "threshold": cfg.threshold,
        "max_iter": cfg.max_iter,
        "iterations": solution.iterations,
        "marginal_error": solution.marginal_error,
        "converged": solution.converged,
        "solve_s": round(solution.seconds, 3),
        "extend_s": round(extend_s, 3),
    }
    return scores, report


def c_transform_store(store: FeatureStore, solution: ot.OTSolution) -> np.ndarray:
    """Potentials of every stored vector: one Ray Data task per shard, results placed by row."""
    import ray

    offsets = store.vectors().offsets
    shards = [k for k in range(store.spec.num_shards) if offsets[k + 1] > offsets[k]]
    g = np.empty(int(offsets[-1]), dtype=np.float64)
    ds = ray.data.from_items([{"shard": k} for k in shards], override_num_blocks=max(1, len(shards)))
    ds = ds.map_batches(_shard_potentials, batch_size=1, num_cpus=1,
                        fn_kwargs={"root": str(store.root), "solution": ray.put(solution)})
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, values in zip(batch["shard"], batch["g"]):
            g[offsets[k]:offsets[k + 1]] = values
    return g


def _shard_potentials(batch: dict, root: str, solution) -> dict:
    import ray

    solution = ray.get(solution)  # an ObjectRef: put once, shared by every task
    store = FeatureStore(root)
    shards = batch["shard"].tolist()
    values = [ot.c_transform(store.shard_vectors(k), solution, device=_device()) for k in shards]
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return {"shard": np.asarray(shards), "g": column}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
