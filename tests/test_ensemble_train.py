"""suite -> gradients -> sift group -> sift train (Ray Train, weights, boosting) -> sift evaluate,
through the real commands on the tiny Llama; and the bad inputs of grouping and training."""

from __future__ import annotations

import json

import polars as pl
import pytest

from engine.cli import main
from engine.config import EnsembleTrainConfig
from engine.ensemble import manifest
from engine.errors import SiftError
from engine.train.ensemble import _check, train_ensemble

TASKS = "[wordnet-animal-plant, fortunes-law-politics, wordnet-person-location]"


@pytest.fixture(scope="module")
def suite_grads(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("ens")
    assert main(["suite", "--out", str(root / "suite"), "--per-task", "40", "--set", f"tasks={TASKS}",
                 "--set", "test=0.2"]) == 0
    assert main(["featurize", "grads", "--data", str(root / "suite"), "--out", str(root / "grads"),
                 "--model", "tiny-llama", "--dim", "32"]) == 0
    return root


def test_group_train_evaluate_end_to_end(suite_grads, tmp_path, capsys):
    root = suite_grads
    assert main(["group", "--data", str(root / "suite"), "--grads", str(root / "grads"), "--groups", "2",
                 "--out", str(tmp_path / "group"), "--set", "subsets=20", "--set", "restarts=1",
                 "--set", "rounds=5"]) == 0
    grouping = json.loads((tmp_path / "group" / "groups.json").read_text())
    assert grouping["m"] == 2 and sorted(t for g in grouping["groups"] for t in g) == sorted(grouping["tasks"])
    assert {c["start"] for c in grouping["candidates"]} == {"sdp", "spectral", "random-0"}
    assert all(c["objective"] <= c["start_objective"] + 1e-12 for c in grouping["candidates"])
    assert (tmp_path / "group" / "affinity.png").stat().st_size > 10_000

    args = ["train", "--groups", str(tmp_path / "group"), "--out", str(tmp_path / "ens"), "--epochs", "1",
            "--boost", "1", "--set", "steps_per_epoch=2"]
    assert main(args) == 0
    loaded = manifest.load(tmp_path / "ens")
    assert [a.name for a in loaded.adapters][:2] == ["group-0", "group-1"]
    for task, entry in loaded.tasks.items():
        assert sum(entry.weights.values()) == pytest.approx(1)
    report = json.loads((tmp_path / "ens" / "report.json").read_text())
    assert set(report["test"]["tasks"]) == set(grouping["tasks"]) and report["test"]["tasks"]["wordnet-animal-plant"][
        "ensemble"]["rows"] == 8
    assert len(report["boosting"]) == 1
    assert report["boosting"][0]["accepted"] == (loaded.adapters[-1].name == "boost-1")
    assert {"gradient_pass", "estimator", "training", "inference_per_query"} <= set(loaded.flops)
    assert all(v > 0 for k, v in loaded.flops.items() if k != "boosting")

    # A rerun finds every group trained and only refits the weights.
    trained = (tmp_path / "ens" / "runs" / "group-0" / "train.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (tmp_path / "ens" / "runs" / "group-0" / "train.json").stat().st_mtime_ns == trained

    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "ens"), "--data", str(root / "suite")]) == 0
    assert "Ensemble on test rows" in capsys.readouterr().out
    assert json.loads((tmp_path / "ens" / "evaluation-test.json").read_text())["average"] == report["test"]["average"]


def test_qlora_ensemble(suite_grads, tmp_path):
    root = suite_grads
    report = train_ensemble(EnsembleTrainConfig(
        partition=[["wordnet-animal-plant", "fortunes-law-politics", "wordnet-person-location"]],
        data=root / "suite", grads=root / "grads", out=tmp_path / "q", quantize="nf4", epochs=1, steps_per_epoch=1))
    assert manifest.load(tmp_path / "q").quantize == "nf4"
    assert report["validation"]["average"]["accuracy"] >= 0


@pytest.mark.parametrize("partition, message", [
    ([["wordnet-animal-plant"], ["fortunes-law-politics"]], "task\\(s\\) \\['wordnet-person-location'\\] are in no group"),
    ([["wordnet-animal-plant", "nope"], ["fortunes-law-politics", "wordnet-person-location"]],
     "task\\(s\\) \\['nope'\\] of the groups are not in the data"),
    ([["wordnet-animal-plant", "fortunes-law-politics"], ["fortunes-law-politics", "wordnet-person-location"]],
     "are in more than one group"),
    ([[], ["wordnet-animal-plant", "fortunes-law-politics", "wordnet-person-location"]], "a group holds no task"),
])
def test_bad_partitions(suite_grads, partition, message):
    frame = pl.read_parquet(suite_grads / "suite" / "examples.parquet")
    with pytest.raises(SiftError, match=message):
        _check(partition, frame)


def test_group_without_training_rows_and_too_many_groups(suite_grads, tmp_path, capsys):
    frame = pl.read_parquet(suite_grads / "suite" / "examples.parquet").with_columns(
        split=pl.when(pl.col("task") == "wordnet-person-location").then(pl.lit("validation")).otherwise("split"))
    with pytest.raises(SiftError, match="group 1 \\(wordnet-person-location\\) has no training rows"):
        _check([["wordnet-animal-plant", "fortunes-law-politics"], ["wordnet-person-location"]], frame)
    assert main(["group", "--data", str(suite_grads / "suite"), "--grads", str(suite_grads / "grads"),
                 "--groups", "4", "--out", str(tmp_path / "g")]) == 2
    assert "--groups 4 is more than the 3 tasks in the store" in capsys.readouterr().err
    assert main(["group", "--data", str(suite_grads / "suite"), "--grads", str(suite_grads / "grads"),
                 "--groups", "0", "--out", str(tmp_path / "g")]) == 2
    assert "key 'groups'" in capsys.readouterr().err
