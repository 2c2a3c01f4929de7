"""sift on a real multi-node Ray: a head and two worker nodes on this machine (`ray start`
processes this module owns, engine.local_cluster), driven as a user would: `sift featurize embed
--address HEAD` in a process of its own (this pytest process already runs an embedded Ray).

- the work of one featurize run is spread over both worker nodes (the head has no CPUs), and its
  vectors equal a single-node run's;
- a worker node killed mid-run (every process of it, at once): the run completes, every id
  exactly once, vectors equal to the single-node run;
- a worker node whose view of the output folder differs (its own mount namespace, a tmpfs over
  the output's parent): the run is refused before any work with one line and exit code 2;
- such a node joining after that check (a GPU worker, started once the run waits for a GPU, as
  an autoscaler does): its actor stops the run with the same line before writing anything.

Only the nodes started here are stopped (never `ray stop`), also when a test fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from engine.config import EmbedConfig
from engine.data import corpora
from engine.features.embed import embed
from engine.features.store import FeatureStore
from engine.local_cluster import CLIENT_ENV, LocalCluster
from engine.shared import PROBE_PREFIX

SIFT = Path(sys.executable).parent / "sift"
ROWS, SHARD_ROWS = 960, 40  # 24 shards: enough left to do when a node dies after its first one
EMBED = dict(model="tiny-llama", shard_rows=SHARD_ROWS, actors=2)


@pytest.fixture(scope="module")
def cluster():
    # Short: the nodes' unix sockets live under it (108-byte path limit).
    with LocalCluster(Path(tempfile.mkdtemp(prefix="sift-mn-", dir="/tmp"))) as local:
        local.start(workers=2, worker_cpus=1)
        yield local


@pytest.fixture(scope="module")
def tweets(tmp_path_factory) -> Path:
    """An examples file of real tweets (what `sift featurize embed --data` reads)."""
    folder = tmp_path_factory.mktemp("tweets")
    frame = corpora.load("tweets").sample(ROWS, seed=1)
    frame.select(pl.Series("id", [f"t{i}" for i in range(ROWS)]), "text").write_parquet(folder / "examples.parquet")
    return folder


@pytest.fixture(scope="module")
def single_node(tweets, tmp_path_factory, ray_session) -> FeatureStore:
    """The same featurization on the embedded one-node Ray of this pytest process."""
    store, _ = embed(EmbedConfig(data=tweets, out=tmp_path_factory.mktemp("single") / "store", **EMBED))
    return store


def sift_embed(cluster: LocalCluster, data: Path, out: Path, *flags: str) -> subprocess.Popen:
    """`sift featurize embed ... --address HEAD [flags]` as its own process group (killed if left over)."""
    command = [str(SIFT), "featurize", "embed", "--data", str(data), "--out", str(out), "--model", EMBED["model"],
               "--set", f"shard_rows={SHARD_ROWS}", "--actors", str(EMBED["actors"]), "--address", cluster.address,
               *flags]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | CLIENT_ENV
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(driver: subprocess.Popen, timeout_s: float = 120) -> tuple[str, str]:
    try:
        return driver.communicate(timeout=timeout_s)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()


def assert_same(store: FeatureStore, reference: FeatureStore) -> None:
    ids = store.rows()["id"].to_list()
    assert len(ids) == len(set(ids)) == ROWS  # every id exactly once
    assert store.rows().equals(reference.rows())
    assert np.array_equal(np.asarray(store.vectors()), np.asarray(reference.vectors()))


def test_featurize_spreads_over_the_worker_nodes(cluster, tweets, single_node, tmp_path):
    workers = {cluster.node_id(node) for node in cluster.nodes[1:]}
    out = tmp_path / "store"
    stdout, stderr = finish(sift_embed(cluster, tweets, out))
    assert "rows in     │ 960" in stdout, stdout + stderr[-3000:]

    store = FeatureStore(out)
    writers = Counter(store.shard_nodes())
    assert set(writers) == workers, writers  # both workers worked; the head (no CPUs) did not
    assert_same(store, single_node)
    assert not [p for p in out.iterdir() if p.name.startswith(PROBE_PREFIX)]  # the shared check cleaned up


def test_a_worker_node_lost_mid_run(cluster, tweets, single_node, tmp_path):
    victim = cluster.nodes[2]
    victim_id, survivor_id = cluster.node_id(victim), cluster.node_id(cluster.nodes[1])
    out = tmp_path / "store"
    driver = sift_embed(cluster, tweets, out)
    try:
        done_at_kill = None
        deadline = time.monotonic() + 120
        while done_at_kill is None and driver.poll() is None and time.monotonic() < deadline:
            if (out / "manifest.json").is_file():
                store = FeatureStore(out)
                done = [k for k in range(store.spec.num_shards) if store.done(k)]
                if any(store.shard_node(k) == victim_id for k in done):
                    cluster.kill(victim)  # every process of the node, at once
                    done_at_kill = len(done)
            time.sleep(0.05)
    finally:
        stdout, stderr = finish(driver)
    assert done_at_kill is not None, "the victim node never wrote a shard: " + stdout + stderr[-3000:]
    assert driver.returncode == 0, stdout + stderr[-3000:]
    assert victim_id not in cluster.alive_node_ids().values()

    store = FeatureStore(out)
    writers = Counter(store.shard_nodes())
    assert done_at_kill < store.spec.num_shards - 2, "the node died too late to matter"
    # The survivor did the rest, and redid any shard whose task had not reported back when the
    # victim died (the same rows, rewritten atomically).
    assert writers[survivor_id] >= store.spec.num_shards - done_at_kill
    assert set(writers) <= {victim_id, survivor_id}
    assert_same(store, single_node)


def private_mounts_work() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def blind_wrapper(parent: Path, *flags: str) -> list[str]:
    """A `ray start` wrapper: the node's processes see an empty tmpfs at `parent` (the driver's
    files are not there); `flags` are added to its `ray start`."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs sift-blind "$0" && exec "$@" ' + " ".join(flags), str(parent)]


