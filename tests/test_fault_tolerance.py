"""What survives a failure: a Ray Train run that loses the node its worker ran on resumes from its
last checkpoint on another node; a Ray Tune trial that keeps failing is reported and left out; and
`sift train` goes on with the other groups when one group's training fails.

The multi-node test starts its own cluster on this machine (engine/local_cluster.py: a head and two
worker nodes, each a `ray start --block` in a session of its own with its own temp dir and ports)
and drives it through a `sift train-lora` subprocess (the pytest process already holds an
embedded Ray). It kills only the processes of the nodes it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from engine.cli import main
from engine.config import EnsembleTrainConfig, RuntimeConfig
from engine.errors import SiftError
from engine.local_cluster import CLIENT_ENV
from tests.conftest import ROOT
from tests.test_multinode import blind_wrapper, private_mounts_work

BIN = Path(sys.executable).parent


# --- a Tune trial that fails ------------------------------------------------------------------


def _flaky(config: dict) -> None:
    """x = 1 always fails; x = 2 fails on its first attempt only (a lost worker, say)."""
    from ray import tune

    marker = Path(config["marker"])
    if "runs" in config:  # a log of every execution
        with open(config["runs"], "a") as log:
            log.write(f"{config['x']}\n")
    if config["x"] == 1:
        raise ValueError("trial x=1 cannot be estimated")
    if config["x"] == 2 and not marker.exists():
        marker.touch()
        raise ConnectionError("worker died")
    tune.report({"loss": float(config["x"])})


def test_a_failing_tune_trial_is_retried_then_reported_and_left_out(ray_session, tmp_path):
    from ray import tune

    from engine import runtime
    from engine.select.tasks.tune import finished, restorable_tuner

    def run(name: str, xs: list[int], max_failures: int):
        tuner = restorable_tuner(
            tune.with_resources(_flaky, {"cpu": 1}), name,
            runtime.run_storage(RuntimeConfig(), tmp_path / name, "tune"), max_failures,
            param_space={"x": tune.grid_search(xs), "marker": str(tmp_path / f"{name}-retried")},
            tune_config=tune.TuneConfig(max_concurrent_trials=2))
        return finished(tuner.fit(), "test trial")

    done, failed = run("retried", [0, 1, 2], max_failures=1)
    assert sorted(r.config["x"] for r in done) == [0, 2]  # x=2 succeeded on its retry
    assert all(np.isfinite(r.metrics["loss"]) for r in done)
    assert [f.config["x"] for f in failed] == [1]
    assert "trial x=1 cannot be estimated" in failed[0].error
    assert (tmp_path / "retried" / "tune" / "retried").is_dir()  # under the stage's output

    done, failed = run("no-retry", [0, 2], max_failures=0)
    assert [r.config["x"] for r in done] == [0] and [f.config["x"] for f in failed] == [2]
    with pytest.raises(SiftError, match="every test trial failed; the first: .*cannot be estimated"):
        run("all-fail", [1], max_failures=0)


def test_tune_experiments_live_on_object_storage_and_restore_from_there(ray_session, s3_dir, tmp_path):
    """runtime.checkpoints = s3://...: the experiment's state is written there through
    engine.storage's filesystem, and a rerun restores it from there instead of running again."""
    from ray import tune

    from engine import runtime, storage
    from engine.select.tasks.tune import finished, restorable_tuner

    where = runtime.run_storage(RuntimeConfig(checkpoints=f"{s3_dir}/checkpoints"), tmp_path / "out", "tune")
    assert where.uri == f"{s3_dir}/checkpoints/tune"

    def run():
        tuner = restorable_tuner(tune.with_resources(_flaky, {"cpu": 1}), "on-s3", where, 0,
                                 param_space={"x": tune.grid_search([0, 3]), "marker": str(tmp_path / "m"),
                                              "runs": str(tmp_path / "runs.log")},
                                 tune_config=tune.TuneConfig(max_concurrent_trials=2))
        return tuner, finished(tuner.fit(), "test trial")

    _, (done, failed) = run()
    assert sorted(r.config["x"] for r in done) == [0, 3] and not failed
    assert any(name.endswith("experiment_state.json") or "tuner.pkl" in name
               for name in storage.list_files(f"{s3_dir}/checkpoints/tune/on-s3")), "nothing written to S3"
    assert not (tmp_path / "out").exists()  # nothing under the local output
    _, (again, _) = run()
    assert sorted(r.metrics["loss"] for r in again) == [0.0, 3.0]
    assert sorted((tmp_path / "runs.log").read_text().split()) == ["0", "3"]  # restored, not run again


# --- sift train with a group that fails -------------------------------------------------------

TASKS = "[wordnet-animal-plant, fortunes-law-politics, wordnet-person-location]"


