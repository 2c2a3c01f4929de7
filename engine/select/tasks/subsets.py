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

from engine import storage
from engine.data import schema
from engine.data.ingest import examples_path
from engine.errors import SiftError
from engine.features.store import FeatureStore
from engine.select.tasks.estimator import Fitting, LabelRows, linearised_scores

MIN_TRAIN_ROWS = 8


@dataclass
class TaskGradients:
    tasks: list[str]  # every task, in a fixed order
    G: torch.Tensor  # (n, d) projected gradients
    f: torch.Tensor  # (n,) anchor outputs f*
    task: torch.Tensor  # (n,) index into tasks
    train: torch.Tensor  # (n,) bool: training row (else validation)
    ids: pl.Series | None = None  # the rows' example ids (null for synthetic top-up rows)

    def rows(self, task: str, train: bool) -> torch.Tensor:
        i = self.tasks.index(task)
        return (self.task == i) & (self.train == train)

    def shared(self) -> "SharedGradients":
        """The arrays as numpy, for Ray Tune trials (`tune.with_parameters` puts them in the
        object store once)."""
        return SharedGradients(self.tasks, self.G.numpy(), self.f.numpy(), self.task.numpy(), self.train.numpy())


@dataclass(frozen=True)
class SharedGradients:
    """TaskGradients as numpy arrays: every trial process on a node maps the object store's one
    copy of them (Ray reads numpy arrays without copying), where torch tensors would be copied
    into each trial. Read-only: the estimator never writes into its inputs."""

    tasks: list[str]
    G: np.ndarray
    f: np.ndarray
    task: np.ndarray
    train: np.ndarray

    def load(self) -> TaskGradients:
        import warnings

        with warnings.catch_warnings():  # torch warns that the object store's arrays are read-only
            warnings.simplefilter("ignore", UserWarning)
            return TaskGradients(self.tasks, *(torch.from_numpy(a) for a in (self.G, self.f, self.task, self.train)))


def load(grads: str | Path, data: str | Path, top_up: int = 0, seed: int = 0,
         dtype: torch.dtype = torch.float32) -> TaskGradients:
    """A gradient store joined to the examples' task and split (ids must match): the training and
    validation rows (test rows are for `sift evaluate` only), in store order.

    What stays per row, and why: the fit (estimator.fit_subsets) is a logistic regression, so
    every Newton step weighs each training row by sigmoid(-(f_i + g_i . w)), a function of that
    row's own g_i: no per-task sum or mean stands in for the rows, and every subset's estimate,
    the affinity and the local search score each validation row's own f_i + g_i . w. So G holds
    every training and validation row, once. What is per task (the task list, training rows per
    task for the top-up) comes from the row metadata before any vector is read.

    Nothing is copied twice: the store's row metadata is read as id and f only, the examples as
    id, task and split only; G is allocated once, (rows + top-up rows, d) in `dtype`, and each
    shard is read straight into it (mapped from a local store, fetched from a remote one with the
    next shard downloading) with only the rows kept; top-up rows are averaged in place after them;
    torch wraps the arrays without copying. The store's shards cannot be one mapped array for torch
    (separate files, test rows between the kept ones), and a fit reads every row in each of its
    matrix products, so mapping would only move the same resident pages from heap to page cache.
    The peak beyond G is one shard (jobs/bench/memory.py --kinds estimator)."""
    store = FeatureStore(grads)
    if store.spec.kind != "grads":
        raise SiftError(f"{grads} is a {store.spec.kind} store; select-tasks needs `sift featurize grads` output")
    data_path = examples_path(data)
    examples = storage.read_parquet(data_path, columns=["id", "task", "split"])
    joined = store.rows(columns=["id", "f"]).with_row_index("row").join(
        examples, on="id", how="left", maintain_order="left")
    del examples
    unknown = joined["split"].null_count()
    if unknown == joined.height:
        raise SiftError(f"no id of the gradient store {grads} is in {data_path}; were they built from the same data?")
    if unknown:
        example = joined.filter(pl.col("split").is_null())["id"][0]
        raise SiftError(f"{unknown:,} row(s) of the gradient store {grads} have ids not in {data_path} "
                        f"(e.g. {example!r}); were they built from the same data?")
    # Test rows stay out of every fit and every estimate: they are for `sift evaluate` only.
    joined = joined.filter(pl.col("split").is_in(["train", "validation"]))
    tasks = sorted(joined["task"].drop_nulls().unique().to_list())
    if joined["task"].null_count():
        raise SiftError(f"{data_path}: {joined['task'].null_count():,} training or validation rows have no task")
    task = torch.from_numpy(joined["task"].cast(pl.Enum(tasks)).to_physical().to_numpy().astype(np.int64))
    train = torch.from_numpy((joined["split"] == "train").to_numpy())
    plan = _TopUp.plan(tasks, task, train, top_up, seed) if top_up else _TopUp.none()
    n = joined.height
    G = torch.empty(n + plan.rows, store.spec.dim, dtype=dtype)
    f = torch.empty(n + plan.rows, dtype=dtype)
    store.vectors().read_into(G.numpy(), joined["row"].to_numpy())
    f.numpy()[:n] = joined["f"].to_numpy()
    for start in range(0, n, 1 << 16):  # a bounded temporary, not an (n, d) mask
        stop = min(n, start + (1 << 16))
        if not (torch.isfinite(G[start:stop]).all() and torch.isfinite(f[start:stop]).all()):
            raise SiftError(f"{grads}: NaN or infinite features; rebuild the store")
    ids = joined["id"]
    del joined
    return plan.apply(TaskGradients(tasks, G[:n], f[:n], task, train, ids), G, f)


