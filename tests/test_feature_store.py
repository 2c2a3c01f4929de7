"""Featurization on a real local Ray: resumable, exactly-once, fingerprinted, NaN-safe."""

from __future__ import annotations

import os
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

from engine.config import EmbedConfig, GradsConfig
from engine.errors import SiftError
from engine.features.embed import embed
from engine.features.grads import GradFeaturizer, featurize_grads
from engine.features.store import FeatureStore

GRADS = dict(model="tiny-llama", dim=64, shard_rows=100, batch_size=16)


def _ids(path) -> list[str]:
    return pl.read_parquet(Path(path) / "examples.parquet")["id"].to_list()


def _same(a: FeatureStore, b: FeatureStore) -> None:
    assert a.rows().equals(b.rows())
    assert np.array_equal(np.asarray(a.vectors()), np.asarray(b.vectors()))


def test_embeddings_cover_every_row_and_reruns_reuse(tweets_ingest, tmp_path):
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


def test_a_store_is_never_reused_for_another_request(tweets_ingest, tmp_path):
    featurize_grads(GradsConfig(data=tweets_ingest, out=tmp_path / "g", **GRADS))
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


def test_killed_actor_still_gives_every_id_exactly_once(tweets_ingest, tmp_path):
    reference, _ = featurize_grads(GradsConfig(data=tweets_ingest, out=tmp_path / "ref", **GRADS))
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


def test_interrupted_driver_resumes_to_the_same_store(tweets_ingest, tmp_path):
    reference, _ = featurize_grads(GradsConfig(data=tweets_ingest, out=tmp_path / "ref", **GRADS))
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
    assert stats.shards_done_before == done_before
    _same(store, reference)


def test_incomplete_store_is_an_error(tweets_ingest, tmp_path):
    store, _ = featurize_grads(GradsConfig(data=tweets_ingest, out=tmp_path / "g", **GRADS))
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
