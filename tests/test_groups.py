"""Task grouping: affinity, SDP/spectral clustering, the choice of m, local search, and the
mixture weights and metrics of the ensemble."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.ensemble import metrics, weights
from engine.ensemble import grouping
from engine.select.tasks.subsets import TaskGradients


def _planted(seed: int = 0, per: int = 60, d: int = 16) -> TaskGradients:
    """Six tasks in two planted families: the gradients of a family share one direction, so
    training on a family member helps the others and nothing else."""
    rng = np.random.default_rng(seed)
    family = [0, 0, 0, 1, 1, 1]
    directions = np.linalg.qr(rng.normal(size=(d, 2)))[0].T
    G, task, train = [], [], []
    for t, fam in enumerate(family):
        G.append(directions[fam] * 2.0 + rng.normal(scale=0.6, size=(per, d)))
        task += [t] * per
        train += [True] * (per * 3 // 4) + [False] * (per - per * 3 // 4)
    G = torch.tensor(np.concatenate(G))
    return TaskGradients([f"task-{t}" for t in range(6)], G, torch.full((len(G),), -0.5, dtype=G.dtype),
                         torch.tensor(task), torch.tensor(train))


def _same_partition(a, b) -> bool:
    return {frozenset(np.flatnonzero(np.asarray(a) == g)) for g in set(a)} == \
        {frozenset(np.flatnonzero(np.asarray(b) == g)) for g in set(b)}


def test_affinity_recovers_planted_families():
    aff = grouping.affinity(_planted(), subsets=80, ratio=0.5, lam=1e-3, seed=0)
    T = aff.T
    assert np.allclose(T, T.T) and np.all(np.diag(T) == 0)
    within = T[np.ix_([0, 1, 2], [0, 1, 2])][~np.eye(3, dtype=bool)].mean()
    across = T[np.ix_([0, 1, 2], [3, 4, 5])].mean()
    assert within > across + 0.5
    planted = [0, 0, 0, 1, 1, 1]
    assert _same_partition(grouping.sdp(T, 2, 0), planted)
    assert _same_partition(grouping.spectral(T, 2, 0), planted)
    m, densities = grouping.choose_m(T, max_groups=4, seed=0)
    assert m == 2 and set(densities) == {1, 2, 3, 4}


def test_local_search_improves_a_bad_partition_and_caches_fits():
    scorer = grouping.GroupScorer(_planted(), lam=1e-3)
    mixed = np.array([0, 1, 0, 1, 0, 1])
    labels, trace = scorer.local_search(mixed, rounds=10)
    assert trace[-1] < trace[0] and all(b <= a for a, b in zip(trace, trace[1:]))
    assert _same_partition(labels, [0, 0, 0, 1, 1, 1])
    fits = scorer.fits
    scorer.objective(labels)  # already seen: no new fit
    assert scorer.fits == fits


def test_density():
    T = np.array([[0, 2, -1], [2, 0, -1], [-1, -1, 0.0]])
    assert grouping.density(T, np.array([0, 0, 1])) == pytest.approx(((2 + 2) / 2 + 0) / 2)


def test_em_weights_minimise_the_mixture_nll():
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    gold = np.clip(np.stack([rng.beta(5, 2, 300), rng.beta(2, 2, 300), rng.beta(3, 3, 300)]), 1e-6, 1)
    w = weights.fit(gold, prune=0.0)
    assert w.sum() == pytest.approx(1) and (w >= 0).all()
    reference = minimize(lambda a: weights.nll(gold, np.exp(a) / np.exp(a).sum()), np.zeros(3), method="Nelder-Mead",
                         options={"xatol": 1e-8, "fatol": 1e-12, "maxiter": 4000})
    assert weights.nll(gold, w) <= reference.fun + 1e-6
    assert w.argmax() == 0  # the accurate adapter dominates
    assert (weights.fit(gold, prune=0.2) == 0).sum() >= 1  # pruned weights are exactly zero


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, log_loss

    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), size=200)
    gold = rng.integers(0, 3, 200)
    m = metrics.classification(probs, gold)
    assert m["accuracy"] == pytest.approx(accuracy_score(gold, probs.argmax(1)))
    assert m["macro_f1"] == pytest.approx(f1_score(gold, probs.argmax(1), average="macro"))
    assert m["nll"] == pytest.approx(log_loss(gold, probs))


def test_affinity_of_few_tasks_still_pairs_them():
    data = _planted()
    three = TaskGradients(data.tasks[:3], data.G[data.task < 3], data.f[data.task < 3], data.task[data.task < 3],
                          data.train[data.task < 3])
    aff = grouping.affinity(three, subsets=20, ratio=0.3, lam=1e-3, seed=0)
    assert aff.subsets.sum(1).min() >= 2
    assert np.abs(aff.T).sum() > 0
