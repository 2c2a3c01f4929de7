"""Subsets of tasks scored by the first-order estimator, and the searches built on them.

Everything here works on `TaskGradients`: the training and validation rows of a gradient store,
joined to their tasks and splits. A subset is a boolean vector over the candidate tasks; the
target task's own training rows are always in the fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from engine.data.ingest import examples_path
from engine.errors import SiftError
from engine.features.store import FeatureStore
from engine.select.tasks.estimator import fit_subsets, linearised_scores

MIN_TRAIN_ROWS = 8


@dataclass
class TaskGradients:
    tasks: list[str]  # every task, in a fixed order
    G: torch.Tensor  # (n, d) projected gradients
    f: torch.Tensor  # (n,) anchor outputs f*
    task: torch.Tensor  # (n,) index into tasks
    train: torch.Tensor  # (n,) bool: training row (else validation)

    def rows(self, task: str, train: bool) -> torch.Tensor:
        i = self.tasks.index(task)
        return (self.task == i) & (self.train == train)


def load(grads: str | Path, data: str | Path, top_up: int = 0, seed: int = 0,
         dtype: torch.dtype = torch.float32) -> TaskGradients:
    """A gradient store joined to the examples' task and split (ids must match)."""
    store = FeatureStore(grads)
    if store.spec.kind != "grads":
        raise SiftError(f"{grads} is a {store.spec.kind} store; select-tasks needs `sift featurize grads` output")
    rows = store.rows().with_row_index("row")
    data_path = examples_path(data)
    examples = pl.read_parquet(data_path, columns=["id", "task", "split"])
    joined = rows.drop("task").join(examples, on="id", how="left")
    if joined["split"].null_count() == joined.height:
        raise SiftError(f"no id of the gradient store {grads} is in {data_path}; were they built from the same data?")
    # Test rows stay out of every fit and every estimate: they are for `sift evaluate` only.
    joined = joined.with_columns(pl.col("split").fill_null("train")).filter(pl.col("split").is_in(["train", "validation"]))
    vectors = torch.as_tensor(np.array(store.vectors()), dtype=dtype)
    f = torch.tensor(np.array(rows["f"].to_numpy()), dtype=dtype)
    if not (torch.isfinite(vectors).all() and torch.isfinite(f).all()):
        raise SiftError(f"{grads}: NaN or infinite features; rebuild the store")
    tasks = sorted(joined["task"].drop_nulls().unique().to_list())
    index = {t: i for i, t in enumerate(tasks)}
    order = torch.as_tensor(joined["row"].to_numpy().astype(np.int64))
    data = TaskGradients(tasks, vectors[order], f[order],
                         torch.tensor([index[t] for t in joined["task"].to_list()]),
                         torch.tensor((joined["split"] == "train").to_numpy()))
    return _top_up(data, top_up, seed) if top_up else data


def _top_up(data: TaskGradients, rows: int, seed: int) -> TaskGradients:
    """Tasks with fewer than `rows` training rows get averages of random pairs of their rows."""
    rng = np.random.default_rng(seed)
    G, f, task, train = [data.G], [data.f], [data.task], [data.train]
    for i, name in enumerate(data.tasks):
        members = torch.nonzero(data.rows(name, train=True)).flatten().numpy()
        if len(members) < MIN_TRAIN_ROWS:
            raise SiftError(f"task {name!r} has {len(members)} training rows; at least {MIN_TRAIN_ROWS} are needed")
        missing = rows - len(members)
        if missing > 0:
            a, b = rng.choice(members, missing), rng.choice(members, missing)
            G.append((data.G[a] + data.G[b]) / 2)
            f.append((data.f[a] + data.f[b]) / 2)
            task.append(torch.full((missing,), i))
            train.append(torch.ones(missing, dtype=torch.bool))
    return TaskGradients(data.tasks, torch.cat(G), torch.cat(f), torch.cat(task), torch.cat(train))


