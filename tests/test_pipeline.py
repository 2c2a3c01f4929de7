"""`sift run pipeline.yaml`: every stage on small built-in data, through a served HTTP query;
a rerun skips what is done, a changed setting reruns that step and the steps that read it."""

from __future__ import annotations


import pytest
import yaml

from engine import pipeline
from engine.cli import main
from engine.executor import MARKER

SMALL = {
    "steps": [
        {"stage": "ingest", "config": {"corpora": ["chatterbot", "fortunes"]}},
        {"stage": "sample", "config": {"data": "ingest", "rows": 300, "target_task": "fortunes",
                                       "target_label": "computers", "target_rows": 40}},
        {"stage": "embed", "config": {"data": "sample/pool.parquet"}},
        {"stage": "select-pool", "config": {"pool": "embed", "target": "sample/target.parquet", "budget": 20}},
        {"stage": "suite", "config": {"tasks": ["wordnet-animal-plant", "fortunes-law-politics",
                                                "wordnet-person-location"], "per_task": 40, "test": 0.2}},
        {"stage": "grads", "config": {"data": "suite", "model": "tiny-llama", "dim": 32, "objective": "labels"}},
        {"stage": "select-tasks", "config": {"data": "suite", "grads": "grads", "target": ["wordnet-animal-plant"],
                                             "subsets": 30}},
        {"stage": "group", "config": {"data": "suite", "grads": "grads", "groups": 2, "subsets": 20, "restarts": 1,
                                      "rounds": 5}},
        {"stage": "train", "config": {"groups": "group", "epochs": 1, "boost": 0}},
        {"stage": "serve", "config": {"manifest": "train", "backend": "peft", "check_data": "suite",
                                      "check_queries": 3}},
    ],
}
NAMES = [step["stage"] for step in SMALL["steps"]]


@pytest.mark.timeout(900)  # every stage through S3, then a rerun that skips them: minutes on 2 cores
def test_pipeline_end_to_end_on_s3_and_rerun(tmp_path, s3_dir, ray_session, capsys):
    """Every input and every output on a real S3 endpoint: the corpora are uploaded first, each
    step writes under s3://, reads the steps before it from there, and a rerun skips on the
    markers it finds there."""
    from engine import storage
    from engine.data import corpora

    inputs = []
    for name in ("chatterbot", "fortunes"):
        inputs.append(f"{s3_dir}/inputs/{name}.parquet")
        storage.upload(corpora.path(name), inputs[-1])
    steps = [{"stage": "ingest", "config": {"inputs": inputs}}, *SMALL["steps"][1:],
             {"stage": "evaluate", "config": {"manifest": "train", "data": "suite"}}]
    out = f"{s3_dir}/run"
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"steps": steps, "out": out}))
    assert main(["run", str(config)]) == 0
    first = capsys.readouterr().out
    for name in NAMES:
        assert f"[{name}] ran:" in first
        assert storage.read_json(f"{out}/{name}/{MARKER}")["stage"] == name
    assert "[evaluate] ran: test accuracy" in first
    assert "3 test rows classified over HTTP (peft)" in first
    assert len(storage.read_json(f"{out}/serve/answers.json")) == 3
    assert storage.exists(f"{out}/train/ensemble.json") and storage.exists(f"{out}/train/adapters/group-0")
    # the label sets of the store, as the demo's: on S3, where select-tasks' and train's Anchor read them
    assert sorted(storage.read_json(f"{out}/grads/labels.json")) == [
        "fortunes-law-politics", "wordnet-animal-plant", "wordnet-person-location"]
    assert storage.list_files(f"{out}/train/_checkpoints")  # Ray Train's state on S3, where every node sees it
    assert "Adapter ensemble on test rows" in first
    assert storage.read_text(f"{out}/report.html").count("data:image/png;base64") == 3  # pool, tasks, groups

    # Downstream reruns after a changed setting are test_executor's; here: every marker on S3 is
    # found and trusted, and only the step whose setting changed runs again.
    assert main(["run", str(config), "--set", "evaluate.split=validation"]) == 0
    second = capsys.readouterr().out
    for name in NAMES:
        assert f"[{name}] skipped (done)" in second
    assert "[evaluate] ran: validation accuracy" in second


def test_shipped_pipeline_file_is_the_demo_and_validates():
    cfg = pipeline.load(pipeline.DEMO)
    assert [s.stage for s in cfg.steps] == ["ingest", "sample", "embed", "select-pool", "suite", "grads",
                                            "select-tasks", "group", "train", "serve"]
    from engine.stages import STAGES

    resolved = {name: stage_cfg for name, _, stage_cfg in pipeline._resolve(cfg, STAGES)}
    assert resolved["train"].groups == "runs/demo/group"  # a step name resolves to that step's output
    assert resolved["select-pool"].target == "runs/demo/sample/target.parquet"
    assert resolved["grads"].model == "smollm2-135m"  # names that are not steps stay as they are
