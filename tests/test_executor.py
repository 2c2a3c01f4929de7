"""The executor: one fingerprint scheme, the done marker written last, reruns that skip exactly
what is finished — on local folders and on a real S3 endpoint, with toy stages (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine import executor, pipeline, storage
from engine.config import StrictModel, Uri
from engine.stages import STAGES, Result, Stage


class CopyConfig(StrictModel):
    data: Uri | None = None
    out: Uri | None = None
    suffix: str = "!"
    fail: bool = False


class CopyResult(Result):
    text: str

    def line(self) -> str:
        return self.text


CALLS: list[str] = []


def _copy(cfg: CopyConfig) -> CopyResult:
    """Appends `suffix` to the text it reads; writes two files, the second one last."""
    CALLS.append(Path(cfg.out).name)
    text = storage.read_text(storage.join(cfg.data, "text.txt") if storage.is_dir(cfg.data) else cfg.data) + cfg.suffix
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "text.txt").write_text(text)
    if cfg.fail:
        raise RuntimeError("killed mid-run")
    (Path(cfg.out) / "extra.txt").write_text("done")
    return CopyResult(text=text)


COPY = Stage("copy", "toy", CopyConfig, CopyResult, _copy, lambda r: None, lambda p: None, inputs=("data",))


@pytest.fixture(autouse=True)
def _calls():
    CALLS.clear()


def _run(data, out, **settings):
    return executor.run(COPY, CopyConfig(data=str(data), out=str(out), **settings))


def test_skip_rerun_on_setting_or_input_change_and_force(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("a")
    assert _run(source, tmp_path / "x").result.text == "a!"
    again = _run(source, tmp_path / "x")
    assert (again.status, again.result.text, CALLS) == ("skipped (done)", "a!", ["x"])
    assert _run(source, tmp_path / "x", suffix="?").status == "ran"  # a setting changed
    source.write_text("b")  # an input edited in place: its size and mtime change
    assert _run(source, tmp_path / "x", suffix="?").result.text == "b?"
    assert executor.run(COPY, CopyConfig(data=str(source), out=str(tmp_path / "x"), suffix="?"),
                        force=True).status == "ran"
    assert len(CALLS) == 4


def test_a_killed_run_leaves_no_marker_and_reruns(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("a")
    _run(source, tmp_path / "x")
    with pytest.raises(RuntimeError):
        _run(source, tmp_path / "x", fail=True)  # the old marker is removed before the run starts
    assert not (tmp_path / "x" / executor.MARKER).exists()
    assert (tmp_path / "x" / "text.txt").exists()  # a half-written output ...
    assert _run(source, tmp_path / "x").status == "ran"  # ... is never taken for a finished one


def test_foreign_or_corrupt_marker_is_no_proof(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("a")
    out = tmp_path / "x"
    out.mkdir()
    (out / executor.MARKER).write_text("{not json")
    assert _run(source, out).status == "ran"
    marker = executor.read_marker(str(out))
    storage.write_json(storage.join(str(out), executor.MARKER), {**marker.model_dump(), "stage": "other"})
    assert _run(source, out).status == "ran"


def test_downstream_reruns_and_steps_left_out_pass_on_their_output(tmp_path, monkeypatch, ray_session):
    monkeypatch.setitem(STAGES, "copy", COPY)
    (tmp_path / "in.txt").write_text("a")
    file = tmp_path / "p.yaml"
    file.write_text(yaml.safe_dump({"out": str(tmp_path / "run"), "steps": [
        {"stage": "copy", "name": "first", "config": {"data": str(tmp_path / "in.txt")}},
        {"stage": "copy", "name": "second", "config": {"data": "first"}},
        {"stage": "copy", "name": "third", "config": {"data": "second/text.txt"}},
    ]}))
    pipeline.run(pipeline.load(str(file)))
    assert CALLS == ["first", "second", "third"]
    CALLS.clear()
    changed = {"first.suffix": "?", "second.suffix": "+"}
    pipeline.run(pipeline.load(str(file), {**changed, "only": ["second"]}))
    assert CALLS == ["second"]  # its own setting changed; it ran on what `first` left on disk
    assert (tmp_path / "run" / "second" / "text.txt").read_text() == "a!+"
    CALLS.clear()
    pipeline.run(pipeline.load(str(file), changed))
    assert CALLS == ["first", "second", "third"]  # first's new output reruns everything that reads it
    assert (tmp_path / "run" / "third" / "text.txt").read_text() == "a?+!"
    CALLS.clear()
    pipeline.run(pipeline.load(str(file), changed))
    assert CALLS == []


def test_remote_output_uploaded_before_its_marker_and_skipped_on_rerun(s3, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("a")
    out = f"{s3}/executor/x"
    assert _run(source, out).result.text == "a!"
    assert sorted(storage.list_files(out)) == [f"{out}/{executor.MARKER}", f"{out}/extra.txt", f"{out}/text.txt"]
    assert _run(source, out).status == "skipped (done)"
    stale = f"{s3}/executor/y"
    storage.write_text(f"{stale}/text.txt", "left by someone else")  # a foreign object, no marker
    assert _run(f"{out}/text.txt", stale).status == "ran"
    assert storage.read_text(f"{stale}/text.txt") == "a!!"


def test_worker_inputs_reach_the_stage_as_given_and_count_in_the_fingerprint(s3, tmp_path):
    """A model URI that Ray workers load on their own nodes is passed on as the URI (the driver's
    cached copy exists on its node only), while a change to it still reruns the stage."""
    seen = []

    def _model(cfg: CopyConfig) -> CopyResult:
        seen.append(cfg.data)
        return CopyResult(text=storage.read_text(cfg.data))

    stage = Stage("model", "toy", CopyConfig, CopyResult, _model, lambda r: None, lambda p: None,
                  worker_inputs=("data",))
    model = f"{s3}/executor/model.txt"
    storage.write_text(model, "weights")
    assert executor.run(stage, CopyConfig(data=model, out=str(tmp_path / "o"))).status == "ran"
    assert seen == [model]
    assert executor.run(stage, CopyConfig(data=model, out=str(tmp_path / "o"))).status == "skipped (done)"
    storage.write_text(model, "other weights")
    assert executor.run(stage, CopyConfig(data=model, out=str(tmp_path / "o"))).status == "ran"


def test_adapter_folders_are_fingerprinted_by_content(tmp_path):
    """A retrained adapter of the same rank has the same file names and sizes: only its bytes
    tell it from the old one, so a gradient store built on the old one is never reused for it."""
    import os

    from safetensors.torch import save_file
    import torch

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8}')
    save_file({"lora_B": torch.zeros(8, 8)}, str(folder / "adapter_model.safetensors"))
    before = executor.folder_digest(folder)
    stat = (folder / "adapter_model.safetensors").stat()
    save_file({"lora_B": torch.ones(8, 8)}, str(folder / "adapter_model.safetensors"))
    os.utime(folder / "adapter_model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert (folder / "adapter_model.safetensors").stat().st_size == stat.st_size
    assert executor.folder_digest(folder) != before
    assert executor.folder_digest(folder) == executor.folder_digest(folder)  # cached by mtime, same answer


class StoreConfig(StrictModel):
    data: Uri | None = None
    out: Uri | None = None
    replace_mismatch: bool = False


def _store(cfg: StoreConfig) -> CopyResult:
    """A feature stage in miniature: a store whose request is the input's text, refused when OUT
    holds another request's store unless `replace_mismatch` (as FeatureStore.prepare does for embed/grads)."""
    from engine.features.store import FeatureStore, StoreSpec

    text = storage.read_text(cfg.data)
    FeatureStore.prepare(cfg.out, StoreSpec(kind="embeddings", fingerprint={"data": text}, dim=2, dtype="float32",
                                            seed=None, rows=1, shard_rows=1),
                          replace_mismatch=cfg.replace_mismatch)
    return CopyResult(text=text)


def test_a_feature_stage_replaces_its_own_store_when_an_input_changes(tmp_path):
    """`sift run` after the data under an embed or grads step changed: the step's own finished
    store (another request) is replaced, not refused; a store no finished run of the stage wrote
    (an interrupted run of another request, someone else's folder) is still refused."""
    from engine.errors import SiftError

    stage = Stage("store", "toy", StoreConfig, CopyResult, _store, lambda r: None, lambda p: None, inputs=("data",),
                  replace_stale=True)
    assert STAGES["embed"].replace_stale and STAGES["grads"].replace_stale
    source, out = tmp_path / "in.txt", str(tmp_path / "store")
    source.write_text("a")
    assert executor.run(stage, StoreConfig(data=str(source), out=out)).status == "ran"
    source.write_text("b!")
    assert executor.run(stage, StoreConfig(data=str(source), out=out)).result.text == "b!"
    assert executor.run(stage, StoreConfig(data=str(source), out=out)).status == "skipped (done)"
    storage.delete(storage.join(out, executor.MARKER))  # as a run of another request killed mid-way leaves it
    source.write_text("c")
    with pytest.raises(SiftError, match="holds a feature store for a different request"):
        executor.run(stage, StoreConfig(data=str(source), out=out))