def cluster_units(data: TaskGradients, targets: list[str], clusters: int, seed: int = 0,
                  max_rows: int = 8000) -> tuple[TaskGradients, dict[str, dict[str, int]]]:
    """The candidates' training rows regrouped into clusters of their projected gradients
    (agglomerative, cosine distance, average linkage), which become the units subsets are made
    of. Clustering runs on at most `max_rows` rows (it is quadratic); the rest join the cluster
    whose mean direction is closest. Returns the regrouped data and each cluster's task mix."""
    from sklearn.cluster import AgglomerativeClustering

    target_ids = torch.tensor([data.tasks.index(t) for t in targets])
    candidate = ~torch.isin(data.task, target_ids) & data.train
    rows = torch.nonzero(candidate).flatten().numpy()
    if len(rows) < clusters:
        raise SiftError(f"{len(rows)} candidate rows cannot form {clusters} clusters")
    unit = torch.nn.functional.normalize(data.G[rows].double(), dim=1).numpy()
    rng = np.random.default_rng(seed)
    fitted = np.sort(rng.choice(len(rows), size=min(len(rows), max_rows), replace=False))
    labels = np.empty(len(rows), dtype=np.int64)
    labels[fitted] = AgglomerativeClustering(n_clusters=clusters, metric="cosine", linkage="average") \
        .fit_predict(unit[fitted])
    if len(fitted) < len(rows):
        centroids = np.stack([unit[fitted][labels[fitted] == k].mean(0) for k in range(clusters)])
        rest = np.setdiff1d(np.arange(len(rows)), fitted)
        labels[rest] = np.argmax(unit[rest] @ centroids.T, axis=1)
    names = [*targets, *[f"cluster-{k:03d}" for k in range(clusters)]]
    keep = torch.isin(data.task, target_ids) | candidate
    new_task = data.task.clone()
    for i, t in enumerate(targets):
        new_task[data.task == data.tasks.index(t)] = i
    new_task[rows] = torch.as_tensor(labels + len(targets))
    mix: dict[str, dict[str, int]] = {}
    for k in range(clusters):
        members = data.task[rows[labels == k]].tolist()
        mix[names[len(targets) + k]] = {data.tasks[t]: members.count(t) for t in sorted(set(members))}
    return TaskGradients(names, data.G[keep], data.f[keep], new_task[keep], data.train[keep]), mix


@dataclass
class SubsetEstimates:
    candidates: list[str]  # the tasks a subset may contain
    subsets: np.ndarray  # (S, len(candidates)) bool
    loss: np.ndarray  # (S,) estimated target validation loss
    accuracy: np.ndarray  # (S,)


def estimate(data: TaskGradients, targets: list[str], subsets: np.ndarray, candidates: list[str],
             lam: float = 1e-3) -> SubsetEstimates:
    """Fit every subset (target training rows always in) and score it on the targets' validation rows."""
    missing = [t for t in targets if t not in data.tasks]
    if missing:
        raise SiftError(f"target task(s) {missing} not in the gradient store (tasks: {', '.join(data.tasks)})")
    evaluation = torch.isin(data.task, torch.tensor([data.tasks.index(t) for t in targets])) & ~data.train
    if not evaluation.any():
        raise SiftError(f"target task(s) {targets} have no validation rows to score on")
    fit = fit_subsets(data.G, data.f, fit_masks(data, targets, subsets, candidates), lam=lam)
    scores = linearised_scores(fit.w, data.G[evaluation], data.f[evaluation])
    return SubsetEstimates(candidates, np.asarray(subsets, dtype=bool), scores.loss.double().numpy(),
                           scores.accuracy.double().numpy())


def fit_masks(data: TaskGradients, targets: list[str], subsets: np.ndarray, candidates: list[str]) -> torch.Tensor:
    """(S, n) training rows of each subset of `candidates`, the targets' own training rows always in."""
    chosen = torch.zeros(len(subsets), len(data.tasks), dtype=torch.bool)
    chosen[:, [data.tasks.index(c) for c in candidates]] = torch.as_tensor(np.asarray(subsets, dtype=bool))
    chosen[:, [data.tasks.index(t) for t in targets]] = True
    return chosen[:, data.task] & data.train


def random_subsets(n: int, count: int, ratio: float, seed: int) -> np.ndarray:
    """`count` subsets each holding round(ratio * n) of n candidates, seeded."""
    size = min(n, max(1, round(ratio * n)))
    rng = np.random.default_rng(seed)
    out = np.zeros((count, n), dtype=bool)
    for s in range(count):
        out[s, rng.choice(n, size=size, replace=False)] = True
    return out


def random_ensemble(est: SubsetEstimates) -> np.ndarray:
    """Per candidate: mean estimated target loss of the subsets that contain it, minus of those
    that do not (negative = the task helps)."""
    with_t = np.array([est.loss[est.subsets[:, j]].mean() if est.subsets[:, j].any() else np.nan
                       for j in range(len(est.candidates))])
    without_t = np.array([est.loss[~est.subsets[:, j]].mean() if (~est.subsets[:, j]).any() else np.nan
                          for j in range(len(est.candidates))])
    return with_t - without_t


def ridge_surrogate(est: SubsetEstimates, alpha: float = 1e-2) -> np.ndarray:
    """Coefficients of loss ~ b0 + sum_t b_t [t in S] (negative = the task helps)."""
    from sklearn.linear_model import Ridge

    return Ridge(alpha=alpha).fit(est.subsets.astype(float), est.loss).coef_


def forward_selection(data: TaskGradients, targets: list[str], candidates: list[str], order: list[str],
                      lam: float = 1e-3) -> tuple[list[str], list[float]]:
    """Add candidates in `order`, keeping each one whose addition does not raise the estimated loss."""
    chosen: list[str] = []
    current = estimate(data, targets, np.zeros((1, len(candidates)), dtype=bool), candidates, lam).loss[0]
    trace = [float(current)]
    for name in order:
        trial = np.array([[c in chosen or c == name for c in candidates]])
        loss = estimate(data, targets, trial, candidates, lam).loss[0]
        if loss <= current:
            chosen.append(name)
            current = loss
        trace.append(float(current))
    return chosen, trace