def lose(cluster: LocalCluster, node) -> None:
    """Kill `node` and wait (~3 s) until the head holds it dead: a next run's check asks every
    node the head holds alive, and one killed a moment ago would give no answer."""
    cluster.kill(node)
    deadline = time.monotonic() + 30
    while node.node_manager_port in cluster.alive_node_ids() and time.monotonic() < deadline:
        time.sleep(0.2)


def not_shared_line(out: Path, blind: str) -> str:
    return (f"sift: error: the output folder {out} is not shared by every node of the Ray cluster: {blind} cannot "
            "read a file the driver wrote there; write to object storage (an s3://bucket/path or gs://bucket/path "
            "URI) or to a folder on a mount every node shares")


@pytest.mark.skipif(not private_mounts_work(), reason="needs `unshare --mount` (root or user namespaces)")
def test_an_output_folder_not_every_node_sees_is_refused(cluster, tweets, tmp_path):
    parent = tmp_path / "outputs"
    parent.mkdir()
    out = parent / "store"
    blind = cluster.add_worker(1, wrapper=blind_wrapper(parent))
    try:
        nodes = len(cluster.alive_node_ids())
        driver = sift_embed(cluster, tweets, out)
        stdout, stderr = finish(driver)
    finally:
        lose(cluster, blind)
    assert driver.returncode == 2, stdout + stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("sift: error:")]
    assert errors == [not_shared_line(out, f"1 of {nodes} nodes")], stdout + stderr[-3000:]
    assert not (out / "shards").exists() and not (out / "manifest.json").exists()  # refused before any work
    assert not [p for p in out.iterdir() if p.name.startswith(PROBE_PREFIX)]


@pytest.mark.skipif(not private_mounts_work(), reason="needs `unshare --mount` (root or user namespaces)")
def test_a_node_joining_after_the_check_that_does_not_see_the_output_stops_the_run(cluster, tweets, tmp_path):
    parent = tmp_path / "outputs"
    parent.mkdir()
    out = parent / "store"
    # One actor asking for a GPU, which no node has yet: the driver's check passes (every node
    # alive sees `parent`), the store is prepared, and the run waits until a GPU node joins.
    driver = sift_embed(cluster, tweets, out, "--actors", "1", "--set", "gpus_per_actor=1")
    blind = None
    try:
        deadline = time.monotonic() + 60
        while not (out / "manifest.json").is_file() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (out / "manifest.json").is_file(), "the run never started" + (
            "" if driver.poll() is None else ": " + driver.communicate()[1][-3000:])
        blind = cluster.add_worker(1, wrapper=blind_wrapper(parent, "--num-gpus", "1"))  # a fake GPU: CPU torch
        blind_id = cluster.node_id(blind)
        stdout, stderr = finish(driver)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        if blind is not None:
            lose(cluster, blind)
    assert driver.returncode == 2, stdout + stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("sift: error:")]
    assert errors == [not_shared_line(out, f"node {blind_id}")], stdout + stderr[-3000:]
    assert not (out / "shards").exists()  # its only actor wrote nothing, here or on its node's tmpfs
    assert not [p for p in out.iterdir() if p.name.startswith(PROBE_PREFIX)]
