"""Grouping n tasks into m for the adapter ensemble (docs/ALGORITHMS.md section 3), by the estimator.

1. Affinity: the n single tasks and random subsets of ~0.3 n tasks are all fitted at once, and
   every task's validation rows are scored under every fit. K[i, k] is the drop of task i's
   estimated validation loss (from the anchor's, w = 0) per unit share of task k's training rows
   in a fit, by least squares over the fits that hold i (as the objective scores i: under its own
   group's fit): drop_i(S) ~ sum_k share_k(S) K[i, k]. The affinity is what a task gains from
   another's rows compared with its own, symmetrised: T[i, j] = (K[i, j] - K[i, i] + K[j, i] -
   K[j, j]) / 2, zero diagonal. In these units the within-group sum of sum(T_cc)/|c| over groups
   is, to first order, n times the drop of the local search's objective from "every task alone",
   so clustering T and refining by the estimator maximise the same thing. (The z-scored affinity
   this replaces never saw a task's gain from its own rows and weighed a task whose loss moves by
   0.004 like one whose loss moves by 1: its groups contradicted the objective; see
   `test_affinity_agrees_with_the_objective` in tests/test_groups.py.)
2. Clustering of T into m groups: the SDP relaxation (max tr(TX), X PSD, X >= 0, X1 = 1,
   tr X = m) rounded by k-means on the rows of X, or spectral clustering.
3. Refinement: steepest-descent local search (move one task, swap two) on the estimator's own
   objective: the mean over tasks of the estimated validation loss of task i under a fit on
   i's group. Every neighbour's new groups are fitted in one batch; fits are cached by group.
4. Without a given m (`choose_m`): every m in 1..max_groups is clustered and refined as above,
   and the fewest groups whose objective is within one standard error of the lowest is taken
   (the one-standard-error rule, Breiman et al. 1984; Hastie et al., ESL 7.10). The objective
   is a held-out estimate (fits on training rows, scored on validation rows), so more groups
   win only where keeping tasks apart lowers the estimated validation loss; the standard error
   is that of the difference from the best m, paired over validation rows, so an m is preferred
   to a smaller one only when the validation rows can tell the two apart, since every adapter
   costs an inference pass per query. Each m's partition is refined on the same validation rows
   that score it, which flatters larger m a little (more partitions to pick from); preferring
   the fewest groups within the noise guards against that too. (The average within-group
   density sum(T_cc)/|c| used before estimates no loss: a singleton scores 0 whatever its task
   loses alone, and it compared m by a measure the refinement does not optimise. It is still
   reported beside each m.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engine.errors import SiftError
from engine.select.tasks.estimator import fit_subsets
from engine.select.tasks.subsets import TaskGradients, random_subsets


def row_scores(data: TaskGradients, groups: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `groups` (S, n tasks) a fit on those tasks' training rows, scored on every
    validation row: (S, validation rows) linearised losses and correctness (1.0 or 0.0)."""
    masks = torch.as_tensor(np.asarray(groups, dtype=bool))[:, data.task] & data.train
    return _row_scores(data, fit_subsets(data.G, data.f, masks, lam=lam).w)


