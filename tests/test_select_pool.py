"""select-pool on a real local Ray: GOT-D's behaviour, baselines' interface, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from engine.config import SelectPoolConfig
from engine.errors import SiftError
from engine.select.pool import ot
from engine.select.pool.select import select_pool


def _write(path, vectors: np.ndarray, prefix: str, task: str | None = None):
    frame = pl.DataFrame({"id": [f"{prefix}{i}" for i in range(len(vectors))],
                          "embedding": vectors.astype(np.float32).tolist()})
    frame.write_parquet(path)
    return str(path)


def _blobs(rng, n, center, scale=0.3):
    return center + scale * rng.normal(size=(n, len(center)))


def _cfg(tmp_path, pool, target, budget, **kw) -> SelectPoolConfig:
    return SelectPoolConfig(pool=pool, target=target, budget=budget, out=tmp_path / "out", **kw)


def _sphere_blobs(rng, n: int, center: np.ndarray, spread: float = 0.6) -> np.ndarray:
    """Unit vectors scattered around `center`, like sentence embeddings of one source."""
    x = center + spread * rng.normal(size=(n, len(center))) / np.sqrt(len(center))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _l1_marginal_error(pool: np.ndarray, target: np.ndarray, solution: ot.OTSolution) -> float:
    """Both marginals' L1 violation of the plan a_i b_j exp((g_i + f_j - c_ij) / eps), in float64
    from the returned potentials: an independent check of what the solver reports."""
    g = ot.c_transform(pool, solution)
    cost = ((pool[:, None, :] - target[None, :, :]) ** 2).sum(-1)
    plan = np.exp((g[:, None] + solution.f[None, :] - cost) / solution.eps) / (len(pool) * len(target))
    return float(np.abs(plan.sum(1) - 1 / len(pool)).sum() + np.abs(plan.sum(0) - 1 / len(target)).sum())


def test_gotd_finds_the_rare_source_that_knn_misses(tmp_path, ray_session, capsys):
    """The paper's case: a pool 99% source A / 1% source B, a target half A, half B.

    The target's B half is under-supplied, so the converged OT potentials pull B's candidates to
    the top; kNN (mean over the 10 nearest targets, or the nearest one) scores A and B candidates
    alike -- both have target points near them -- and so picks B at its 1% base rate, as a random
    selection would (0.2 of 20 expected). The solve must take many iterations: POT's check stopped
    this one after 1 with an L1 marginal error of 0.91.
    """
    rng = np.random.default_rng(0)
    a, b = (c / np.linalg.norm(c) for c in rng.normal(size=(2, 16)))
    pool = np.vstack([_sphere_blobs(rng, 1980, a), _sphere_blobs(rng, 20, b)])
    target = np.vstack([_sphere_blobs(rng, 100, a), _sphere_blobs(rng, 100, b)])
    cfg = _cfg(tmp_path, _write(tmp_path / "pool.parquet", pool, "p"), _write(tmp_path / "t.parquet", target, "t"), 20)
    report = select_pool(cfg)
    from_b = lambda out: sum(int(i[1:]) >= 1980 for i in pl.read_parquet(out / "selected.parquet")["id"])  # noqa: E731
    assert from_b(tmp_path / "out") >= 18
    details = report["details"]
    assert details["converged"] and details["iterations"] > 1 and details["marginal_error"] <= 1e-3
    assert report["warnings"] == [] and "sift: warning" not in capsys.readouterr().err
    solution = ot.sinkhorn_potentials(pool, target, cfg.eps, cfg.threshold, cfg.max_iter)
    assert solution.iterations == details["iterations"]
    assert _l1_marginal_error(pool, target, solution) < 2e-3
    # at POT's old default threshold (0.1, on its L2 norm) the solve stopped after 1 iteration, L1 error 0.91
    loose = ot.sinkhorn_potentials(pool, target, cfg.eps, 0.1, cfg.max_iter)
    assert loose.iterations > 1 and _l1_marginal_error(pool, target, loose) <= 0.1
    assert abs(_l1_marginal_error(pool, target, loose) - loose.marginal_error) < 1e-3
    for k in (10, 1):  # kNN by mean and by max similarity
        select_pool(cfg.model_copy(update={"method": "knn", "knn_k": k, "out": str(tmp_path / f"knn{k}")}))
        assert from_b(tmp_path / f"knn{k}") <= 2, k


def test_sample_and_c_transform_agree_with_the_full_solve(tmp_path, ray_session):
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(6, 16)) * 2
    pool = np.vstack([_blobs(rng, n, c, 0.6) for n, c in zip([2500, 1200, 600, 300, 250, 150], centers)])
    target = np.vstack([_blobs(rng, 150, c, 0.6) for c in centers[3:]])
    p, t = _write(tmp_path / "pool.parquet", pool, "p"), _write(tmp_path / "t.parquet", target, "t")
    full = select_pool(_cfg(tmp_path, p, t, 500, eps=0.5))
    full_scores = pl.read_parquet(tmp_path / "out" / "scores.parquet")
    sampled = select_pool(_cfg(tmp_path, p, t, 500, eps=0.5, full_max=1000, support_size=1000).model_copy(
        update={"out": str(tmp_path / "sampled")}))
    assert (full["details"]["support"], sampled["details"]["support"]) == ("full", "sample")
    sampled_scores = pl.read_parquet(tmp_path / "sampled" / "scores.parquet")
    top = lambda f: set(f.filter(pl.col("selected"))["id"])  # noqa: E731
    assert len(top(full_scores) & top(sampled_scores)) / 500 > 0.85
    joined = full_scores.join(sampled_scores, on="id")
    assert joined.select(pl.corr("score", "score_right", method="spearman")).item() > 0.9


def test_outputs_cover_every_row_and_nan_rows_are_quarantined(tmp_path, ray_session):
    rng = np.random.default_rng(2)
    pool = rng.normal(size=(300, 8))
    pool[[5, 77]] = np.nan
    cfg = _cfg(tmp_path, _write(tmp_path / "pool.parquet", pool, "p"),
               _write(tmp_path / "t.parquet", rng.normal(size=(30, 8)), "t"), 0.1)
    report = select_pool(cfg)
    counts = report["counts"]
    assert counts == {"rows_in": 300, "quarantined": 2, "scored": 298, "selected": 30, "not_selected": 268,
                      "target_rows": 30}
    quarantine = pl.read_parquet(tmp_path / "out" / "quarantine.parquet")
    assert dict(zip(quarantine["id"], quarantine["reason"])) == {"p5": "non-finite embedding", "p77": "non-finite embedding"}
    scores = pl.read_parquet(tmp_path / "out" / "scores.parquet")
    assert scores["rank"].to_list() == list(range(1, 299))
    assert scores["selected"].sum() == 30 and scores["score"].is_sorted(descending=True)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["method"] == "gotd"
    assert (tmp_path / "out" / "report.png").stat().st_size > 10_000


def test_target_identical_to_part_of_the_pool_works(tmp_path, ray_session):
    rng = np.random.default_rng(3)
    pool = rng.normal(size=(400, 8))
    select_pool(_cfg(tmp_path, _write(tmp_path / "pool.parquet", pool, "p"),
                     _write(tmp_path / "t.parquet", pool[:40], "t"), 40))
    chosen = pl.read_parquet(tmp_path / "out" / "selected.parquet")["id"].to_list()
    assert sum(int(i[1:]) < 40 for i in chosen) >= 30


def test_too_small_epsilon_is_reported_not_silent(tmp_path, ray_session, capsys):
    rng = np.random.default_rng(4)
    cfg = _cfg(tmp_path, _write(tmp_path / "pool.parquet", rng.normal(size=(200, 8)) * 5, "p"),
               _write(tmp_path / "t.parquet", rng.normal(size=(20, 8)) * 5, "t"), 10,
               eps=1e-3, max_iter=20, threshold=1e-6)
    report = select_pool(cfg)
    details = report["details"]
    assert details["converged"] is False and details["iterations"] == 20 and details["marginal_error"] > 1e-6
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sift: warning:")]
    assert warning == [f"sift: warning: {report['warnings'][0]}"]
    assert "Sinkhorn did not converge: L1 marginal error" in warning[0] and "after 20 iterations" in warning[0]


def test_contrast_selects_away_from_the_target(tmp_path, ray_session):
    rng = np.random.default_rng(5)
    pool = np.vstack([_blobs(rng, 200, np.zeros(4)), _blobs(rng, 200, np.full(4, 3.0))])
    cfg = _cfg(tmp_path, _write(tmp_path / "pool.parquet", pool, "p"),
               _write(tmp_path / "t.parquet", _blobs(rng, 50, np.zeros(4)), "t"), 100, variant="contrast")
    select_pool(cfg)
    chosen = pl.read_parquet(tmp_path / "out" / "selected.parquet")["id"].to_list()
    assert sum(int(i[1:]) >= 200 for i in chosen) >= 95


@pytest.mark.parametrize("budget, message", [
    (500, r"--budget 500 is larger than the pool \(300 candidates after quarantine\)"),
    (12.5, r"--budget 12.5 must be a whole number of rows"),
])
def test_bad_budgets(tmp_path, ray_session, budget, message):
    rng = np.random.default_rng(6)
    cfg = _cfg(tmp_path, _write(tmp_path / "pool.parquet", rng.normal(size=(300, 4)), "p"),
               _write(tmp_path / "t.parquet", rng.normal(size=(10, 4)), "t"), budget)
    with pytest.raises(SiftError, match=message):
        select_pool(cfg)


def test_dimension_mismatch_empty_target_and_wrong_store_kind(tmp_path, ray_session):
    rng = np.random.default_rng(7)
    pool = _write(tmp_path / "pool.parquet", rng.normal(size=(100, 8)), "p")
    with pytest.raises(SiftError, match="pool features are 8-d but target features are 4-d"):
        select_pool(_cfg(tmp_path, pool, _write(tmp_path / "t4.parquet", rng.normal(size=(10, 4)), "t"), 5))
    all_nan = np.full((3, 8), np.nan)
    with pytest.raises(SiftError, match="the target is empty"):
        select_pool(_cfg(tmp_path, pool, _write(tmp_path / "tnan.parquet", all_nan, "t"), 5))
    with pytest.raises(SiftError, match="method 'dsir' needs texts, but .* holds precomputed embeddings"):
        select_pool(_cfg(tmp_path, pool, pool, 5, method="dsir"))
    with pytest.raises(SiftError, match="method 'grad-cosine' needs gradient stores"):
        select_pool(_cfg(tmp_path, pool, pool, 5, method="grad-cosine"))
    with pytest.raises(SiftError, match="config error .*key 'budget': Input should be greater than 0"):
        from engine.config import load_config
        load_config(SelectPoolConfig, None, {"budget": 0})


def test_text_pools_with_every_method(tmp_path, ray_session, tweets_ingest):
    """Texts in, each method out, same files; DSIR and kNN lean to the target's corpus."""
    from engine.data import corpora

    wordnet = corpora.load("wordnet").sample(300, seed=0)
    pool = tmp_path / "pool.parquet"
    pl.concat([pl.read_parquet(tweets_ingest / "examples.parquet").head(300), wordnet]).write_parquet(pool)
    target = tmp_path / "target.parquet"
    corpora.load("wordnet").sample(50, seed=9).write_parquet(target)
    # One output folder for every method: the first run ingests and embeds both sides (OUT/pool,
    # OUT/target), the next ones find those done (the same encoder) and only select; rerunning
    # them is test_select_pool_inputs'. Each run's own files are removed first, so every method
    # must write them again.
    out = tmp_path / "out"
    for method in ("gotd", "knn", "dsir", "random"):
        for name in ("selected.parquet", "report.json"):
            (out / name).unlink(missing_ok=True)
        report = select_pool(SelectPoolConfig(pool=str(pool), target=str(target), budget=100, method=method, out=out))
        assert report["counts"]["selected"] == 100 and report["method"] == method
        selected = pl.read_parquet(out / "selected.parquet")
        assert {"id", "text", "task", "rank", "score"} <= set(selected.columns)
        if method != "random":
            assert report["selected_by_task"].get("wordnet", 0) >= 80, (method, report["selected_by_task"])


