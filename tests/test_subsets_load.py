"""`subsets.load`: a gradient store read once into the estimator's arrays, local or on S3, with
exactly the rows, order, top-up and fits of a plain in-memory reading of the same store."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from engine import storage
from engine.errors import SiftError
from engine.features.store import FeatureStore, ShardedVectors, StoreSpec
from engine.select.tasks import subsets

TASKS = ["a", "b", "c", "d"]


def _grads_store(root: str, examples: str, rows: int = 600, shard_rows: int = 64, dim: int = 12,
                 ) -> tuple[np.ndarray, np.ndarray, pl.DataFrame]:
    """A gradient store written directly (no model) and its examples file, listed in another
    order than the store. Shard 2 holds test rows only. Returns every stored vector, f, and the
    examples."""
    rng = np.random.default_rng(0)
    G = rng.standard_normal((rows, dim)).astype(np.float32)
    f = rng.standard_normal(rows).astype(np.float32)
    ids = [f"x{i}" for i in range(rows)]
    split = rng.choice(["train", "validation", "test"], rows, p=[0.6, 0.25, 0.15])
    split[2 * shard_rows:3 * shard_rows] = "test"
    task = rng.choice(TASKS, rows, p=[0.1, 0.3, 0.3, 0.3])
    spec = StoreSpec(kind="grads", fingerprint={"source": "synthetic"}, dim=dim, dtype="float32", seed=0,
                     rows=rows, shard_rows=shard_rows)
    store = FeatureStore.prepare(root, spec)
    for k in range(spec.num_shards):
        start, stop = store.shard_range(k)
        store.write_shard(k, pl.DataFrame({"id": ids[start:stop], "task": task[start:stop].tolist(),
                                           "label": ["yes"] * (stop - start), "f": f[start:stop]}),
                          G[start:stop], pl.DataFrame(schema={"id": pl.String, "reason": pl.String}))
    frame = pl.DataFrame({"id": ids, "text": "t", "task": task.tolist(), "label": "yes", "split": split.tolist()})
    storage.write_parquet(frame.sample(fraction=1.0, shuffle=True, seed=1), examples)
    return G, f, frame


def _expected(G: np.ndarray, f: np.ndarray, frame: pl.DataFrame, dtype=torch.float32) -> subsets.TaskGradients:
    """The same store read the plain way: every row in memory, test rows dropped, in store order."""
    kept = frame.with_row_index("row").filter(pl.col("split") != "test")
    rows = kept["row"].to_numpy()
    return subsets.TaskGradients(TASKS, torch.as_tensor(G[rows], dtype=dtype), torch.as_tensor(f[rows], dtype=dtype),
                                 torch.tensor([TASKS.index(t) for t in kept["task"]]),
                                 torch.tensor((kept["split"] == "train").to_numpy()), kept["id"])


def _same(a: subsets.TaskGradients, b: subsets.TaskGradients) -> None:
    assert a.tasks == b.tasks
    for x, y in ((a.G, b.G), (a.f, b.f), (a.task, b.task), (a.train, b.train)):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert a.ids.to_list() == b.ids.to_list()


def test_load_reads_each_kept_row_once_into_the_fits_arrays(tmp_path, monkeypatch):
    G, f, frame = _grads_store(str(tmp_path / "g"), str(tmp_path / "examples.parquet"))
    expected = _expected(G, f, frame)
    read: list[int] = []
    shard = FeatureStore.shard_vectors
    monkeypatch.setattr(FeatureStore, "shard_vectors", lambda self, k: read.append(k) or shard(self, k))
    monkeypatch.setattr(ShardedVectors, "__array__", lambda *a, **k: pytest.fail("the whole store was copied"))
    data = subsets.load(tmp_path / "g", tmp_path / "examples.parquet")
    _same(data, expected)
    assert sorted(read) == [k for k in range(10) if k != 2]  # the shard of test rows only is never read
    # the same fits and the same selection as on the plain arrays
    candidates = TASKS[1:]
    sets = subsets.random_subsets(3, 12, 0.5, seed=0)
    assert np.array_equal(subsets.estimate(data, ["a"], sets, candidates, lam=1e-2).loss,
                          subsets.estimate(expected, ["a"], sets, candidates, lam=1e-2).loss)
    assert subsets.forward_selection(data, ["a"], candidates, ["c", "b", "d"], lam=1e-2) == \
        subsets.forward_selection(expected, ["a"], candidates, ["c", "b", "d"], lam=1e-2)
    wide = subsets.load(tmp_path / "g", tmp_path / "examples.parquet", dtype=torch.float64)
    _same(wide, _expected(G, f, frame, torch.float64))


def test_top_up_rows_are_the_documented_averages(tmp_path):
    """Tasks under `top_up` training rows get averages of seeded random pairs of their own
    training rows, task by task in order (the rule the estimator has always used), appended
    after the store's rows with null ids."""
    G, f, frame = _grads_store(str(tmp_path / "g"), str(tmp_path / "examples.parquet"))
    plain = _expected(G, f, frame)
    topped = subsets.load(tmp_path / "g", tmp_path / "examples.parquet", top_up=150, seed=3)
    rng = np.random.default_rng(3)
    n, added = len(plain.f), 0
    for i in range(len(TASKS)):
        members = torch.nonzero((plain.task == i) & plain.train).flatten().numpy()
        missing = 150 - len(members)
        if missing <= 0:
            continue
        a, b = rng.choice(members, missing), rng.choice(members, missing)
        at = slice(n + added, n + added + missing)
        assert torch.equal(topped.G[at], (plain.G[a] + plain.G[b]) / 2)
        assert torch.equal(topped.f[at], (plain.f[a] + plain.f[b]) / 2)
        assert (topped.task[at] == i).all() and topped.train[at].all()
        added += missing
    assert added > 0 and len(topped.f) == n + added
    assert torch.equal(topped.G[:n], plain.G) and topped.ids[n:].null_count() == added
    _same(subsets._top_up(plain, 150, seed=3), topped)


