"""Feature stores on local disk vs object storage, side by side in one run. Prints one JSON object.

1. Storage alone: a synthetic store (no model) written shard by shard, then read back whole
   (rows + vectors), streamed (iter_batches) and gathered at random rows.
2. `embed` (MiniLM) of the same rows into a fresh local store and a fresh S3 store, alternating.

Needs an S3 endpoint in the environment, e.g. moto's server on loopback:

    .venv/bin/moto_server -H 127.0.0.1 -p 5555 &
    AWS_ENDPOINT_URL=http://127.0.0.1:5555 AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x AWS_REGION=us-east-1 \\
        python jobs/bench/store_s3.py --uri s3://sift-bench/run1

Medians over --repeats (--embed-repeats for embed); ratios are S3 / local.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import polars as pl
import pyarrow.fs as pafs

from engine import storage
from engine.config import EmbedConfig
from engine.data import corpora
from engine.features.embed import embed
from engine.features.store import FeatureStore, StoreSpec


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def synthetic(root: str, rows: int, shard_rows: int, dim: int) -> None:
    vectors = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    spec = StoreSpec(kind="embeddings", fingerprint={"source": "bench"}, dim=dim, dtype="float32", seed=None,
                     rows=rows, shard_rows=shard_rows)
    store = FeatureStore.prepare(root, spec, force=True)
    for k in range(spec.num_shards):
        start, stop = store.shard_range(k)
        store.write_shard(k, pl.DataFrame({"id": [str(i) for i in range(start, stop)]}), vectors[start:stop],
                          pl.DataFrame(schema={"id": pl.String, "reason": pl.String}))


def reads(root: str, rows: int) -> dict[str, float]:
    gather = np.random.default_rng(1).choice(rows, size=100, replace=False)
    return {
        "open_rows_vectors_s": timed(lambda: (FeatureStore(root).rows(), np.asarray(FeatureStore(root).vectors()))),
        "iter_batches_s": timed(lambda: sum(len(b) for b in FeatureStore(root).vectors().iter_batches(8192))),
        "gather_100_s": timed(lambda: FeatureStore(root).vectors()[gather]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", required=True, help="an s3:// prefix to write under (its bucket is created)")
    parser.add_argument("--rows", type=int, default=20_000, help="rows of the synthetic store")
    parser.add_argument("--shard-rows", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--embed-rows", type=int, default=300, help="0: skip the embed comparison")
    parser.add_argument("--repeats", type=int, default=3, help="storage-only repeats")
    parser.add_argument("--embed-repeats", type=int, default=1, help="embed repeats (each starts actors and MiniLM)")
    args = parser.parse_args()
    uri = storage.validate_uri(args.uri)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    pafs.S3FileSystem(endpoint_override=endpoint, region=os.environ.get("AWS_REGION", "us-east-1"),
                      allow_bucket_creation=True).create_dir(uri.split("://", 1)[1].split("/", 1)[0])
    local = tempfile.mkdtemp(prefix="sift-bench-store-")

    places = {"local": os.path.join(local, "synthetic"), "s3": storage.join(uri, "synthetic")}
    storage_runs: dict[str, list[dict[str, float]]] = {"local": [], "s3": []}
    for _ in range(args.repeats):
        for place, root in places.items():
            run = {"write_s": timed(lambda: synthetic(root, args.rows, args.shard_rows, args.dim))}
            storage_runs[place].append(run | reads(root, args.rows))


    def medians(runs: list[dict[str, float]]) -> dict[str, float]:
        return {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}

    store = {place: medians(runs) for place, runs in storage_runs.items()}
    report = {
        "synthetic_store": {"rows": args.rows, "dim": args.dim, "shard_rows": args.shard_rows,
                            "mib": round(args.rows * args.dim * 4 / 2**20, 1), **store,
                            "ratio_s3_local": {k: round(store["s3"][k] / store["local"][k], 2) for k in store["s3"]}},
        "repeats": args.repeats, "load_avg_1m": os.getloadavg()[0],
    }
    if args.embed_rows:
        data = os.path.join(local, "examples.parquet")
        corpora.load("tweets").head(args.embed_rows).select("id", "text", "task", "label").write_parquet(data)
        runs: dict[str, list[float]] = {"local": [], "s3": []}
        for _ in range(args.embed_repeats):
            for place, root in {"local": os.path.join(local, "emb"), "s3": storage.join(uri, "emb")}.items():
                cfg = EmbedConfig(data=data, out=root, shard_rows=64, force=True, actors=1)
                runs[place].append(timed(lambda: embed(cfg)))
        local_s, s3_s = statistics.median(runs["local"]), statistics.median(runs["s3"])
        report["embed"] = {"rows": args.embed_rows, "shard_rows": 64, "repeats": args.embed_repeats,
                           "local_s": round(local_s, 2), "s3_s": round(s3_s, 2), "ratio_s3_local": round(s3_s / local_s, 2)}
    storage.delete(uri)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