def test_c_transform_matches_sinkhorn_potential_on_the_support():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(120, 5)), rng.normal(size=(80, 5))
    solution = ot.sinkhorn_potentials(x, y, eps=0.5, threshold=1e-9, max_iter=5000)
    g = ot.c_transform(x, solution)
    import ot as pot
    _, log = pot.sinkhorn(np.full(120, 1 / 120), np.full(80, 1 / 80), pot.dist(x, y), 0.5,
                          method="sinkhorn_log", stopThr=1e-9, numItermax=5000, log=True)
    reference = 0.5 * log["log_u"]
    assert np.allclose(g - g.mean(), reference - reference.mean(), atol=1e-3)
    grad = ot.calibrated_gradient(g)
    assert np.array_equal(np.argsort(grad), np.argsort(g))  # monotone: same ranking


def _domain_reference(store, target: np.ndarray, cfg: SelectPoolConfig) -> tuple[np.ndarray, dict]:
    """The domain test over the whole task column and every vector at once: what select-pool
    computed before it read the store shard by shard."""
    tasks = store.rows()["task"].fill_null("(none)").to_numpy()
    vectors = np.asarray(store.vectors())
    rng = np.random.default_rng(cfg.seed)
    target_sample = target[rng.choice(len(target), size=min(len(target), cfg.domain_sample), replace=False)]
    costs = {}
    for name in sorted(set(tasks)):
        members = np.flatnonzero(tasks == name)
        picked = np.sort(rng.choice(members, size=min(len(members), cfg.domain_sample), replace=False))
        costs[name] = ot.ot_cost(vectors[picked], target_sample, cfg.eps, cfg.threshold, cfg.max_iter).cost
    kept = sorted(costs, key=costs.get)[: cfg.domain_keep]
    return np.flatnonzero(np.isin(tasks, kept)), costs