def test_a_remote_store_loads_the_same_arrays(tmp_path, s3_dir):
    G, f, frame = _grads_store(storage.join(s3_dir, "g"), storage.join(s3_dir, "examples.parquet"))
    data = subsets.load(storage.join(s3_dir, "g"), storage.join(s3_dir, "examples.parquet"), top_up=150, seed=3)
    _same(data, subsets._top_up(_expected(G, f, frame), 150, seed=3))


def test_store_rows_missing_from_the_examples_are_named(tmp_path):
    _, _, frame = _grads_store(str(tmp_path / "g"), str(tmp_path / "examples.parquet"))
    frame.filter(pl.col("id") != "x7").write_parquet(tmp_path / "fewer.parquet")
    with pytest.raises(SiftError, match=r"^1 row\(s\) of the gradient store .* have ids not in .*fewer.parquet \(e.g. 'x7'\)"):
        subsets.load(tmp_path / "g", tmp_path / "fewer.parquet")


def test_read_into_gathers_rows_in_store_order_into_the_callers_array(tmp_path, s3_dir, monkeypatch):
    """One copy, straight into the caller's (possibly wider-typed, longer) array; only the
    shards holding asked-for rows are read, local or remote."""
    for root in (str(tmp_path / "g"), storage.join(s3_dir, "g")):
        G, _, _ = _grads_store(root, str(tmp_path / "examples.parquet"))
        store = FeatureStore(root)
        fetched: list[int] = []
        if store.remote:
            fetch = store._fetch_shard
            monkeypatch.setattr(store, "_fetch_shard", lambda k: fetched.append(k) or fetch(k))
        vectors = store.vectors()
        rows = np.array([0, 1, 2, 63, 64, 70, 71, 72, 500, 599])
        out = np.full((len(rows) + 3, G.shape[1]), -1.0)
        assert vectors.read_into(out, rows) is out
        assert np.array_equal(out[:len(rows)], G[rows].astype(np.float64)) and (out[len(rows):] == -1).all()
        if store.remote:
            assert fetched == [0, 1, 7, 9]
        assert np.array_equal(vectors.read_into(np.empty(G.shape, np.float32)), G)
        with pytest.raises(ValueError, match="store order"):
            vectors.read_into(out, np.array([5, 3]))
