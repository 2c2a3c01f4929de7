"""Task grouping: affinity, SDP/spectral clustering, the choice of m, local search, and the
mixture weights and metrics of the ensemble; select-tasks for a target without training rows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from engine.ensemble import metrics, weights
from engine.ensemble import grouping
from engine.select.tasks.subsets import TaskGradients, load
from tests.test_ensemble_train import suite_grads  # noqa: F401  (suite of 3 tasks + its tiny-llama store)


def _planted(families: tuple[int, ...] = (0, 0, 0, 1, 1, 1), seed: int = 0, per: int = 60, d: int = 16,
             signal: float = 2.0, noise: float = 0.6) -> TaskGradients:
    """Tasks in planted families (task t in family families[t]): the gradients of a family share
    one direction, orthogonal to the other families', so training on a family member helps the
    others and nothing else. A weak signal in the noise leaves each task too few rows to fit alone."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.normal(size=(d, max(families) + 1)))[0].T
    G, task, train = [], [], []
    for t, fam in enumerate(families):
        G.append(directions[fam] * signal + rng.normal(scale=noise, size=(per, d)))
        task += [t] * per
        train += [True] * (per * 3 // 4) + [False] * (per - per * 3 // 4)
    G = torch.tensor(np.concatenate(G))
    return TaskGradients([f"task-{t}" for t in range(len(families))], G, torch.full((len(G),), -0.5, dtype=G.dtype),
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
    assert within > 0 > across  # family members gain from each other's rows; other tasks' rows cost
    planted = [0, 0, 0, 1, 1, 1]
    assert _same_partition(grouping.sdp(T, 2, 0), planted)
    assert _same_partition(grouping.spectral(T, 2, 0), planted)


def _choose_m(data: TaskGradients, max_groups: int, method: str = "sdp") -> grouping.GroupCountChoice:
    aff = grouping.affinity(data, subsets=80, ratio=0.3, lam=1e-3, seed=0)
    return grouping.choose_m(grouping.GroupScorer(data, lam=1e-3), aff.T, max_groups, method, seed=0, rounds=10)


def test_choose_m_finds_three_planted_families():
    """Three families of three tasks (each helps its family, costs the others): merging two
    families raises the estimated validation loss beyond its noise, splitting one lowers it not
    at all, so three groups, the planted ones."""
    families = (0, 0, 0, 1, 1, 1, 2, 2, 2)
    data = _planted(families)
    T = grouping.affinity(data, subsets=80, ratio=0.3, lam=1e-3, seed=0).T
    same = np.equal.outer(families, families)
    assert T[same & ~np.eye(9, dtype=bool)].mean() > 0 > T[~same].max()
    choice = _choose_m(data, max_groups=5)
    by_m = {c.m: c for c in choice.counts}
    assert choice.m == 3 and set(by_m) == {1, 2, 3, 4, 5} and choice.rule == grouping.ONE_STANDARD_ERROR
    assert _same_partition(by_m[3].labels, families) and by_m[3].excess == 0
    for m in (1, 2):
        assert by_m[m].excess > by_m[m].standard_error > 0
    for m in (4, 5):
        assert by_m[m].excess >= 0


@pytest.mark.parametrize("seed", [0, 1])
def test_choose_m_keeps_tasks_that_all_help_each_other_in_one_group(seed):
    """Six tasks of one family, each with too few rows to fit alone: one adapter on all of them
    lowers every task's estimated validation loss below its own adapter's, so one group."""
    data = _planted((0,) * 6, seed=seed, signal=0.5, noise=1.0)
    scorer = grouping.GroupScorer(data, lam=1e-3)
    assert np.all(scorer.per_task(np.zeros(6, dtype=int))[0] < scorer.per_task(np.arange(6))[0])
    choice = _choose_m(data, max_groups=6)
    by_m = {c.m: c for c in choice.counts}
    assert choice.m == 1 and by_m[6].excess > by_m[6].standard_error


class _Scored(grouping.GroupScorer):
    """Validation-row losses set by the number of groups (no fits): two and four groups clearly
    worse than one; three groups `gap` lower than one on average, with per-row noise."""

    def __init__(self, data: TaskGradients, gap: float):
        super().__init__(data, lam=1e-3)
        task = data.task[~data.train].numpy()
        rng = np.random.default_rng(0)
        base, noise = rng.normal(size=len(task)), rng.normal(scale=0.3, size=len(task))
        noise -= np.array([noise[task == i].mean() for i in range(len(data.tasks))])[task]  # mean 0 per task
        self.losses = {1: 1 + base, 2: 2 + base, 3: 1 - gap + base + noise, 4: 2 + base}

    def rows(self, labels):
        loss = self.losses[len(np.unique(labels))]
        return loss, np.ones_like(loss)


def test_choose_m_takes_the_fewest_groups_within_one_standard_error():
    """The rule itself: three groups have the lowest objective, but one group is taken while its
    excess is within one standard error (the validation rows cannot tell them apart), three once
    it is not."""
    data = _planted((0,) * 6)
    T = grouping.affinity(data, subsets=20, ratio=0.3, lam=1e-3, seed=0).T
    one, three = np.zeros(6, dtype=int), np.array([0, 0, 1, 1, 2, 2])
    error = _Scored(data, 0.0).standard_error(one, three)
    assert error > 0
    for gap, expected in ((0.5 * error, 1), (2 * error, 3)):
        choice = grouping.choose_m(_Scored(data, gap), T, 4, "sdp", seed=0, rounds=0)
        by_m = {c.m: c for c in choice.counts}
        assert by_m[3].excess == 0 and by_m[1].excess == pytest.approx(gap)
        assert by_m[1].standard_error == pytest.approx(error)
        assert choice.m == expected


def test_standard_error_matches_a_bootstrap_over_validation_rows():
    data = _planted((0, 0, 0, 1, 1, 1))
    scorer = grouping.GroupScorer(data, lam=1e-3)
    a, b = np.array([0, 0, 0, 1, 1, 1]), np.array([0, 1, 0, 1, 0, 1])
    difference = scorer.rows(a)[0] - scorer.rows(b)[0]
    task = data.task[~data.train].numpy()
    rng = np.random.default_rng(0)
    within = [np.flatnonzero(task == i) for i in range(6)]
    replicates = [np.mean([difference[rng.choice(rows, len(rows))].mean() for rows in within]) for _ in range(4000)]
    assert scorer.standard_error(a, b) == pytest.approx(np.std(replicates), rel=0.1)
    assert np.mean(difference) != 0


def test_local_search_improves_a_bad_partition_and_caches_fits():
    scorer = grouping.GroupScorer(_planted(), lam=1e-3)
    mixed = np.array([0, 1, 0, 1, 0, 1])
    labels, trace = scorer.local_search(mixed, rounds=10)
    assert trace[-1] < trace[0] and all(b <= a for a, b in zip(trace, trace[1:]))
    assert _same_partition(labels, [0, 0, 0, 1, 1, 1])
    fits = scorer.fits
    scorer.objective(labels)  # already seen: no new fit
    assert scorer.fits == fits


def _loud(seed: int = 0, per: int = 40, d: int = 16) -> TaskGradients:
    """The demo's case, planted, in the first-order regime (updates too small to saturate the
    loss): a loud task whose own rows lower its loss far more than anything else, a partner that
    helps it less, and three quiet tasks (two of them pulling opposite ways) whose losses barely
    move. Only a task's own rows (the affinity's diagonal) and the scale of each task's loss decide
    the estimator's best partition; a per-task z-scored affinity sees neither."""
    rng = np.random.default_rng(seed)
    u, v, x, y = np.linalg.qr(rng.normal(size=(d, 4)))[0].T
    directions = [3.0 * u, 0.6 * u + 0.8 * v, 0.3 * x, -0.3 * x, 0.3 * y]
    G, task, train = [], [], []
    for t, direction in enumerate(directions):
        G.append(0.03 * (direction + rng.normal(scale=0.3 * np.linalg.norm(direction), size=(per, d))))
        task += [t] * per
        train += [True] * (per * 3 // 4) + [False] * (per - per * 3 // 4)
    G = torch.tensor(np.concatenate(G))
    return TaskGradients(["loud", "partner", "quiet-a", "quiet-b", "quiet-c"], G,
                         torch.full((len(G),), -4.5, dtype=G.dtype), torch.tensor(task), torch.tensor(train))


@pytest.mark.parametrize("seed", [0, 1])
def test_affinity_agrees_with_the_objective(seed):
    """Defect 8: the within-group affinity and the estimator's objective must rank partitions
    alike, so that the SDP start is already where the local search ends."""
    from scipy.stats import spearmanr

    data = _loud(seed)
    aff = grouping.affinity(data, subsets=60, ratio=0.3, lam=1e-3, seed=0)
    scorer = grouping.GroupScorer(data, lam=1e-3)
    partitions = [np.array((0, *bits)) for bits in itertools.product([0, 1], repeat=4) if any(bits)]
    objective = np.array([scorer.objective(p) for p in partitions])
    within = np.array([grouping.density(aff.T, p) for p in partitions])
    best = partitions[int(np.argmin(objective))]
    assert _same_partition(best, [0, 1, 1, 1, 1])  # the loud task alone
    assert _same_partition(partitions[int(np.argmax(within))], best)
    assert spearmanr(-objective, within)[0] > 0.7
    labels, trace = scorer.local_search(grouping.sdp(aff.T, 2, 0), rounds=5)
    assert len(trace) == 1 and _same_partition(labels, best)


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


def test_choose_m_uses_the_configured_clustering(monkeypatch):
    """Every m starts from the configured method's partition (the SDP setting must not get
    spectral's, nor the reverse)."""
    calls = []
    for method in ("sdp", "spectral"):
        real = grouping.CLUSTERINGS[method]
        monkeypatch.setitem(grouping.CLUSTERINGS, method,
                            lambda T, m, seed, method=method, real=real: calls.append((method, m)) or real(T, m, seed))
    _choose_m(_planted(), max_groups=3, method="spectral")
    assert calls == [("spectral", 1), ("spectral", 2), ("spectral", 3)]


def test_select_tasks_for_a_target_with_validation_rows_only(suite_grads, tmp_path, capsys):  # noqa: F811
    """The common case: a small labelled sample of the target, no training rows. The candidates
    are ranked and selected, "target only" is reported as not applicable, and forward selection
    starts from the anchor itself (its estimate there is exact: f*, no update)."""
    import json

    import polars as pl

    from engine.config import SelectTasksConfig
    from engine.select.tasks import subsets
    from engine.select.tasks.select import select_tasks, show

    target = "wordnet-animal-plant"
    data = tmp_path / "examples.parquet"
    pl.read_parquet(suite_grads / "suite" / "examples.parquet").with_columns(
        split=pl.when((pl.col("task") == target) & (pl.col("split") == "train")).then(pl.lit("validation"))
        .otherwise("split")).write_parquet(data)
    cfg = SelectTasksConfig(data=data, grads=suite_grads / "grads", target=[target], subsets=20)
    select_tasks(cfg.model_copy(update={"out": tmp_path / "random", "eval": "forward"}))
    report = json.loads((tmp_path / "random" / "report.json").read_text())
    capsys.readouterr()
    show(report, tmp_path / "random" / "tasks.parquet")
    shown = capsys.readouterr().out
    only = report["estimates"]["target only"]
    assert only["loss"] is None and "no training rows" in only["not_applicable"]
    for name in ("selected", "all tasks"):
        assert np.isfinite(report["estimates"][name]["loss"]) and np.isfinite(report["estimates"][name]["forward_loss"])
        assert report["estimates"][name]["not_applicable"] is None
    scored = pl.read_parquet(tmp_path / "random" / "tasks.parquet")
    assert sorted(scored["task"]) == ["fortunes-law-politics", "wordnet-person-location"]
    assert scored["ensemble_score"].is_finite().all()
    assert "target only" in shown and "n/a" in shown and "no training rows" in shown

    trace = select_tasks(cfg.model_copy(update={"out": tmp_path / "forward", "search": "forward"}))["forward_trace"]
    store = subsets.load(suite_grads / "grads", data)
    at_anchor = store.f[store.rows(target, train=False)]
    assert trace[0] == pytest.approx(float(torch.nn.functional.softplus(-at_anchor).mean()), rel=1e-5)
    assert len(trace) == 3 and trace == sorted(trace, reverse=True)


def test_group_reports_both_measures_for_every_start(suite_grads, tmp_path, capsys):  # noqa: F811
    """groups.json and the summary give, for the chosen partition and for every start before and
    after its search, the within-group affinity and the estimator's objective."""
    import json

    import polars as pl

    from engine.config import GroupConfig
    from engine.ensemble.group import group_tasks, show

    report = group_tasks(GroupConfig(data=suite_grads / "suite", grads=suite_grads / "grads", out=tmp_path, groups=2,
                                     subsets=10, restarts=1, rounds=3))
    assert report["m"] == 2 and report["m_choice"] is None  # the user's m, not chosen
    assert json.loads((tmp_path / "groups.json").read_text()) == json.loads(json.dumps(report))
    frame = pl.read_parquet(tmp_path / "affinity.parquet")
    T = frame.drop("task").to_numpy()
    scorer = grouping.GroupScorer(load(suite_grads / "grads", suite_grads / "suite"), lam=1e-3)
    assert {c["start"] for c in report["candidates"]} == {"sdp", "spectral", "random-0"}
    for c in report["candidates"]:
        assert c["affinity"] == pytest.approx(grouping.density(T, np.array(c["labels"])))
        assert c["objective"] == pytest.approx(scorer.objective(np.array(c["labels"])))
        assert c["objective"] <= c["start_objective"] + 1e-12
    chosen = next(c for c in report["candidates"] if c["start"] == report["chosen"])
    assert (report["affinity"], report["objective"]) == (chosen["affinity"], chosen["objective"])
    capsys.readouterr()
    show(report)
    shown = " ".join(capsys.readouterr().out.split())  # rich wraps long titles at the console's width
    assert f"within-group affinity {report['affinity']:+.4f}, objective {report['objective']:.4f}" in shown
    assert f"{chosen['start_affinity']:+.4f} -> {chosen['affinity']:+.4f}" in shown
    # the fixture's store is of the answer tokens (objective=answer); sift train fits the label-set loss
    assert len(report["warnings"]) == 1 and "--set objective=labels" in report["warnings"][0]
    assert "warning: the gradient store's f is the answer tokens' log-odds" in shown


def test_affinity_needs_training_and_validation_rows():
    from engine.errors import SiftError

    data = _planted()
    no_train = TaskGradients(data.tasks, data.G, data.f, data.task, data.train & (data.task != 2))
    with pytest.raises(SiftError, match=r"task\(s\) \['task-2'\] have no training rows"):
        grouping.affinity(no_train, subsets=10, ratio=0.5, lam=1e-3, seed=0)
    no_validation = TaskGradients(data.tasks, data.G, data.f, data.task, data.train | (data.task == 4))
    with pytest.raises(SiftError, match=r"task\(s\) \['task-4'\] have no validation rows"):
        grouping.affinity(no_validation, subsets=10, ratio=0.5, lam=1e-3, seed=0)