def test_domain_test_keeps_the_closest_sources(tmp_path, ray_session, monkeypatch):
    """The domain test reads the store's task column shard by shard (issue 13): over ten shards
    with the sources interleaved, it draws the same samples, finds the same OT costs and keeps the
    same rows as over the whole column at once, and the far source is never selected."""
    from engine.select.pool import gotd, inputs
    from engine.select.pool.inputs import _store_from_parquet

    monkeypatch.setattr(inputs, "PRECOMPUTED_SHARD_ROWS", 64)
    rng = np.random.default_rng(10)
    centers = {"near": np.zeros(6), "mid": np.full(6, 1.0), "far": np.full(6, 3.0)}
    frames = [pl.DataFrame({"id": [f"{name}{i}" for i in range(200)], "task": [name] * 200,
                            "embedding": _blobs(rng, 200, c).astype(np.float32).tolist()})
              for name, c in centers.items()]
    pool = pl.concat(frames).sample(fraction=1.0, shuffle=True, seed=1)  # sources interleaved across shards
    pool.write_parquet(tmp_path / "pool.parquet")
    # precomputed parquet keeps only id + embedding; give the store its sources through its rows files
    store = _store_from_parquet(str(tmp_path / "pool.parquet"), [str(tmp_path / "pool.parquet")],
                                str(tmp_path / "store"))
    task_of = dict(zip(pool["id"], pool["task"]))
    for k in range(store.spec.num_shards):
        path = Path(store.root) / "shards" / f"{k:05d}.parquet"
        rows = pl.read_parquet(path)
        rows.with_columns(task=pl.Series([task_of[i] for i in rows["id"]])).write_parquet(path)
    assert store.spec.num_shards == 10
    target_vectors = _blobs(rng, 50, np.full(6, 0.3))
    target = _write(tmp_path / "t.parquet", target_vectors, "t")
    cfg = _cfg(tmp_path, str(store.root), target, 50, domain_keep=2, domain_sample=100)
    report = select_pool(cfg)
    assert report["details"]["domains"]["kept"] == ["near", "mid"]
    scores = pl.read_parquet(tmp_path / "out" / "scores.parquet")
    assert scores.filter(pl.col("task") == "far")["selected"].sum() == 0
    assert report["counts"]["scored"] == 600

    eligible, domains = gotd.domain_test(store, target_vectors.astype(np.float32), cfg)
    expected_rows, expected_costs = _domain_reference(store, target_vectors.astype(np.float32), cfg)
    assert np.array_equal(eligible, expected_rows) and domains["ot_cost"] == expected_costs
    assert domains["ot_cost"] == report["details"]["domains"]["ot_cost"]