@dataclass(frozen=True)
class _TopUp:
    """Rows added to tasks with fewer than `rows` training rows: each the average of a random pair
    (a[i], b[i]) of the task's own training rows."""

    task: np.ndarray  # (m,) task index of each added row
    a: np.ndarray  # (m,) row positions averaged
    b: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.task)

    @staticmethod
    def none() -> "_TopUp":
        empty = np.zeros(0, dtype=np.int64)
        return _TopUp(empty, empty, empty)

    @staticmethod
    def plan(tasks: list[str], task: torch.Tensor, train: torch.Tensor, rows: int, seed: int) -> "_TopUp":
        rng = np.random.default_rng(seed)
        added, a, b = [], [], []
        for i, name in enumerate(tasks):
            members = torch.nonzero((task == i) & train).flatten().numpy()
            if len(members) < MIN_TRAIN_ROWS:
                raise SiftError(f"task {name!r} has {len(members)} training rows; at least {MIN_TRAIN_ROWS} are needed")
            missing = rows - len(members)
            if missing > 0:
                a.append(rng.choice(members, missing))
                b.append(rng.choice(members, missing))
                added.append(np.full(missing, i))
        if not added:
            return _TopUp.none()
        return _TopUp(*(np.concatenate(x).astype(np.int64) for x in (added, a, b)))

    def apply(self, data: TaskGradients, G: torch.Tensor, f: torch.Tensor) -> TaskGradients:
        """`data` with the added rows: G and f hold data's rows first and room for the added ones
        after them (data.G may be a view of G)."""
        if not self.rows:
            return data
        n = len(data.f)
        a, b = torch.from_numpy(self.a), torch.from_numpy(self.b)
        G[n:] = (G[a] + G[b]) / 2
        f[n:] = (f[a] + f[b]) / 2
        ids = None if data.ids is None else pl.concat([data.ids, pl.Series(data.ids.name, [None] * self.rows,
                                                                            dtype=pl.String)])
        return TaskGradients(data.tasks, G, f, torch.cat([data.task, torch.from_numpy(self.task)]),
                             torch.cat([data.train, torch.ones(self.rows, dtype=torch.bool)]), ids)


def _top_up(data: TaskGradients, rows: int, seed: int) -> TaskGradients:
    """Tasks with fewer than `rows` training rows get averages of random pairs of their rows."""
    plan = _TopUp.plan(data.tasks, data.task, data.train, rows, seed)
    G = torch.cat([data.G, data.G.new_empty(plan.rows, data.G.shape[1])])
    f = torch.cat([data.f, data.f.new_empty(plan.rows)])
    return plan.apply(data, G, f)


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
    def unit(at: np.ndarray) -> np.ndarray:  # float64 unit rows of a slice, never of every candidate at once
        return torch.nn.functional.normalize(data.G[rows[at]].double(), dim=1).numpy()

    rng = np.random.default_rng(seed)
    fitted = np.sort(rng.choice(len(rows), size=min(len(rows), max_rows), replace=False))
    labels = np.empty(len(rows), dtype=np.int64)
    sample = unit(fitted)
    labels[fitted] = AgglomerativeClustering(n_clusters=clusters, metric="cosine", linkage="average") \
        .fit_predict(sample)
    if len(fitted) < len(rows):
        centroids = np.stack([sample[labels[fitted] == k].mean(0) for k in range(clusters)])
        rest = np.setdiff1d(np.arange(len(rows)), fitted)
        for start in range(0, len(rest), 1 << 16):
            part = rest[start:start + (1 << 16)]
            labels[part] = np.argmax(unit(part) @ centroids.T, axis=1)
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
    ids = None if data.ids is None else data.ids.filter(pl.Series(keep.numpy()))
    return TaskGradients(names, data.G[keep], data.f[keep], new_task[keep], data.train[keep], ids), mix


