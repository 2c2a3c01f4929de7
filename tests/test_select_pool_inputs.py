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


def test_pool_passes_shard_by_shard_give_the_same_outputs(tmp_path, ray_session, monkeypatch):
    """select-pool reads the pool a batch at a time and writes scores.parquet from sorted runs
    merged by rank ranges, so the driver never holds the pool's rows whole (issue 13); precomputed
    ids are checked for repeats one hash bucket at a time. With runs, merge steps, parquet batches,
    id buckets and store shards far smaller than the pool every output is the same as with one of
    each, and precomputed vectors never become Python lists."""
    from engine.data import ingest
    from engine.select.pool import inputs, select

    rng = np.random.default_rng(11)
    (tmp_path / "pool").mkdir()
    for part in range(2):  # a folder of two parquet files, ids repeated across them
        vectors = rng.normal(size=(1500, 8)).astype(np.float32)
        vectors[[3, 700]] = np.nan
        ids = [f"p{i}" for i in range(part * 1400, part * 1400 + 1500)]
        pl.DataFrame({"id": ids, "embedding": vectors.tolist()}).write_parquet(tmp_path / "pool" / f"{part}.parquet")
    pl.DataFrame({"id": [f"t{i}" for i in range(40)],
                  "embedding": (rng.normal(size=(40, 8)) + 0.5).astype(np.float32).tolist()}).write_parquet(
        tmp_path / "t.parquet")
    cfg = SelectPoolConfig(pool=str(tmp_path / "pool"), target=str(tmp_path / "t.parquet"), budget=0.1,
                           full_max=1000, support_size=800, out=tmp_path / "whole")
    whole = select_pool(cfg)

    monkeypatch.setattr(select, "RUN_ROWS", 300)
    monkeypatch.setattr(select, "RUN_GROUP_ROWS", 64)
    monkeypatch.setattr(select, "MERGE_ROWS", 500)
    monkeypatch.setattr(inputs, "ROW_BATCH", 256)
    monkeypatch.setattr(inputs, "PRECOMPUTED_SHARD_ROWS", 700)
    monkeypatch.setattr(ingest, "BUCKET_ROWS", 500)  # 2,897 good rows: 6 buckets of ids
    to_list = pl.Series.to_list

    def no_vector_lists(series, *args, **kwargs):
        assert not isinstance(series.dtype, (pl.List, pl.Array)), "vectors turned into Python lists"
        return to_list(series, *args, **kwargs)

    monkeypatch.setattr(pl.Series, "to_list", no_vector_lists)
    parts = select_pool(cfg.model_copy(update={"out": str(tmp_path / "parts")}))

    assert FeatureStore(tmp_path / "parts" / "pool" / "embeddings").spec.num_shards == 5
    assert whole["counts"] == parts["counts"] == {"rows_in": 3000, "quarantined": 103, "scored": 2897,
                                                  "selected": 290, "not_selected": 2607, "target_rows": 40}
    assert {k: v for k, v in whole["details"].items() if not k.endswith("_s")} == \
        {k: v for k, v in parts["details"].items() if not k.endswith("_s")}
    for name in ("scores.parquet", "selected.parquet", "quarantine.parquet"):
        expected, got = (pl.read_parquet(tmp_path / out / name) for out in ("whole", "parts"))
        assert got.columns == expected.columns and got.equals(expected), name
    scores = pl.read_parquet(tmp_path / "parts" / "scores.parquet")
    assert scores["rank"].to_list() == list(range(1, 2898)) and scores["score"].is_sorted(descending=True)


