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
   tr X = m) rounded by k-means on the rows of X, or spectral clustering. Without a given m, the
   m with the highest average within-group density sum(T_cc)/|c| is taken.
3. Refinement: steepest-descent local search (move one task, swap two) on the estimator's own
   objective: the mean over tasks of the estimated validation loss of task i under a fit on
   i's group. Every neighbour's new groups are fitted in one batch; fits are cached by group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engine.errors import SiftError
from engine.select.tasks.estimator import fit_subsets
from engine.select.tasks.subsets import TaskGradients, random_subsets


def task_losses(data: TaskGradients, groups: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `groups` (S, n tasks) a fit on those tasks' training rows, scored on every
    task's validation rows: (S, n) linearised losses and accuracies."""
    masks = torch.as_tensor(np.asarray(groups, dtype=bool))[:, data.task] & data.train
    return _per_task(data, fit_subsets(data.G, data.f, masks, lam=lam).w)


def anchor_losses(data: TaskGradients) -> np.ndarray:
    """(n,) every task's validation loss at the anchor itself (w = 0, no fine-tune: exact)."""
    return _per_task(data, torch.zeros(1, data.G.shape[1], dtype=data.G.dtype))[0][0]


def _per_task(data: TaskGradients, W: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    validation = ~data.train
    z = data.f[validation] + W @ data.G[validation].T  # (S, n_val)
    member = torch.nn.functional.one_hot(data.task[validation], len(data.tasks)).to(z.dtype)  # (n_val, n)
    counts = member.sum(0).clamp_min(1)
    loss = (torch.nn.functional.softplus(-z) @ member) / counts
    accuracy = ((z > 0).to(z.dtype) @ member) / counts
    return loss.double().numpy(), accuracy.double().numpy()


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


def choose_m(T: np.ndarray, max_groups: int, seed: int, method: str = "sdp") -> tuple[int, dict[int, float]]:
    """The m in 1..max_groups whose partition by `method` has the highest average density."""
    scores = {m: density(T, cluster(T, m, method, seed)) for m in range(1, min(max_groups, len(T)) + 1)}
    return max(scores, key=lambda m: (scores[m], -m)), scores


@dataclass
class GroupScorer:
    """The estimator's objective of partitions, with fits cached by group."""

    data: TaskGradients
    lam: float
    cache: dict[frozenset, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    fits: int = 0

    def _fill(self, groups: set[frozenset]) -> None:
        todo = [g for g in groups if g not in self.cache]
        if not todo:
            return
        rows = np.zeros((len(todo), len(self.data.tasks)), dtype=bool)
        for k, g in enumerate(todo):
            rows[k, list(g)] = True
        loss, accuracy = task_losses(self.data, rows, self.lam)
        self.fits += len(todo)
        for k, g in enumerate(todo):
            self.cache[g] = (loss[k], accuracy[k])

    def per_task(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each task's estimated validation loss and accuracy under a fit on its own group."""
        groups = _groups(labels)
        self._fill(set(groups))
        loss, accuracy = np.empty(len(labels)), np.empty(len(labels))
        for g in groups:
            members = list(g)
            loss[members], accuracy[members] = self.cache[g][0][members], self.cache[g][1][members]
        return loss, accuracy

    def objective(self, labels: np.ndarray) -> float:
        return float(self.per_task(labels)[0].mean())

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