@dataclass
class SubsetEstimates:
    candidates: list[str]  # the tasks a subset may contain
    subsets: np.ndarray  # (S, len(candidates)) bool
    loss: np.ndarray  # (S,) estimated target validation loss
    accuracy: np.ndarray | None  # (S,) argmax over each task's labels (None: no per-label rows given)
    macro_f1: np.ndarray | None = None  # (S,)


def estimate(data: TaskGradients, targets: list[str], subsets: np.ndarray, candidates: list[str],
             lam: float | Fitting = 1e-3, labels: LabelRows | None = None) -> SubsetEstimates:
    """Fit every subset (target training rows always in) and score it on the targets' validation
    rows: the loss of the gold answer, and with `labels` (the same rows against every label of
    their task) accuracy and macro-F1 of the argmax."""
    missing = [t for t in targets if t not in data.tasks]
    if missing:
        raise SiftError(f"target task(s) {missing} not in the gradient store (tasks: {', '.join(data.tasks)})")
    evaluation = torch.isin(data.task, torch.tensor([data.tasks.index(t) for t in targets])) & ~data.train
    if not evaluation.any():
        raise SiftError(f"target task(s) {targets} have no validation rows to score on")
    W = fit_weights(data, targets, subsets, candidates, lam)
    scores = linearised_scores(W, data.G[evaluation], data.f[evaluation], labels)
    return SubsetEstimates(candidates, np.asarray(subsets, dtype=bool), scores.loss.double().numpy(),
                           *(None if v is None else v.double().numpy() for v in (scores.accuracy, scores.macro_f1)))


def fit_weights(data: TaskGradients, targets: list[str], subsets: np.ndarray, candidates: list[str],
                lam: float | Fitting = 1e-3) -> torch.Tensor:
    """(S, d) w of every subset. A subset whose fit holds no training row (no candidate, and a target
    that has only validation rows: the common case) is no fine-tune at all: it stays at the anchor,
    w = 0, which is also the limit of the regularised fit as its rows vanish."""
    masks = fit_masks(data, targets, subsets, candidates)
    W = torch.zeros(masks.shape[0], data.G.shape[1], dtype=data.G.dtype)
    rows = masks.any(1)
    if rows.any():
        W[rows] = (lam if isinstance(lam, Fitting) else Fitting(lam)).solve(data.G, data.f, masks[rows])
    return W


def has_training_rows(data: TaskGradients, targets: list[str]) -> bool:
    """Whether the targets have training rows of their own (a "target only" fine-tune exists)."""
    return bool(torch.isin(data.task, torch.tensor([data.tasks.index(t) for t in targets])).logical_and(data.train).any())


def fit_masks(data: TaskGradients, targets: list[str], subsets: np.ndarray, candidates: list[str]) -> torch.Tensor:
    """(S, n) training rows of each subset of `candidates`, the targets' own training rows always in."""
    chosen = torch.zeros(len(subsets), len(data.tasks), dtype=torch.bool)
    chosen[:, [data.tasks.index(c) for c in candidates]] = torch.as_tensor(np.asarray(subsets, dtype=bool))
    chosen[:, [data.tasks.index(t) for t in targets]] = True
    return chosen[:, data.task] & data.train


def fitting(grads: str | Path, lam: float, fit) -> Fitting:
    """The estimator's fit settings (an EstimatorFit config) for a gradient store; the norm
    rescaling reads the store's projection (P^T P) and anchor norm."""
    if fit.update_norm is None:
        return Fitting(lam, fit.method, fit.gradex_c, radius=fit.radius)
    from engine import storage
    from engine.features.grads import Factors
    from engine.features.projection import Projector

    factors = Factors.read(grads)
    settings = storage.read_json(storage.join(grads, "config.json"))
    gram = Projector(factors.projected, settings["dim"], settings["seed"], cache_mb=0).gram()
    return Fitting(lam, fit.method, fit.gradex_c, fit.update_norm, gram, factors.anchor_norm, fit.radius)