@pytest.fixture(scope="module")
def suite_grads(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("ft")
    assert main(["suite", "--out", str(root / "suite"), "--per-task", "30", "--set", f"tasks={TASKS}"]) == 0
    assert main(["featurize", "grads", "--data", str(root / "suite"), "--out", str(root / "grads"),
                 "--model", "tiny-llama", "--dim", "16"]) == 0
    return root


def test_train_goes_on_when_one_group_fails(suite_grads, tmp_path):
    """group-1's training rows have no label, so its Ray Train run fails; group-0 still trains, and
    the failed group's task is served by group-0's adapter. (Retries: the multi-node test below.)"""
    from engine import executor
    from engine.stages import STAGES

    frame = pl.read_parquet(suite_grads / "suite" / "examples.parquet")
    frame = frame.with_columns(label=pl.when((pl.col("task") == "wordnet-person-location") & (pl.col("split") == "train"))
                               .then(None).otherwise(pl.col("label")))
    (tmp_path / "data").mkdir()
    frame.write_parquet(tmp_path / "data" / "examples.parquet")
    cfg = EnsembleTrainConfig(partition=[["wordnet-animal-plant", "fortunes-law-politics"], ["wordnet-person-location"]],
                              data=str(tmp_path / "data"), grads=str(suite_grads / "grads"), out=str(tmp_path / "ens"),
                              epochs=1, steps_per_epoch=2, runtime=RuntimeConfig(max_failures=0))
    outcome = executor.run(STAGES["train"], cfg)

    report = json.loads((tmp_path / "ens" / "report.json").read_text())
    assert list(report["groups"]) == ["group-0"]
    assert report["failed_groups"]["group-1"]["tasks"] == ["wordnet-person-location"]
    assert "no training row of tasks ['wordnet-person-location'] can be encoded" in \
        report["failed_groups"]["group-1"]["error"]
    assert "group-1 FAILED (" in outcome.result.line() and "can be encoded" in outcome.result.line()
    loaded = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert [a["name"] for a in loaded["adapters"]] == ["group-0"]
    assert loaded["tasks"]["wordnet-person-location"]["weights"] == {"group-0": 1.0}  # still served
    assert "wordnet-person-location" in report["validation"]["tasks"]


# --- a Ray Train run survives the loss of its worker's node ------------------------------------


def _train_worker_pids() -> list[int]:
    """Ray Train's worker processes (their title names RayTrainWorker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"RayTrainWorker" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture
def inputs(tmp_path) -> Path:
    """A folder only the driver sees: the worker nodes see an empty tmpfs there (where mount
    namespaces are available), as on a cluster whose inputs are the driver's local copies."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    return folder


@pytest.fixture
def cluster(inputs):
    """A head with no CPUs (the driver and Train's controller only) and two 1-CPU worker nodes."""
    from engine.local_cluster import LocalCluster

    hidden = blind_wrapper(inputs) if private_mounts_work() else []
    started = LocalCluster(Path(tempfile.mkdtemp(prefix="sift-ft-", dir="/tmp")))
    try:
        started.start(workers=0)
        for _ in range(2):
            started.add_worker(1, wrapper=hidden, wait=False)
        started.wait_for_nodes()
        yield started
    finally:
        started.close()


def test_ray_train_survives_losing_its_workers_node(cluster, inputs, tmp_path, ray_session):
    """The workers, on the worker nodes, get their rows from the driver (they may not see its
    paths); the one whose node is lost restarts on the other from its last checkpoint."""
    assert main(["suite", "--out", str(inputs / "suite"), "--per-task", "40",
                 "--set", "tasks=[wordnet-animal-plant]"]) == 0
    out = tmp_path / "lora"
    epochs = 3
    driver = subprocess.Popen(
        [str(BIN / "sift"), "train-lora", "--data", str(inputs / "suite"), "--model", "tiny-llama", "--out", str(out),
         "--set", f"epochs={epochs}", "--set", "steps_per_epoch=300", "--set", "batch_size=4"],  # epochs of ~8 s
        cwd=ROOT, env={**os.environ, **CLIENT_ENV, "RAY_ADDRESS": cluster.address}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        # Once the first epoch's checkpoint is registered (Ray Train's snapshot of its checkpoints
        # is written after the report), kill the node that runs the worker.
        deadline = time.monotonic() + 120
        registered = []
        while not registered and time.monotonic() < deadline and driver.poll() is None:
            registered = list((out / "ray").glob("train-lora-*/checkpoint_manager_snapshot.json"))
            time.sleep(0.1)
        assert registered, "no checkpoint within 120 s" + (
            "" if driver.poll() is None else ": " + driver.communicate()[0][-3000:])
        workers = set(_train_worker_pids())
        hosts = [node for node in cluster.nodes if workers & set(node.pids())]
        assert [node.name for node in hosts] in (["worker-1"], ["worker-2"]), hosts  # never the head (0 CPUs)
        cluster.kill(hosts[0])
        killed_at = time.monotonic()
        output, _ = driver.communicate(timeout=240)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, output[-4000:]
    report = json.loads((out / "train.json").read_text())
    assert [m["epoch"] for m in report["history"]] == list(range(epochs))
    # The epochs after the loss were trained by an attempt that started from a checkpoint
    # (start_epoch > 0), not from step 0.
    assert report["history"][-1]["start_epoch"] >= 1, report["history"]
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    print(f"\nfinished {time.monotonic() - killed_at:.1f} s after the node was killed; (epoch, start_epoch): "
          f"{[(m['epoch'], m['start_epoch']) for m in report['history']]}")
