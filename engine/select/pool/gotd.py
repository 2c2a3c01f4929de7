"""GOT-D over a pool in a feature store: solve on a support, extend by a Ray Data pass."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import polars as pl

from engine.config import SelectPoolConfig
from engine.errors import SiftError
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
    """Row numbers of the `domain_keep` sources whose sample is closest to the target in entropic
    OT cost, and the test's report.

    Three passes over the shards' rows files, one shard in memory at a time: count each source's
    rows; draw each source's sample (sorted positions among its rows, the same draws from the same
    seeded stream as over the whole task column) and fetch those vectors; list the kept sources'
    rows. The driver holds the samples (domain_sample vectors per source) and the returned row
    numbers (int64: 8 bytes per kept row)."""
    counts: Counter = Counter()
    for _, tasks in _shard_tasks(store):
        counts.update(dict(zip(*np.unique(tasks, return_counts=True))))
    if set(counts) <= {_NO_TASK}:
        raise SiftError("the domain test needs a source per candidate (a task column in the pool)")
    rng = np.random.default_rng(cfg.seed)
    target_sample = target[rng.choice(len(target), size=min(len(target), cfg.domain_sample), replace=False)]
    names = sorted(counts)
    positions = {name: np.sort(rng.choice(counts[name], size=min(counts[name], cfg.domain_sample), replace=False))
                 for name in names}  # k-th row of the source, in pool order
    seen, picked = Counter(), {name: [] for name in names}
    for offset, tasks in _shard_tasks(store):
        for name in np.unique(tasks):
            local = np.flatnonzero(tasks == name)
            wanted = positions[name]
            lo, hi = np.searchsorted(wanted, [seen[name], seen[name] + len(local)])
            picked[name].append(offset + local[wanted[lo:hi] - seen[name]])
            seen[name] += len(local)
    vectors = store.vectors()
    solves = {name: ot.ot_cost(vectors[np.concatenate(picked[name])], target_sample, cfg.eps, cfg.threshold,
                               cfg.max_iter) for name in names}
    costs = {name: solve.cost for name, solve in solves.items()}
    kept = sorted(costs, key=costs.get)[: cfg.domain_keep]
    unconverged = sorted(name for name, solve in solves.items() if not solve.converged)
    eligible = np.concatenate([offset + np.flatnonzero(np.isin(tasks, kept)) for offset, tasks in _shard_tasks(store)])
    return eligible, {"ot_cost": costs, "kept": kept, "unconverged": unconverged}


_NO_TASK = "(none)"


def _shard_tasks(store: FeatureStore) -> Iterator[tuple[int, np.ndarray]]:
    """(row number of the shard's first row, the shard's sources) for every shard in order."""
    offset = 0
    for k in range(store.spec.num_shards):
        rows = store.shard_rows_frame(k)
        if "task" not in rows.columns:
            raise SiftError("the domain test needs a source per candidate (a task column in the pool)")
        yield offset, rows["task"].cast(pl.String).fill_null(_NO_TASK).to_numpy()
        offset += rows.height


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