def target_rows(data: TaskGradients, examples: pl.DataFrame, targets: list[str]) -> pl.DataFrame:
    """The targets' validation rows of the store (what every estimate is scored on), in store
    order, with their id, text, task and label from the examples."""
    evaluation = torch.isin(data.task, torch.tensor([data.tasks.index(t) for t in targets])) & ~data.train
    ids = data.ids.gather(torch.nonzero(evaluation).flatten().numpy())
    return pl.DataFrame({"id": ids}).join(examples.select("id", "text", "task", "label"), on="id", how="left",
                                          maintain_order="left")


def label_sets(examples: pl.DataFrame, tasks: list[str]) -> dict[str, list[str]]:
    """Each task's label set: the labels of its training and validation rows, sorted."""
    known = schema.label_sets(examples.filter(pl.col("task").is_in(tasks)))
    return {t: known.get(t, []) for t in tasks}


def _classes(rows: pl.DataFrame, labels: dict[str, list[str]]) -> tuple[list[tuple[str, str]], torch.Tensor, torch.Tensor]:
    """(task, label) classes, the gold class of every row and each class's task index."""
    classes = [(t, label) for t in sorted(labels) for label in labels[t]]
    index = {c: k for k, c in enumerate(classes)}
    missing = [(t, lab) for t, lab in zip(rows["task"], rows["label"]) if (t, lab) not in index]
    if missing:
        raise SiftError(f"evaluation rows with a label outside their task's label set: {missing[:3]}")
    gold = torch.tensor([index[(t, lab)] for t, lab in zip(rows["task"], rows["label"])])
    tasks = sorted(labels)
    return classes, gold, torch.tensor([tasks.index(t) for t, _ in classes])


def label_rows(anchor, rows: pl.DataFrame, labels: dict[str, list[str]]) -> LabelRows:
    """`rows` (id, text, task, label) against every label of their task: f* and the projected
    gradient of each, from the anchor's own featurizer (what `featurize grads` stores for the gold
    label). A row that yields no feature for a label never predicts it (f = -inf)."""
    classes, gold, task_of_class = _classes(rows, labels)
    f = torch.full((rows.height, len(classes)), -torch.inf, dtype=torch.float64)
    G = torch.zeros(rows.height, len(classes), anchor.featurizer.cfg.dim, dtype=torch.float64)
    position = {row_id: i for i, row_id in enumerate(rows["id"])}
    for c, (task, label) in enumerate(classes):
        members = rows.filter(pl.col("task") == task).with_columns(label=pl.lit(label))
        if members.height == 0:
            continue
        out = anchor.featurizer(members)
        at = torch.tensor([position[i] for i in out.rows["id"]], dtype=torch.long)
        f[at, c] = torch.as_tensor(out.rows["f"].to_numpy(), dtype=torch.float64)
        G[at, c] = torch.as_tensor(out.vectors, dtype=torch.float64)
    return LabelRows(f, G, gold, task_of_class)


def forward_label_metrics(anchor, rows: pl.DataFrame, labels: dict[str, list[str]]) -> tuple[float, float]:
    """Accuracy and macro-F1 of the anchor model as it is now (e.g. after a fine-tune or with
    theta* + P w loaded): each row's label is the argmax of f over its task's labels."""
    from engine.select.tasks.estimator import label_metrics

    classes, gold, task_of_class = _classes(rows, labels)
    scores = torch.full((rows.height, len(classes)), -torch.inf, dtype=torch.float64)
    for c, (task, label) in enumerate(classes):
        members = rows.with_row_index("at").filter(pl.col("task") == task).with_columns(label=pl.lit(label))
        encoded = [anchor.featurizer.encode(r) for r in members.iter_rows(named=True)]
        ok = [k for k, e in enumerate(encoded) if not isinstance(e, str)]
        if ok:
            at = torch.as_tensor(members["at"].to_numpy().astype(np.int64))[ok]
            scores[at, c] = anchor.scores([encoded[k] for k in ok]).double()
    accuracy, macro_f1 = label_metrics(scores[None], gold, task_of_class)
    return float(accuracy[0]), float(macro_f1[0])


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
                      lam: float | Fitting = 1e-3) -> tuple[list[str], list[float]]:
    """Add candidates in `order`, keeping each one whose addition does not raise the estimated loss.
    The start is the targets' own training rows, or the anchor itself when they have none."""
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
