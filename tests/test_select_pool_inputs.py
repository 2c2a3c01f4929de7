"""select-pool's inputs (issue 15): repeated ids never push the selection past the budget, and
features of two different encoders are refused, even at equal dimension."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest

from engine.config import EmbedConfig, SelectPoolConfig
from engine.errors import SiftError
from engine.features.embed import spec_for
from engine.features.store import FeatureStore
from engine.models import builtin
from engine.select.pool.select import select_pool


def test_duplicate_ids_are_quarantined_and_the_budget_holds(tmp_path, ray_session):
    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(100)] * 2 + [None]  # every id twice (first wins), one row without an id
    pl.DataFrame({"id": ids, "embedding": rng.normal(size=(201, 8)).astype(np.float32).tolist()}).write_parquet(
        tmp_path / "pool.parquet")
    pl.DataFrame({"id": [f"t{i}" for i in range(20)],
                  "embedding": rng.normal(size=(20, 8)).astype(np.float32).tolist()}).write_parquet(tmp_path / "t.parquet")
    report = select_pool(SelectPoolConfig(pool=str(tmp_path / "pool.parquet"), target=str(tmp_path / "t.parquet"),
                                          budget=50, out=tmp_path / "out"))
    selected = pl.read_parquet(tmp_path / "out" / "selected.parquet")
    assert selected.height == 50 and selected["id"].n_unique() == 50
    assert report["counts"] == {"rows_in": 201, "quarantined": 101, "scored": 100, "selected": 50,
                                "not_selected": 50, "target_rows": 20}
    quarantine = pl.read_parquet(tmp_path / "out" / "quarantine.parquet")
    reasons = dict(zip(quarantine["id"], quarantine["reason"]))
    assert reasons["p0"] == "duplicate id (first at row 1)" and reasons["p99"] == "duplicate id (first at row 100)"
    assert reasons[None] == "missing id" and len(reasons) == 101


def _store(tmp_path, name: str, model: str, rows: int) -> str:
    """A store with the manifest `sift featurize embed --model MODEL` writes (its spec, which names
    the encoder), filled with seeded vectors so the test needs no model run."""
    examples = tmp_path / f"{name}-examples.parquet"
    pl.DataFrame({"id": [f"{name}{i}" for i in range(rows)], "text": [f"{name} text {i}" for i in range(rows)]}
                 ).write_parquet(examples)
    spec, _ = spec_for(EmbedConfig(data=str(examples), out=str(tmp_path / name), model=model))
    store = FeatureStore.prepare(tmp_path / name, spec)
    vectors = np.random.default_rng(rows).normal(size=(rows, spec.dim)).astype(np.float32)
    store.write_shard(0, pl.read_parquet(examples).select("id"), vectors,
                      pl.DataFrame(schema={"id": pl.String, "reason": pl.String}))
    return str(tmp_path / name)


def test_pool_and_target_from_different_encoders_are_refused(tmp_path, ray_session):
    other = tmp_path / "other-encoder"  # tiny-llama's architecture and size, a different model
    shutil.copytree(builtin.resolve("tiny-llama"), other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))

    renamed = tmp_path / "renamed-copy"  # the same model under another folder name
    shutil.copytree(builtin.resolve("tiny-llama"), renamed)

    pool = _store(tmp_path, "pool", "tiny-llama", 60)
    same = _store(tmp_path, "same", str(renamed), 10)
    different = _store(tmp_path, "different", str(other), 10)
    assert FeatureStore(same).spec.dim == FeatureStore(different).spec.dim  # dimension alone cannot tell

    ok = select_pool(SelectPoolConfig(pool=pool, target=same, budget=5, out=tmp_path / "ok"))
    assert ok["counts"]["selected"] == 5
    with pytest.raises(SiftError, match=r"^pool features come from encoder tiny-llama-v1-2048@\w+ but target "
                                        r"features from other-encoder@\w+; compute both with the same model$"):
        select_pool(SelectPoolConfig(pool=pool, target=different, budget=5, out=tmp_path / "refused"))