def test_dsir_streamed_batch_by_batch_scores_as_over_the_whole_pool(tmp_path, ray_session, monkeypatch):
    """DSIR reads the texts a parquet batch at a time, the pool twice (issue 13): with batches far
    smaller than the pool, every score equals the formula over all texts at once (what it computed
    before it streamed), so the selection is the same; and it still leans to the target's corpus."""
    from sklearn.feature_extraction.text import HashingVectorizer

    from engine.data import corpora
    from engine.select.pool import inputs

    monkeypatch.setattr(inputs, "ROW_BATCH", 64)
    pl.concat([corpora.load("tweets").sample(300, seed=0), corpora.load("wordnet").sample(300, seed=0)]).write_parquet(
        tmp_path / "pool.parquet")
    corpora.load("wordnet").sample(50, seed=9).write_parquet(tmp_path / "target.parquet")
    cfg = _cfg(tmp_path, str(tmp_path / "pool.parquet"), str(tmp_path / "target.parquet"), 60, method="dsir")
    report = select_pool(cfg)

    examples = pl.read_parquet(tmp_path / "out" / "pool" / "ingest" / "examples.parquet")
    target = pl.read_parquet(tmp_path / "out" / "target" / "ingest" / "examples.parquet")
    assert examples.height > 8 * 64
    vectorizer = HashingVectorizer(n_features=cfg.dsir_buckets, ngram_range=(1, 2), alternate_sign=False, norm=None,
                                   lowercase=True)
    pool_counts, target_counts = (vectorizer.transform(f["text"].to_list()) for f in (examples, target))

    def log_p(counts) -> np.ndarray:
        smoothed = np.asarray(counts.sum(axis=0)).ravel() + 1.0
        return np.log(smoothed / smoothed.sum())

    gumbel = -np.log(-np.log(np.random.default_rng(cfg.seed).uniform(1e-12, 1.0, examples.height)))
    expected = np.asarray(pool_counts @ (log_p(target_counts) - log_p(pool_counts))).ravel() + gumbel
    scores = examples.select("id").join(pl.read_parquet(tmp_path / "out" / "scores.parquet"), on="id",
                                        maintain_order="left")
    assert np.allclose(scores["score"].to_numpy(), expected, rtol=0, atol=1e-9)
    assert set(scores.filter(pl.col("selected"))["id"]) == set(examples["id"].gather(np.argsort(-expected)[:60]))
    assert report["selected_by_task"].get("wordnet", 0) >= 50, report["selected_by_task"]
