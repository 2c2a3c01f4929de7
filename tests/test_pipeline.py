"""`sift run pipeline.yaml`: every stage on small built-in data, through a served HTTP query;
a rerun skips what is done, a changed setting reruns that stage and those downstream."""

from __future__ import annotations

import json

import yaml

from engine.cli import main
from engine.config import PipelineConfig, load_config

SMALL = {
    "pool": {"corpora": ["chatterbot", "fortunes"], "sample_rows": 300, "target_rows": 40, "budget": 20},
    "tasks": {"suite_tasks": ["wordnet-animal-plant", "fortunes-law-politics", "wordnet-person-location"],
              "per_task": 40, "model": "tiny-llama", "lora": {"layers": None}, "dim": 32, "subsets": 30,
              "epochs": 1, "boost": 0},
    "serve_queries": 3,
}


def test_pipeline_end_to_end_and_rerun(tmp_path, ray_session, capsys):
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "out": str(tmp_path / "run")}))
    assert main(["run", str(config)]) == 0
    first = capsys.readouterr().out
    for stage in ("ingest", "embed", "select-pool", "suite", "grads", "select-tasks", "group", "train", "serve"):
        assert f"[{stage}] ran:" in first
        assert json.loads((tmp_path / "run" / stage / "stage.json").read_text())["stage"] == stage
    assert "3 test rows classified over HTTP (peft)" in first
    assert len(json.loads((tmp_path / "run" / "serve" / "answers.json").read_text())) == 3
    page = (tmp_path / "run" / "report.html").read_text()
    assert page.count("data:image/png;base64") == 3

    assert main(["run", str(config), "--set", "tasks.epochs=2"]) == 0
    second = capsys.readouterr().out
    for stage in ("ingest", "embed", "select-pool", "suite", "grads", "select-tasks", "group"):
        assert f"[{stage}] skipped (done)" in second
    assert "[train] ran:" in second and "[serve] ran:" in second


def test_shipped_pipeline_file_is_the_demo():
    assert load_config(PipelineConfig, "configs/pipeline.yaml") == PipelineConfig()


def test_stages_left_out_pass_on_their_fingerprint_on_disk(tmp_path, ray_session, monkeypatch):
    """Running only `group` after a grads setting changed must not record group as built on the
    new gradients: a later full run rebuilds grads and then group too."""
    from engine import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "STAGES", {name: (lambda cfg, out, name=name: calls.append(name) or name)
                                             for name in pipeline.STAGES})
    monkeypatch.setattr(pipeline, "_ensemble_table", lambda out: None)
    base = {"out": tmp_path / "run"}
    pipeline.run(PipelineConfig(**base))
    assert calls == list(pipeline.UPSTREAM)
    calls.clear()
    changed = {**base, "tasks": {"dim": 128, "groups": 3}}
    pipeline.run(PipelineConfig(**changed, stages=["group"]))
    assert calls == ["group"]  # its own setting changed; it ran on the gradients on disk
    calls.clear()
    pipeline.run(PipelineConfig(**changed))
    assert calls == ["grads", "select-tasks", "group", "train", "serve"]
