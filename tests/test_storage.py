"""The storage layer against a real S3 endpoint (moto's server on loopback) and local disk:
the same calls, the same guarantees (atomic writes, prefix listing and deletion, cached copies)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from engine import storage
from engine.config import EmbedConfig
from engine.errors import SiftError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A fresh folder: a local path, or a prefix of the session's S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_dir")


def test_round_trips_listing_and_prefix_deletion(root):
    frame = pl.DataFrame({"id": ["a", "b", "c"], "x": [1.5, 2.5, None]})
    storage.write_parquet(frame, storage.join(root, "t", "rows.parquet"))
    storage.write_json(storage.join(root, "t", "meta.json"), {"k": [1, 2]})
    storage.write_bytes(storage.join(root, "blob.bin"), b"\x00\x01")
    storage.write_text(storage.join(root, "other", "note.txt"), "héllo")

    assert storage.read_parquet(storage.join(root, "t", "rows.parquet")).equals(frame)
    assert storage.read_parquet(storage.join(root, "t", "rows.parquet"), columns=["id"])["id"].to_list() == ["a", "b", "c"]
    assert storage.read_json(storage.join(root, "t", "meta.json")) == {"k": [1, 2]}
    assert storage.read_bytes(storage.join(root, "blob.bin")) == b"\x00\x01"
    assert storage.read_text(storage.join(root, "other", "note.txt")) == "héllo"
    batches = list(storage.iter_parquet_batches(storage.join(root, "t", "rows.parquet"), batch_rows=2))
    assert [b.height for b in batches] == [2, 1] and pl.concat(batches).equals(frame)
    assert storage.read_parquet_slice(storage.join(root, "t", "rows.parquet"), 1, 5)["id"].to_list() == ["b", "c"]

    assert storage.list_files(root) == [storage.join(root, p) for p in
                                        ("blob.bin", "other/note.txt", "t/meta.json", "t/rows.parquet")]
    assert storage.list_files(root, recursive=False) == [storage.join(root, "blob.bin")]
    assert storage.is_dir(storage.join(root, "t")) and not storage.is_dir(storage.join(root, "blob.bin"))
    assert storage.size(storage.join(root, "blob.bin")) == 2
    assert storage.size(root) == sum(storage.size(f) for f in storage.list_files(root))

    storage.delete(storage.join(root, "t"))  # a whole prefix
    assert storage.list_files(root) == [storage.join(root, "blob.bin"), storage.join(root, "other", "note.txt")]
    assert not storage.exists(storage.join(root, "t", "rows.parquet"))
    storage.delete(storage.join(root, "blob.bin"))  # one object
    storage.delete(storage.join(root, "never-there"))  # missing is fine
    assert storage.list_files(root) == [storage.join(root, "other", "note.txt")]
    assert storage.list_files(storage.join(root, "nothing-here")) == []
    with pytest.raises(SiftError, match="no such file"):
        storage.read_bytes(storage.join(root, "blob.bin"))


def test_a_failing_writer_leaves_no_object_and_keeps_the_old_one(root):
    target = storage.join(root, "shard.npy")
    with pytest.raises(RuntimeError):
        with storage.atomic_writer(target) as f:
            np.save(f, np.ones((1000, 8), np.float32))
            raise RuntimeError("the worker died mid-write")
    assert not storage.exists(target)
    assert storage.list_files(root) == []  # no temporary object left behind either

    storage.write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with storage.atomic_writer(target) as f:
            f.write(b"new but partial")
            raise RuntimeError
    assert storage.read_bytes(target) == b"old"
    assert storage.list_files(root) == [target]


def test_upload_download_and_a_cached_local_copy_that_follows_changes(root, tmp_path, monkeypatch):
    monkeypatch.setenv("SIFT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "sub" / "weights.bin").write_bytes(os.urandom(1000))
    remote = storage.join(root, "model")
    storage.upload(folder, remote)
    assert storage.list_files(remote) == [storage.join(remote, "config.json"), storage.join(remote, "sub", "weights.bin")]

    back = storage.download(remote, tmp_path / "back")
    assert (back / "sub" / "weights.bin").read_bytes() == (folder / "sub" / "weights.bin").read_bytes()
    one = storage.download(storage.join(remote, "config.json"), tmp_path / "one")
    assert one == tmp_path / "one" / "config.json" and one.read_text() == '{"hidden_size": 8}'

    copy = storage.local_copy(remote)
    if not storage.is_remote(remote):
        assert copy == Path(remote)  # local locations are used in place
        return
    assert copy.name == "model" and (copy / "config.json").read_text() == '{"hidden_size": 8}'
    assert storage.local_copy(remote) == copy  # unchanged objects: the same copy, no download
    storage.write_text(storage.join(remote, "config.json"), '{"hidden_size": 9}')  # same size, new content
    fresh = storage.local_copy(remote)
    assert fresh != copy and (fresh / "config.json").read_text() == '{"hidden_size": 9}'
    assert not copy.exists()  # the stale copy is gone
    single = storage.local_copy(storage.join(remote, "config.json"))
    assert single.name == "config.json" and single.read_text() == '{"hidden_size": 9}'


@pytest.mark.parametrize("bad, message", [
    ("s3:/bucket/key", r"malformed URI: 's3:' must be followed by '//' \(did you mean 's3://bucket/key'"),
    ("s3://", r"names no bucket"),
    ("file://relative/x", r"malformed file URI"),
    ("", r"is not a path or URI"),
])
def test_malformed_locations_are_one_line_errors(bad, message):
    with pytest.raises(SiftError, match=message):
        storage.validate_uri(bad)


def test_config_location_fields_are_validated_strings(tmp_path):
    cfg = EmbedConfig(data=tmp_path / "ingest", out="s3://bucket/emb")
    assert cfg.data == str(tmp_path / "ingest") and cfg.out == "s3://bucket/emb"
    with pytest.raises(SiftError, match="did you mean 's3://bucket/emb'"):
        EmbedConfig(out=Path("s3://bucket/emb"))  # what argparse's type=Path used to do


def test_names_keep_their_scheme():
    assert storage.join("s3://b/x/", "y", "z.json") == "s3://b/x/y/z.json"
    assert storage.join("file:///data/x", "y") == "file:///data/x/y"
    assert storage.join("runs/x", "y") == os.path.join("runs/x", "y")
    assert storage.is_remote("s3://b/x") and storage.is_remote("gs://b/x")
    assert not storage.is_remote("file:///x") and not storage.is_remote("runs/x")
    assert storage.absolute("s3://b/x") == "s3://b/x" and storage.absolute("x") == os.path.abspath("x")


def test_a_model_folder_on_s3_loads_from_its_local_copy(s3_dir, tmp_path, monkeypatch):
    import torch

    from engine.models import builtin, load

    local = builtin.resolve("tiny-llama")  # from the usual cache
    monkeypatch.setenv("SIFT_CACHE", str(tmp_path / "cache"))
    storage.upload(local, storage.join(s3_dir, "tiny-llama"))
    folder = builtin.resolve(storage.join(s3_dir, "tiny-llama"))
    assert folder.is_relative_to(tmp_path / "cache" / "objects")
    ids = torch.tensor([[1, 5, 9]])
    remote_model, local_model = load.load_causal_lm(folder), load.load_causal_lm(local)
    assert torch.equal(remote_model(ids).logits, local_model(ids).logits)
    with pytest.raises(SiftError, match="no such file or folder"):
        builtin.resolve(storage.join(s3_dir, "absent"))
