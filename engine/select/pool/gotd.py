"""GOT-D over a pool in a feature store: solve on a support, extend by a Ray Data pass."""

from __future__ import annotations

import time

import numpy as np

from engine.config import SelectPoolConfig
from engine.features.store import FeatureStore
from engine.index import kmeans
from engine.select.pool import ot


def gotd_scores(store: FeatureStore, target: np.ndarray, cfg: SelectPoolConfig) -> tuple[np.ndarray, dict]:
    """Scores (higher = chosen first) and the solve's report for every vector in `store`."""
    ot.default_eps_check(cfg.eps)
    vectors = store.vectors()
    eligible, domains = None, None  # eligible: row numbers kept by the domain test (None: every row)
    if cfg.domain_keep is not None:
        eligible, domains = domain_test(store, target, cfg)
    n = len(vectors) if eligible is None else len(eligible)

    def rows(picked: np.ndarray) -> np.ndarray:
        return vectors[picked if eligible is None else eligible[picked]]

    weights = None
    if n <= cfg.full_max:
        support_kind, support = "full", rows(np.arange(n))
    elif cfg.support == "sample":
        support_kind, support = "sample", rows(ot.support_sample(n, cfg.support_size, cfg.seed))
    else:
        sample = rows(ot.support_sample(n, 20 * cfg.support_size, cfg.seed))
        support, assignment = kmeans(sample, cfg.support_size, niter=10, seed=cfg.seed)
        weights = np.bincount(assignment, minlength=cfg.support_size).astype(np.float64)
        support_kind, support, weights = "kmeans", support[weights > 0], weights[weights > 0]
    solution = ot.sinkhorn_potentials(support, target, cfg.eps, cfg.threshold, cfg.max_iter, a=weights,
                                      device=_device())
    started = time.perf_counter()
    g = c_transform_store(store, solution)
    extend_s = time.perf_counter() - started
    if eligible is None:  # the driver holds g and one array of scores: 16 bytes per candidate at most
        scores = ot.calibrated_gradient(g)
    else:
        scores = np.full(len(g), np.nan)
        scores[eligible] = ot.calibrated_gradient(g[eligible])
    del g
    if cfg.variant == "clean":
        np.negative(scores, out=scores)
    scores[np.isnan(scores)] = -np.inf  # sources dropped by the domain test come last, never selected
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
    if domains is not None:
        report["domains"] = domains
    return scores, report


def domain_test(store: FeatureStore, target: np.ndarray, cfg: SelectPoolConfig) -> tuple[np.ndarray, dict]:
    """Rows of the `domain_keep` sources whose sample is closest to the target in entropic OT cost."""
    from engine.errors import SiftError

    rows = store.rows()
    if "task" not in rows.columns or rows["task"].null_count() == rows.height:
        raise SiftError("the domain test needs a source per candidate (a task column in the pool)")
    tasks = rows["task"].fill_null("(none)").to_numpy()
    vectors = store.vectors()
    rng = np.random.default_rng(cfg.seed)
    target_sample = target[rng.choice(len(target), size=min(len(target), cfg.domain_sample), replace=False)]
    solves = {}
    for name in sorted(set(tasks)):
        members = np.flatnonzero(tasks == name)
        picked = np.sort(rng.choice(members, size=min(len(members), cfg.domain_sample), replace=False))
        solves[name] = ot.ot_cost(vectors[picked], target_sample, cfg.eps, cfg.threshold, cfg.max_iter)
    costs = {name: solve.cost for name, solve in solves.items()}
    kept = sorted(costs, key=costs.get)[: cfg.domain_keep]
    unconverged = sorted(name for name, solve in solves.items() if not solve.converged)
    return np.flatnonzero(np.isin(tasks, kept)), {"ot_cost": costs, "kept": kept, "unconverged": unconverged}


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