def task_losses(data: TaskGradients, groups: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """`row_scores` averaged over each task's validation rows: (S, n) losses and accuracies."""
    return tuple(per_task_mean(data, scores) for scores in row_scores(data, groups, lam))


def anchor_losses(data: TaskGradients) -> np.ndarray:
    """(n,) every task's validation loss at the anchor itself (w = 0, no fine-tune: exact)."""
    return per_task_mean(data, _row_scores(data, torch.zeros(1, data.G.shape[1], dtype=data.G.dtype))[0])[0]


def per_task_mean(data: TaskGradients, values: np.ndarray) -> np.ndarray:
    """(..., validation rows) -> (..., n): the mean over each task's validation rows."""
    member = np.eye(len(data.tasks))[data.task[~data.train].numpy()]  # (validation rows, n)
    return (values @ member) / np.maximum(member.sum(0), 1)


def _row_scores(data: TaskGradients, W: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    validation = ~data.train
    z = data.f[validation] + W @ data.G[validation].T  # (S, n_val)
    return torch.nn.functional.softplus(-z).double().numpy(), (z > 0).double().numpy()


@dataclass
class Affinity:
    tasks: list[str]
    T: np.ndarray  # (n, n) symmetric, zero diagonal, in estimated validation loss (module docstring)
    K: np.ndarray  # (n, n) K[i, k]: drop of task i's loss per unit share of task k's rows in a fit
    subsets: np.ndarray  # (S, n) bool, the random subsets (the n single tasks are fitted besides)
    loss: np.ndarray  # (S, n) estimated validation loss of every task under every random subset's fit


def affinity(data: TaskGradients, subsets: int, ratio: float, lam: float, seed: int) -> Affinity:
    n = len(data.tasks)
    missing = [t for t in data.tasks if not bool((data.task == data.tasks.index(t)).logical_and(~data.train).any())]
    if missing:
        raise SiftError(f"task(s) {missing} have no validation rows: the affinity needs them")
    untrained = [t for t in data.tasks if not bool(data.rows(t, train=True).any())]
    if untrained:
        raise SiftError(f"task(s) {untrained} have no training rows: the affinity fits every task on its own rows")
    sets = random_subsets(n, subsets, max(ratio, 2 / n), seed)  # a pair at least, or T says nothing
    # The single tasks make every K[i, k] identifiable whatever the random subsets are (all of one
    # size, all the same when ratio = 1); the random subsets average K over realistic group sizes.
    fits = np.vstack([np.eye(n, dtype=bool), sets])
    loss, _ = task_losses(data, fits, lam)
    rows = torch.bincount(data.task[data.train], minlength=n).double().numpy()
    share = fits * rows
    share /= share.sum(1, keepdims=True)
    drop = anchor_losses(data)[None, :] - loss  # (n + S, n)
    K = np.zeros((n, n))
    for i in range(n):  # as the objective scores task i: under fits that hold it
        holding = fits[:, i]
        K[i] = np.linalg.lstsq(share[holding], drop[holding, i], rcond=None)[0]
    gain = K - np.diag(K)[:, None]  # from k's rows rather than i's own
    return Affinity(list(data.tasks), (gain + gain.T) / 2, K, sets, loss[n:])


def density(T: np.ndarray, labels: np.ndarray) -> float:
    """Average over groups of sum(T_cc) / |c|."""
    groups = np.unique(labels)
    return float(np.mean([T[np.ix_(labels == g, labels == g)].sum() / (labels == g).sum() for g in groups]))


def spectral(T: np.ndarray, m: int, seed: int) -> np.ndarray:
    from sklearn.cluster import SpectralClustering

    if m == 1:
        return np.zeros(len(T), dtype=int)
    if m == len(T):
        return np.arange(len(T))
    A = T - T[~np.eye(len(T), dtype=bool)].min()  # non-negative similarities
    np.fill_diagonal(A, 0.0)
    A += 1e-9
    return SpectralClustering(m, affinity="precomputed", random_state=seed).fit_predict(A)


def sdp(T: np.ndarray, m: int, seed: int) -> np.ndarray:
    """The SDP relaxation, rounded by k-means on the rows of X."""
    import cvxpy as cp
    from sklearn.cluster import KMeans

    n = len(T)
    if m in (1, n):
        return spectral(T, m, seed)
    X = cp.Variable((n, n), symmetric=True)
    constraints = [X >> 0, X >= 0, X @ np.ones(n) == np.ones(n), cp.trace(X) == m]
    problem = cp.Problem(cp.Maximize(cp.trace(T @ X)), constraints)
    try:
        problem.solve(solver=cp.SCS, eps=1e-6, max_iters=20000)
    except cp.error.SolverError:
        X.value = None
    if X.value is None:
        raise SiftError(f"the SDP relaxation did not solve ({problem.status}); use --set method=spectral")
    labels = KMeans(m, n_init=10, random_state=seed).fit_predict(X.value)
    return labels if len(np.unique(labels)) == m else spectral(T, m, seed)


def cluster(T: np.ndarray, m: int, method: str, seed: int) -> np.ndarray:
    """The partition of T into m groups by the configured method ("sdp" or "spectral")."""
    if method not in CLUSTERINGS:
        raise SiftError(f"unknown clustering method {method!r}; known: {', '.join(CLUSTERINGS)}")
    return CLUSTERINGS[method](T, m, seed)


CLUSTERINGS = {"sdp": sdp, "spectral": spectral}


@dataclass
class GroupScorer:
    """The estimator's objective of partitions, with fits cached by group."""

    data: TaskGradients
    lam: float
    cache: dict[frozenset, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # group -> every
    # validation row's loss and correctness under a fit on the group
    fits: int = 0

    def _fill(self, groups: set[frozenset]) -> None:
        todo = [g for g in groups if g not in self.cache]
        if not todo:
            return
        rows = np.zeros((len(todo), len(self.data.tasks)), dtype=bool)
        for k, g in enumerate(todo):
            rows[k, list(g)] = True
        loss, correct = row_scores(self.data, rows, self.lam)
        self.fits += len(todo)
        for k, g in enumerate(todo):
            self.cache[g] = (loss[k], correct[k])

    def rows(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each validation row's estimated loss and correctness under a fit on its task's group."""
        groups = _groups(labels)
        self._fill(set(groups))
        task = self.data.task[~self.data.train].numpy()
        loss, correct = np.empty(len(task)), np.empty(len(task))
        for g in groups:
            held = np.isin(task, list(g))
            loss[held], correct[held] = self.cache[g][0][held], self.cache[g][1][held]
        return loss, correct

    def per_task(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each task's estimated validation loss and accuracy under a fit on its own group."""
        loss, correct = self.rows(labels)
        return per_task_mean(self.data, loss), per_task_mean(self.data, correct)

    def objective(self, labels: np.ndarray) -> float:
        return float(self.per_task(labels)[0].mean())

    def standard_error(self, a: np.ndarray, b: np.ndarray) -> float:
        """Standard error of objective(a) - objective(b), paired over validation rows: the
        objective is a mean over tasks of means over their rows, so the difference's variance is
        sum_i var_i / (n^2 |val_i|), var_i that of the per-row loss differences in task i."""
        difference = self.rows(a)[0] - self.rows(b)[0]
        task = self.data.task[~self.data.train].numpy()
        variance = sum(np.var(difference[task == i], ddof=1) / (task == i).sum()
                       for i in range(len(self.data.tasks)) if (task == i).sum() > 1)
        return float(np.sqrt(variance) / len(self.data.tasks))

    def local_search(self, labels: np.ndarray, rounds: int) -> tuple[np.ndarray, list[float]]:
        """Steepest descent over single moves and swaps that keep every group non-empty."""
        labels = _relabel(labels)
        trace = [self.objective(labels)]
        for _ in range(rounds):
            neighbours = list(_neighbours(labels))
            self._fill({g for n in neighbours for g in _groups(n)})
            scores = [self.objective(n) for n in neighbours]
            if not scores or min(scores) >= trace[-1] - 1e-12:
                break
            labels = _relabel(neighbours[int(np.argmin(scores))])
            trace.append(min(scores))
        return labels, trace


@dataclass
class GroupCount:
    """One m tried by `choose_m`: its clustered and refined partition, by every measure."""

    m: int
    labels: list[int]
    objective: float  # mean estimated validation loss over tasks: lower is better
    excess: float  # objective minus the lowest objective over the m tried
    standard_error: float  # of `excess`, paired over validation rows (0 for the best m itself)
    accuracy: float  # mean estimated validation accuracy over tasks
    density: float  # average within-group density sum(T_cc)/|c| (the criterion before; higher is better)


@dataclass
class GroupCountChoice:
    m: int
    rule: str
    counts: list[GroupCount]


ONE_STANDARD_ERROR = "fewest groups whose objective is within one standard error of the lowest"


def choose_m(scorer: GroupScorer, T: np.ndarray, max_groups: int, method: str, seed: int,
             rounds: int) -> GroupCountChoice:
    """Every m in 1..max_groups: `method`'s partition of T refined by the local search; the
    fewest groups whose objective is within one standard error of the lowest (module docstring)."""
    partitions = {m: scorer.local_search(cluster(T, m, method, seed), rounds)[0]
                  for m in range(1, min(max_groups, len(T)) + 1)}
    objectives = {m: scorer.objective(p) for m, p in partitions.items()}
    best = min(objectives, key=lambda m: (objectives[m], m))
    counts = [GroupCount(m=m, labels=p.tolist(), objective=objectives[m], excess=objectives[m] - objectives[best],
                         standard_error=scorer.standard_error(p, partitions[best]),
                         accuracy=float(scorer.per_task(p)[1].mean()), density=density(T, p))
              for m, p in partitions.items()]
    chosen = min(c.m for c in counts if c.excess <= c.standard_error)
    return GroupCountChoice(chosen, ONE_STANDARD_ERROR, counts)


def _groups(labels: np.ndarray) -> list[frozenset]:
    return [frozenset(np.flatnonzero(labels == g).tolist()) for g in np.unique(labels)]


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Groups numbered by their first task, so equal partitions have equal labels."""
    order = {g: k for k, g in enumerate(dict.fromkeys(np.asarray(labels).tolist()))}
    return np.array([order[g] for g in np.asarray(labels).tolist()])


def _neighbours(labels: np.ndarray):
    m = labels.max() + 1
    sizes = np.bincount(labels, minlength=m)
    for i in range(len(labels)):
        if sizes[labels[i]] > 1:
            for g in range(m):
                if g != labels[i]:
                    moved = labels.copy()
                    moved[i] = g
                    yield moved
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            if labels[i] != labels[j]:
                swapped = labels.copy()
                swapped[i], swapped[j] = labels[j], labels[i]
                yield swapped
