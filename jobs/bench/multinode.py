"""Multi-node featurize benchmark: `sift featurize embed` on a local Ray cluster (a head with no
CPUs and worker nodes of one CPU each, engine.local_cluster) with 1, then 2 worker nodes, on the
same rows. Prints one JSON object.

    python jobs/bench/multinode.py                           # minilm, 3,000 tweets, 2 repeats
    python jobs/bench/multinode.py --model tiny-llama --rows 6000 --repeats 3

Each run is the command a user submits (`--address` of the head) into a fresh store, with one
actor per worker node (`--actors N`: sift's default pool keeps a CPU free for readers, which on
one-CPU nodes means a single actor). Per run: the command's wall time, the runner's rows/s
(actor start and model load included) and the steady rows/s between the first and the last
shard written (start-up excluded); medians over the repeats. Nodes on one machine share its
cores: with two one-CPU workers on a two-core machine, 2 nodes can at most double 1 node.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import polars as pl

from engine.data import corpora
from engine.executor import read_marker
from engine.features.store import FeatureStore
from engine.local_cluster import CLIENT_ENV, LocalCluster

SIFT = Path(sys.executable).parent / "sift"


def featurize(cluster: LocalCluster, data: Path, out: Path, args: argparse.Namespace, workers: int) -> dict:
    command = [str(SIFT), "featurize", "embed", "--data", str(data), "--out", str(out), "--model", args.model,
               "--set", f"shard_rows={args.shard_rows}", "--actors", str(workers), "--address", cluster.address]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | CLIENT_ENV
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"sift featurize embed failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = read_marker(str(out)).result
    store = FeatureStore(out)
    finished = sorted((out / "shards").glob("?????.parquet"), key=lambda f: f.stat().st_mtime)
    first, last = finished[0].stat().st_mtime, finished[-1].stat().st_mtime
    ranges = [store.shard_range(int(f.stem)) for f in finished[1:]]  # the shards written after the first
    steady_rows = sum(stop - start for start, stop in ranges)
    nodes = Counter(store.shard_nodes())
    return {"wall_s": round(wall, 1), "runner_s": result["seconds_now"],
            "rows_per_s": round(result["rows_now"] / result["seconds_now"], 1),
            "steady_rows_per_s": round(steady_rows / max(last - first, 1e-3), 1),
            "shards_per_node": sorted(nodes.values(), reverse=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--shard-rows", dest="shard_rows", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sift-bn-", dir="/tmp"))  # short: Ray's socket paths
    data = work / "data"
    data.mkdir()
    frame = corpora.load("tweets").sample(args.rows, seed=0)
    frame.select(pl.Series("id", [f"t{i}" for i in range(args.rows)]), "text").write_parquet(data / "examples.parquet")

    runs: dict[int, list[dict]] = {}
    with LocalCluster(work / "c") as cluster:
        cluster.start(workers=1, worker_cpus=1)
        for workers in (1, 2):
            if workers == 2:
                cluster.add_worker(1)
            runs[workers] = [featurize(cluster, data, work / f"store-{workers}-{r}", args, workers)
                             for r in range(args.repeats)]
    shutil.rmtree(work)

    def median(workers: int, key: str) -> float:
        return round(statistics.median(run[key] for run in runs[workers]), 1)

    print(json.dumps({
        "model": args.model, "rows": args.rows, "shard_rows": args.shard_rows, "repeats": args.repeats,
        "cluster": "local: head (0 CPUs) + worker nodes of 1 CPU each, one machine of "
                   f"{os.cpu_count()} cores",
        "runs": {f"{w}_worker_nodes": r for w, r in runs.items()},
        "median": {f"{w}_worker_nodes": {k: median(w, k) for k in ("wall_s", "rows_per_s", "steady_rows_per_s")}
                   for w in runs},
        "speedup_2_vs_1": {k: round(median(2, k) / median(1, k), 2) for k in ("rows_per_s", "steady_rows_per_s")},
    }, indent=2))


if __name__ == "__main__":
    main()