def test_a_text_pool_on_s3_reruns_skipping_its_ingest_and_embed(tmp_path, s3_dir, ray_session):
    """Texts on S3 in, every output on S3 (issue 12): select-pool ingests and embeds each side
    through the executor, with done markers under OUT/pool and OUT/target on S3. A rerun after a
    changed budget skips those stages (their markers untouched) and scores the same; a changed
    pool file redoes the pool's stages (replacing its stale store) and only those; a pool file
    rewritten with the same rows reruns its ingest but embeds nothing again. The stores and
    ingest folders it left on S3 are inputs in their own right."""
    from engine import executor, storage
    from engine.data import corpora
    from engine.stages import STAGES

    stage = STAGES["select-pool"]
    texts = pl.concat([corpora.load("tweets").sample(80, seed=0), corpora.load("wordnet").sample(80, seed=1)])
    texts.write_parquet(tmp_path / "pool.parquet")
    corpora.load("wordnet").sample(20, seed=9).write_parquet(tmp_path / "target.parquet")
    storage.upload(tmp_path / "pool.parquet", f"{s3_dir}/pool/texts.parquet")
    storage.upload(tmp_path / "target.parquet", f"{s3_dir}/target.parquet")
    out = f"{s3_dir}/out"
    cfg = SelectPoolConfig(pool=f"{s3_dir}/pool", target=f"{s3_dir}/target.parquet", budget=20, encoder="tiny-llama",
                           out=out)
    derived = [f"{out}/{role}/{name}" for role in ("pool", "target") for name in ("ingest", "embeddings")]

    def markers() -> dict[str, str]:
        return {uri: storage.stamp(f"{uri}/{executor.MARKER}") for uri in derived}

    def report() -> dict:
        return storage.read_json(f"{out}/report.json")

    def ranked() -> pl.DataFrame:
        return storage.read_parquet(f"{out}/scores.parquet", columns=["id", "score", "rank"])

    assert executor.run(stage, cfg).status == "ran"
    ran = {"ingest": "ran", "embed": "ran"}
    skipped = {"ingest": "skipped (done)", "embed": "skipped (done)"}
    assert report()["derived"] == {"pool": ran, "target": ran}
    assert [executor.read_marker(uri).stage for uri in derived] == ["ingest", "embed"] * 2
    first, first_scores = markers(), ranked()
    selected = storage.read_parquet(f"{out}/selected.parquet")
    assert selected.height == 20 and {"id", "text", "task", "rank", "score"} <= set(selected.columns)
    assert executor.run(stage, cfg).status == "skipped (done)"

    assert executor.run(stage, cfg.model_copy(update={"budget": 10})).status == "ran"
    assert report()["derived"] == {"pool": skipped, "target": skipped}
    assert markers() == first and ranked().equals(first_scores)

    texts.write_parquet(tmp_path / "pool.parquet", compression="uncompressed")  # the same rows, other bytes
    storage.upload(tmp_path / "pool.parquet", f"{s3_dir}/pool/texts.parquet")
    assert executor.run(stage, cfg.model_copy(update={"budget": 10})).status == "ran"
    assert report()["derived"] == {"pool": ran, "target": skipped}
    assert executor.read_marker(f"{out}/pool/embeddings").result["rows_now"] == 0  # its store resumed, complete
    assert ranked().equals(first_scores)

    texts.head(120).write_parquet(tmp_path / "pool.parquet")
    storage.upload(tmp_path / "pool.parquet", f"{s3_dir}/pool/texts.parquet")
    assert executor.run(stage, cfg.model_copy(update={"budget": 10})).status == "ran"
    assert report()["derived"] == {"pool": ran, "target": skipped}
    assert report()["counts"]["rows_in"] == 120 and FeatureStore(f"{out}/pool/embeddings").spec.rows == 120
    now = markers()
    assert [now[uri] == first[uri] for uri in derived] == [False, False, True, True]

    again = SelectPoolConfig(pool=f"{out}/pool/embeddings", target=f"{out}/target/embeddings", budget=10,
                             out=f"{s3_dir}/from-store")
    assert executor.run(stage, again).result.selected == 10
    assert storage.read_json(f"{s3_dir}/from-store/report.json")["derived"] == {"pool": {}, "target": {}}
    dsir = SelectPoolConfig(pool=f"{out}/pool/ingest", target=f"{out}/target/ingest", budget=10, method="dsir",
                            out=f"{s3_dir}/from-ingest")
    assert executor.run(stage, dsir).result.selected == 10
    assert storage.read_parquet(f"{s3_dir}/from-ingest/selected.parquet")["text"].null_count() == 0
