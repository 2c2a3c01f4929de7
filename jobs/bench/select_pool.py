"""GOT-D at scale on the embedded Ray: a synthetic mixture of Gaussians in 384-d (L2-normalised
like sentence embeddings), written as a feature store, then `select_pool`. Prints one JSON object.

    python jobs/bench/select_pool.py                      # 1M candidates, 10k target, k = 50k
    python jobs/bench/select_pool.py --rows 200000 --compare-rows 50000

Targets (2 cores): <= 120 s wall and <= 4 GB peak RSS (driver + Ray workers) at 1M x 384;
sample + c-transform vs the full solve at --compare-rows: top-k overlap >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import psutil

from engine import runtime
from engine.config import SelectPoolConfig
from engine.features.store import FeatureStore, StoreSpec
from engine.select.pool.select import select_pool

DIM = 384
COMPONENTS = 32


def mixture(rows: int, weights: np.ndarray, centers: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(centers), size=rows, p=weights / weights.sum())
    x = centers[labels] + rng.normal(scale=0.04, size=(rows, centers.shape[1])).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def write_store(root: Path, vectors: np.ndarray, labels: np.ndarray, prefix: str, shard_rows: int = 65536) -> Path:
    spec = StoreSpec(kind="embeddings", fingerprint={"source": f"synthetic-{prefix}-{len(vectors)}"}, dim=DIM,
                     dtype="float32", seed=None, rows=len(vectors), shard_rows=shard_rows)
    store = FeatureStore.prepare(root, spec, force=True)
    for k in range(spec.num_shards):
        start, stop = store.shard_range(k)
        rows = pl.DataFrame({"id": [f"{prefix}{i}" for i in range(start, stop)],
                             "task": [f"c{c:02d}" for c in labels[start:stop]]})
        store.write_shard(k, rows, vectors[start:stop], pl.DataFrame(schema={"id": pl.String, "reason": pl.String}))
    return root


class PeakRSS:
    """Peak memory of this process and all its children (Ray's daemons and workers), sampled.

    Both sums are kept: RSS counts a shared page (libraries, the object store, memory-mapped
    shards) once per process that touches it; PSS splits it between them, so the PSS sum is the
    memory the machine really spends.
    """

    def __init__(self, every_s: float = 0.3):
        self.peak, self.peak_pss, self.every_s, self._stop = 0, 0, every_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            rss = pss = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
                except psutil.Error:
                    pass
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            time.sleep(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run(tmp: Path, rows: int, target_rows: int, budget: int, full_max: int, support: int, threshold: float,
        centers: np.ndarray, name: str) -> tuple[dict, pl.DataFrame]:
    weights_pool = np.linspace(1.0, 0.05, COMPONENTS) ** 2  # skewed pool
    weights_target = np.zeros(COMPONENTS)
    weights_target[[3, 11, 20, 27, 31]] = 1.0  # target over a few components, some rare in the pool
    started = time.perf_counter()
    pool, labels = mixture(rows, weights_pool, centers, seed=1)
    pool_store = write_store(tmp / f"{name}-pool", pool, labels, "p")
    del pool
    target, target_labels = mixture(target_rows, weights_target, centers, seed=2)
    target_store = write_store(tmp / f"{name}-target", target, target_labels, "t")
    generate_s = time.perf_counter() - started
    cfg = SelectPoolConfig(pool=str(pool_store), target=str(target_store), budget=budget, out=tmp / f"{name}-out",
                           full_max=full_max, support_size=support, threshold=threshold)
    with PeakRSS() as rss:
        started = time.perf_counter()
        report = select_pool(cfg)
        wall = time.perf_counter() - started
    scores = pl.read_parquet(tmp / f"{name}-out" / "scores.parquet")
    in_target = scores.filter(pl.col("selected"))["task"].is_in([f"c{c:02d}" for c in (3, 11, 20, 27, 31)]).mean()
    return {
        "rows": rows, "target_rows": target_rows, "budget": budget, "dim": DIM,
        "wall_s": round(wall, 2), "generate_s": round(generate_s, 2),
        "peak_rss_sum_gb": round(rss.peak / 2**30, 2),
        "peak_pss_sum_gb": round(rss.peak_pss / 2**30, 2),
        "selected_from_target_components": round(float(in_target), 4),
        "details": report["details"],
    }, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--target-rows", type=int, default=10_000)
    parser.add_argument("--budget", type=int, default=50_000)
    parser.add_argument("--support", type=int, default=5_000)
    parser.add_argument("--compare-rows", type=int, default=100_000)
    parser.add_argument("--compare-target", type=int, default=2_000)
    parser.add_argument("--compare-threshold", type=float, default=1e-3)
    args = parser.parse_args()

    runtime.start()
    centers = np.random.default_rng(0).normal(size=(COMPONENTS, DIM)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True) * 4  # overlapping clusters after normalisation
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        result["scale"], _ = run(Path(tmp), args.rows, args.target_rows, args.budget, full_max=20_000,
                                 support=args.support, threshold=0.1, centers=centers, name="scale")
        if args.compare_rows:
            k = args.compare_rows // 20
            common = dict(centers=centers, threshold=args.compare_threshold)
            full, full_scores = run(Path(tmp), args.compare_rows, args.compare_target, k,
                                    full_max=args.compare_rows, support=args.support, name="full", **common)
            sampled, sampled_scores = run(Path(tmp), args.compare_rows, args.compare_target, k,
                                          full_max=1, support=args.support, name="sampled", **common)
            joined = full_scores.join(sampled_scores, on="id")
            top = lambda s: set(s.filter(pl.col("selected"))["id"])  # noqa: E731
            result["versus_full"] = {
                "rows": args.compare_rows, "target_rows": args.compare_target, "budget": k,
                "support": args.support, "threshold": args.compare_threshold,
                "full_wall_s": full["wall_s"], "sampled_wall_s": sampled["wall_s"],
                "topk_overlap": round(len(top(full_scores) & top(sampled_scores)) / k, 4),
                "spearman": round(joined.select(pl.corr("score", "score_right", method="spearman")).item(), 4),
                "full_converged": full["details"]["converged"], "sampled_converged": sampled["details"]["converged"],
            }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
