"""Featurization on a real local Ray: resumable, exactly-once, fingerprinted, NaN-safe."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import pytest
import torch

from engine import storage
from engine.config import EmbedConfig, GradsConfig
from engine.errors import SiftError
from engine.features.embed import embed
from engine.features.grads import GradFeaturizer, featurize_grads
from engine.features.store import FeatureStore, StoreSpec

GRADS = dict(model="tiny-llama", dim=64, shard_rows=100, batch_size=16)


def _ids(path) -> list[str]:
    return pl.read_parquet(Path(path) / "examples.parquet")["id"].to_list()


@pytest.fixture(scope="module")
def grads_reference(tweets_ingest, tmp_path_factory) -> Path:
    """One uninterrupted gradient store of the 600 tweets, the reference several tests compare
    with or start from (each featurization of it costs seconds of model work). Tests copy it
    before they change anything."""
    out = tmp_path_factory.mktemp("grads") / "ref"
    featurize_grads(GradsConfig(data=tweets_ingest, out=out, **GRADS))
    return out


def _same(a: FeatureStore, b: FeatureStore) -> None:
    assert a.rows().equals(b.rows())
    assert np.array_equal(np.asarray(a.vectors()), np.asarray(b.vectors()))


def test_embeddings_cover_every_row_and_reruns_reuse(tweets_ingest, tmp_path, monkeypatch):
    store, stats = embed(EmbedConfig(data=tweets_ingest, out=tmp_path / "emb", shard_rows=256))
    n = len(_ids(tweets_ingest))
    assert stats.shards_done_before == 0 and stats.rows == n
    assert sorted(store.rows()["id"].to_list()) == sorted(_ids(tweets_ingest))
    vectors = store.vectors()
    assert vectors.shape == (n, 384)
    assert np.allclose(np.linalg.norm(np.asarray(vectors), axis=1), 1, atol=1e-5)
    assert np.array_equal(vectors[[5, 300, n - 1]], np.asarray(vectors)[[5, 300, n - 1]])  # mmap gather
    again, stats = embed(EmbedConfig(data=tweets_ingest, out=tmp_path / "emb", shard_rows=256))
    assert stats.shards_done_before == 3 and stats.rows == 0
    _same(store, again)

    # The embed stage's summary counts near-duplicates over every kept row of a small pool, and
    # over a seeded sample of a large one (the driver never holds every vector).
    from engine.index import near_duplicates
    from engine.stages import embed as embed_stage

    cfg = EmbedConfig(data=tweets_ingest, out=tmp_path / "emb", shard_rows=256)
    whole = embed_stage.run(cfg)
    vectors = np.asarray(FeatureStore(tmp_path / "emb").vectors())
    assert whole.sample is None and whole.near_duplicates == (near_duplicates(vectors) >= 0).sum()
    monkeypatch.setattr(embed_stage, "NEAR_DUPLICATE_ROWS", 100)
    sampled = embed_stage.run(cfg)
    rows = np.sort(np.random.default_rng(0).choice(len(vectors), 100, replace=False))
    assert sampled.sample == 100 and sampled.line().endswith("near-duplicates at cosine >= 0.95 in a sample of 100")
    assert sampled.near_duplicates == (near_duplicates(vectors[rows]) >= 0).sum()


def test_a_store_is_never_reused_for_another_request(tweets_ingest, grads_reference, tmp_path):
    shutil.copytree(grads_reference, tmp_path / "g")
    with pytest.raises(SiftError, match=r"holds a feature store for a different request \(.*dim: stored 64, requested 32"):
        featurize_grads(GradsConfig(data=tweets_ingest, out=tmp_path / "g", **{**GRADS, "dim": 32}))
    with pytest.raises(SiftError, match=r"model: stored 'tiny-llama-v1-2048@\w+', requested 'smollm2-135m-instruct-v1@"):
        featurize_grads(GradsConfig(data=tweets_ingest, out=tmp_path / "g", **{**GRADS, "model": "smollm2-135m"}))
    other = tmp_path / "other.parquet"
    pl.read_parquet(tweets_ingest / "examples.parquet").head(50).write_parquet(other)
    with pytest.raises(SiftError, match=r"data: stored '\d+ rows@\w+', requested '50 rows@"):
        featurize_grads(GradsConfig(data=other, out=tmp_path / "g", **GRADS))
    with pytest.raises(SiftError, match="not a feature store"):
        FeatureStore(tmp_path)


def test_killed_actor_still_gives_every_id_exactly_once(tweets_ingest, grads_reference, tmp_path):
    reference = FeatureStore(grads_reference)
    killed: list[int] = []

    def workers() -> set[int]:
        return {p.pid for p in psutil.process_iter(["cmdline"]) if "ShardWorker" in " ".join(p.info["cmdline"] or [])}

    stale = workers()  # the reference run's actor may still be exiting

    def kill_one_worker():
        """Find the new worker process early (its title names ShardWorker), kill it once a shard is written."""
        shards = tmp_path / "killed" / "shards"
        deadline, pid = time.time() + 120, None
        while time.time() < deadline and not killed:
            if pid is None:
                pid = next(iter(workers() - stale), None)
            elif shards.is_dir() and any(p.suffix == ".parquet" for p in shards.iterdir()):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    stale.add(pid)
                    pid = None
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    store, stats = featurize_grads(GradsConfig(data=tweets_ingest, out=tmp_path / "killed", **GRADS))
    killer.join()
    assert killed, "no featurization actor was found to kill"
    ids = store.rows()["id"].to_list()
    assert len(ids) == len(set(ids)) == len(_ids(tweets_ingest))
    _same(store, reference)


def test_interrupted_driver_resumes_to_the_same_store(tweets_ingest, grads_reference, tmp_path):
    reference = FeatureStore(grads_reference)
    out = tmp_path / "resumed"
    cmd = [str(Path(sys.executable).parent / "sift"), "featurize", "grads", "--data", str(tweets_ingest),
           "--out", str(out), "--model", "tiny-llama", "--dim", "64", "--batch-size", "16",
           "--set", "shard_rows=100", "--actors", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not (out / "shards" / "00000.parquet").exists():
        time.sleep(0.05)
    driver.send_signal(signal.SIGINT)
    driver.wait(timeout=60)
    done_before = len(list((out / "shards").glob("?????.parquet")))
    assert 1 <= done_before < 6, "the driver was not interrupted mid-run"
    store, stats = featurize_grads(GradsConfig(data=tweets_ingest, out=out, **GRADS))
    # An actor of the interrupted run may still finish the shard it was writing as its Ray exits.
    assert done_before <= stats.shards_done_before < 6
    n = len(_ids(tweets_ingest))  # 6 shards of 100 rows, the last one shorter
    assert n - 100 * stats.shards_done_before <= stats.rows <= n - (n - 500) * stats.shards_done_before  # only missing ones
    _same(store, reference)


def test_incomplete_store_is_an_error(grads_reference, tmp_path):
    shutil.copytree(grads_reference, tmp_path / "g")
    (tmp_path / "g" / "shards" / "00002.parquet").unlink()
    with pytest.raises(SiftError, match=r"incomplete \(1 of 6 shards missing\); rerun"):
        FeatureStore(tmp_path / "g").vectors()


def test_non_finite_rows_and_missing_labels_are_quarantined(tweets_ingest):
    cfg = GradsConfig(data=tweets_ingest, **GRADS)
    featurizer = GradFeaturizer(cfg, threads=1)
    frame = pl.DataFrame({
        "id": ["a", "b", "c", "d"],
        "text": ["a fine tweet", "this one has poison in it", "no label here", "another fine one"],
        "task": ["t"] * 4,
        "label": ["positive", "negative", None, "neutral"],
    })
    tokens = [set(featurizer.encode(row)[0]) for row in frame.iter_rows(named=True) if row["label"]]
    poison = min(tokens[1] - tokens[0] - tokens[2])  # a token only row "b" has
    base = featurizer.score.model.get_base_model()
    weight = base.get_input_embeddings().weight.detach().clone()  # untied copy: the LM head stays finite
    weight[poison] = float("nan")
    base.set_input_embeddings(torch.nn.Embedding.from_pretrained(weight))
    result = featurizer(frame)
    assert result.rows["id"].to_list() == ["a", "d"]
    assert dict(zip(result.quarantine["id"], result.quarantine["reason"])) == {
        "b": "non-finite f",
        "c": "missing label (gradient features need an answer)",
    }
    assert np.isfinite(result.vectors).all() and result.vectors.shape == (2, 64)


def test_store_config_holds_absolute_paths(tweets_ingest, tmp_path, monkeypatch):
    """Later stages rebuild the anchor from config.json in other working directories."""
    import json

    monkeypatch.chdir(tmp_path)
    featurize_grads(GradsConfig(data=tweets_ingest, out=Path("rel-store"), **GRADS))
    saved = json.loads((tmp_path / "rel-store" / "config.json").read_text())
    assert saved["out"] == str(tmp_path / "rel-store") and Path(saved["data"]).is_absolute()
    assert saved["model"] == "tiny-llama"  # built-in names stay names


def _synthetic_store(root: str, rows: int = 250, shard_rows: int = 64, dim: int = 8) -> tuple[FeatureStore, np.ndarray]:
    """A store filled directly (no model), as select-pool does for precomputed embeddings."""
    vectors = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    spec = StoreSpec(kind="embeddings", fingerprint={"source": "synthetic"}, dim=dim, dtype="float32",
                     seed=None, rows=rows, shard_rows=shard_rows)
    store = FeatureStore.prepare(root, spec)
    for k in store.missing_shards():
        start, stop = store.shard_range(k)
        store.write_shard(k, pl.DataFrame({"id": [f"r{i}" for i in range(start, stop)]}), vectors[start:stop],
                          pl.DataFrame(schema={"id": pl.String, "reason": pl.String}))
    return store, vectors


def test_a_remote_store_streams_shard_by_shard(s3_dir, monkeypatch):
    _, expected = _synthetic_store(s3_dir)
    store = FeatureStore(s3_dir)  # as a later stage opens it
    fetched: list[int] = []
    fetch = store._fetch_shard
    monkeypatch.setattr(store, "_fetch_shard", lambda k: fetched.append(k) or fetch(k))
    vectors = store.vectors()
    assert vectors.shape == (250, 8) and fetched == []  # opening reads no vectors
    assert np.array_equal(vectors[[3, 200, 70]], expected[[3, 200, 70]])
    assert sorted(fetched) == [0, 1, 3]  # only the shards holding the rows asked for
    assert np.array_equal(vectors[[65, 66]], expected[[65, 66]]) and sorted(fetched) == [0, 1, 3]  # cached
    assert np.array_equal(np.concatenate(list(vectors.iter_batches(50))), expected)
    assert np.array_equal(np.asarray(vectors), expected)
    assert store.rows()["id"].to_list() == [f"r{i}" for i in range(250)]
    assert store.size_bytes() == sum(storage.size(f) for f in storage.list_files(storage.join(s3_dir, "shards")))


def test_a_local_store_reads_the_rows_asked_for_without_mapping_its_shards(tmp_path):
    """Rows gathered from a local store are read, not mapped (issue 13): a touched page of a mapped
    shard stayed in the driver's RSS while the map lived (the kernel maps the page-cache folio
    around each row, ~2 MB with a large readahead: 2,000 random rows kept most of a store
    resident), and 100M rows in 1,024-row shards would pass Linux's 65,530 maps. Any order,
    repeats and a whole pass read the same; a shard file of another dtype is refused, not misread."""
    store, expected = _synthetic_store(str(tmp_path / "s"), rows=1200, shard_rows=4)

    def maps() -> int:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)

    before = maps()
    vectors = store.vectors()
    rows = np.r_[np.arange(1199, -1, -7), [3, 3, 1198]]  # every one of the 300 shards, reversed, repeats
    picked = vectors[rows]
    assert maps() - before < 10
    assert np.array_equal(picked, expected[rows]) and np.array_equal(vectors[5], expected[5])
    assert np.array_equal(np.asarray(vectors), expected) and maps() - before < 10
    np.save(tmp_path / "s" / "shards" / "00007.npy", expected[28:32].astype(np.float64))
    with pytest.raises(SiftError, match=r"00007.npy: holds a float64 array of shape \(4, 8\); the manifest says "
                                        r"\(4, 8\) float32"):
        store.vectors()


def test_objects_without_a_manifest_are_never_taken_for_finished_shards(s3_dir):
    """A prefix holding shard-like objects but no manifest (a store whose manifest was lost, files
    copied from elsewhere) gets a fresh store: none of those objects can be shown to be its own."""
    _synthetic_store(s3_dir)
    storage.delete(storage.join(s3_dir, "manifest.json"))
    storage.write_text(storage.join(s3_dir, "shards", "notes.txt"), "unrelated")
    spec = StoreSpec(kind="embeddings", fingerprint={"source": "another"}, dim=8, dtype="float32",
                     seed=None, rows=250, shard_rows=64)
    store = FeatureStore.prepare(s3_dir, spec)
    assert store.missing_shards() == [0, 1, 2, 3]
    assert storage.list_files(storage.join(s3_dir, "shards")) == []


@pytest.mark.slow
def test_embed_on_s3_resumes_from_finished_shards_after_an_interrupt(tweets_ingest, tmp_path, s3_dir):
    """`sift featurize embed --out s3://...` interrupted after its first shard; stale and foreign
    objects are then put under the prefix; the rerun computes only the missing shards (the stale
    ones among them) and ends equal to a local run, every id exactly once."""
    data = tmp_path / "examples.parquet"
    pl.read_parquet(tweets_ingest / "examples.parquet").head(300).write_parquet(data)
    settings = dict(data=data, shard_rows=64)  # 5 shards
    reference, _ = embed(EmbedConfig(out=tmp_path / "local", **settings))

    cmd = [str(Path(sys.executable).parent / "sift"), "featurize", "embed", "--data", str(data), "--out", s3_dir,
           "--set", "shard_rows=64", "--actors", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # with the fixture's AWS_* settings
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shards = storage.join(s3_dir, "shards")
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None and not storage.exists(storage.join(shards, "00000.parquet")):
        time.sleep(0.05)
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=120)
    done = [k for k in range(5) if storage.exists(storage.join(shards, f"{k:05d}.parquet"))]
    assert 1 <= len(done) < 5, f"the driver was not interrupted mid-run ({done}): {err.decode()[-2000:]}"

    stale = next(k for k in range(5) if k not in done)
    storage.write_bytes(storage.join(shards, f"{stale:05d}.npy"), b"a shard whose writer died")  # no rows file
    storage.write_text(storage.join(shards, "notes.txt"), "unrelated")
    storage.write_text(storage.join(shards, "00042.parquet"), "beyond the store's shards")
    store, stats = embed(EmbedConfig(out=s3_dir, **settings))
    assert stats.shards_done_before == len(done)
    assert stats.rows == sum(min(64, 300 - 64 * k) for k in range(5) if k not in done)  # only the missing ones
    ids = store.rows()["id"].to_list()
    assert len(ids) == len(set(ids)) == 300
    _same(store, reference)
    assert FeatureStore(s3_dir).config().out == s3_dir  # config.json beside the manifest, on S3


def test_labels_objective_records_its_classes_and_the_anchor_scores_as_the_store(tweets_ingest, tmp_path):
    """objective=labels: the store records each task's label set before any shard, the Anchor
    rebuilt from the store reads f exactly as the actors wrote it, rows of a task with one label
    are quarantined with a reason, and labels that share a first token are refused up front.
    (tiny-llama's tokenizer starts " negative" and " neutral" alike: the tweets are relabelled.)"""
    from engine.features.grads import LabelTokens
    from engine.models.anchor import Anchor

    examples = pl.read_parquet(tweets_ingest / "examples.parquet").head(150).with_columns(
        label=pl.col("label").replace({"negative": "bad", "neutral": "meh", "positive": "good"}))
    examples = pl.concat([examples, examples.tail(10).with_columns(task=pl.lit("solo"), label=pl.lit("x"),
                                                                   id=pl.col("id") + "-solo")])
    examples.write_parquet(tmp_path / "examples.parquet")
    out = tmp_path / "labels"
    store, stats = featurize_grads(GradsConfig(data=tmp_path / "examples.parquet", out=out, objective="labels",
                                               **GRADS))
    assert storage.read_json(out / "labels.json") == {"solo": ["x"], "tweets": ["bad", "good", "meh"]}
    assert store.rows().height == 150 and stats.quarantined == 10 and stats.reasons == {
        "task 'solo' has fewer than two labels (objective=labels scores the gold one among them)": 10}
    rows = store.rows().head(40)
    anchor = Anchor(out, threads=1)
    f = anchor.scores(anchor.encode(rows.select("id").join(examples, on="id", how="left", maintain_order="left")))
    assert np.allclose(f.numpy(), rows["f"].to_numpy(), atol=1e-4)
    assert float((f > np.log(1 / 2)).float().mean()) > 0.05  # odds among 3 labels, not over the vocabulary
    with pytest.raises(SiftError, match=r"task 'twin': labels \['good one', 'good two'\] start with the same token"):
        LabelTokens.of(anchor.featurizer.tokenizer, " {label}", {"twin": ["good one", "good two"]})
    examples.with_columns(label=pl.col("label").replace({"bad": "negative", "meh": "neutral"})).write_parquet(
        tmp_path / "clash.parquet")
    with pytest.raises(SiftError, match=r"start with the same token: they cannot be scored apart; featurize it "
                                        r"with objective=answer"):
        featurize_grads(GradsConfig(data=tmp_path / "clash.parquet", out=tmp_path / "clash", objective="labels",
                                    **GRADS))
    assert not (tmp_path / "clash").exists()  # refused before the store was begun
