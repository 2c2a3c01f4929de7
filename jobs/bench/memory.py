"""Driver memory as the data grows (issue 13): peak RSS of the driver process of `select-pool`
and of `ingest` at two sizes, and the ratio large/small (flat means <= 1.3). Prints one JSON object.

Kinds: `select` (GOT-D over a synthetic 384-d embedding store), `domain` (the same with the
domain test: keep the 8 of 32 sources closest to the target), `dsir` (DSIR over an ingest folder
of short texts), `ingest` (short jsonl rows), `estimator` (`subsets.load` of a synthetic 400-d
gradient store, then one batched fit of ESTIMATOR_SUBSETS subsets: how `select-tasks`, `group`
and `estimate` begin; no Ray). The estimator's fit reads every training and validation row (see
`load` in engine/select/tasks/subsets.py), so its gradients (`gradients_mb`) grow with the rows by
necessity; what must stay flat is the peak beyond them: `load_beyond_gradients_mb` up to the end
of `load`, `beyond_gradients_mb` over the fit too (and their ratios).

    python jobs/bench/memory.py                                   # 1M and 4M, this checkout
    python jobs/bench/memory.py --sizes 500000,2000000 --roots /tmp/old-checkout,.
    python jobs/bench/memory.py --kinds domain,dsir --data /tmp/membench   # data kept for the next run
    python jobs/bench/memory.py --kinds estimator --sizes 100000,200000,400000 --roots /tmp/old-checkout,.

Each measurement is a fresh child process (`--child`) with its own embedded Ray, importing
`engine` from the checkout given in --roots (so an older commit, e.g. `git worktree add
/tmp/old HEAD~3`, runs on the same data); its peak RSS is the child's own `ru_maxrss`: the driver
only, not Ray's workers (they hold blocks for as long as a task runs, whatever the data size).
RSS also counts the pages of Ray's shared-memory object store the driver has read blocks from
(bounded by the store's size, not the driver's to free), so the peaks of RssAnon (the driver's
own heap), RssShmem and RssFile are reported beside it, and both ratios.
The data is written once per size into --data (a temporary folder by default, deleted after):
4M x 384 float32 is 6 GB; check `df -h` first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DIM = 384
SHARD_ROWS = 65_536
TARGET_ROWS = 500
BUDGET = 10_000
INGEST_FILES = 8
DOMAIN_KEEP = 8
GRADS_DIM = 400  # GradsConfig's default projection
GRADS_SHARD_ROWS = 1024  # FeaturizeConfig's default
GRADS_TASKS = 8
ESTIMATOR_SUBSETS = 32


def write_store(root: Path, rows: int, seed: int, prefix: str) -> None:
    """A store of unit vectors around 32 centres, written shard by shard (never whole in memory)."""
    import numpy as np
    import polars as pl

    from engine.features.store import FeatureStore, StoreSpec

    spec = StoreSpec(kind="embeddings", fingerprint={"source": f"memory-bench-{prefix}-{rows}-{seed}"}, dim=DIM,
                     dtype="float32", seed=None, rows=rows, shard_rows=SHARD_ROWS)
    store = FeatureStore.prepare(root, spec, force=True)
    centers = np.random.default_rng(0).normal(size=(32, DIM)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True) * 4
    rng = np.random.default_rng(seed)
    for k in range(spec.num_shards):
        start, stop = store.shard_range(k)
        labels = rng.integers(0, 32, size=stop - start)
        x = centers[labels] + rng.standard_normal((stop - start, DIM), dtype=np.float32) * np.float32(0.04)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = pl.DataFrame({"id": [f"{prefix}{i}" for i in range(start, stop)],
                            "task": [f"c{c:02d}" for c in labels]})
        store.write_shard(k, ids, x, pl.DataFrame(schema={"id": pl.String, "reason": pl.String}))


def write_jsonl(folder: Path, rows: int) -> None:
    """INGEST_FILES jsonl files of short rows: ~1% repeat an earlier id, ~1% have empty text."""
    folder.mkdir(parents=True, exist_ok=True)
    per_file = -(-rows // INGEST_FILES)
    for f in range(INGEST_FILES):
        with (folder / f"part-{f}.jsonl").open("w") as out:
            for i in range(f * per_file, min(rows, (f + 1) * per_file)):
                text = "" if i % 97 == 5 else f"short row {i} about topic {i % 13}"
                key = i - 50_000 if i % 101 == 7 and i >= 50_000 else i
                out.write(json.dumps({"id": f"r{key}", "text": text, "task": f"t{i % 5}", "label": "pos"}) + "\n")


def write_texts(folder: Path, rows: int, seed: int, prefix: str) -> None:
    """An ingest folder (examples.parquet, quarantine.parquet, summary.json) of short texts of 32
    topics, written in row groups (never all rows as Python objects)."""
    import numpy as np
    import polars as pl
    import pyarrow.parquet as pq

    from engine.data.schema import QUARANTINE_SCHEMA, SCHEMA

    folder.mkdir(parents=True, exist_ok=True)
    words = pl.Series([f"w{i}" for i in range(400)])
    rng = np.random.default_rng(seed)
    with pq.ParquetWriter(folder / "examples.parquet", SCHEMA) as writer:
        for start in range(0, rows, 1 << 18):
            n = min(rows, start + (1 << 18)) - start
            topic = rng.integers(0, 32, n)
            picks = {f"w{j}": words.gather(rng.integers(0, 400, n)) for j in range(4)}
            frame = pl.DataFrame({"i": pl.int_range(start, start + n, eager=True), "topic": topic, **picks}).select(
                id=pl.format("{}{}", pl.lit(prefix), "i"),
                text=pl.format("topic {} says {} {} {} {}", "topic", *picks),
                task=pl.format("c{}", "topic"), label=pl.lit(None, pl.String), split=pl.lit(None, pl.String),
                meta=pl.lit(None, pl.String))
            writer.write_table(frame.to_arrow().cast(SCHEMA))
    pq.write_table(QUARANTINE_SCHEMA.empty_table(), folder / "quarantine.parquet")
    (folder / "summary.json").write_text(json.dumps({"out": str(folder), "rows_in": rows, "rows_out": rows,
                                                     "rows_quarantined": 0}))


def write_grads(root: Path, examples: Path, rows: int, seed: int = 3) -> None:
    """A gradient store of GRADS_TASKS tasks (rows of a task share a mean direction) and its
    examples file: 80% training, 10% validation, 10% test rows (test rows are in the store but
    never in a fit), written shard by shard."""
    import numpy as np
    import polars as pl

    from engine.features.store import FeatureStore, StoreSpec

    spec = StoreSpec(kind="grads", fingerprint={"source": f"memory-bench-grads-{rows}-{seed}"}, dim=GRADS_DIM,
                     dtype="float32", seed=0, rows=rows, shard_rows=GRADS_SHARD_ROWS)
    store = FeatureStore.prepare(root, spec, force=True)
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(GRADS_TASKS, GRADS_DIM)).astype(np.float32) / np.float32(GRADS_DIM ** 0.5)
    tasks = rng.integers(0, GRADS_TASKS, size=rows)
    split = np.array(["train", "validation", "test"])[rng.choice(3, size=rows, p=[0.8, 0.1, 0.1])]
    ids = [f"g{i}" for i in range(rows)]
    names = [f"t{t}" for t in tasks]
    for k in range(spec.num_shards):
        start, stop = store.shard_range(k)
        x = means[tasks[start:stop]] + rng.standard_normal((stop - start, GRADS_DIM), dtype=np.float32) * np.float32(0.05)
        f = rng.normal(size=stop - start).astype(np.float32)
        store.write_shard(k, pl.DataFrame({"id": ids[start:stop], "task": names[start:stop],
                                           "label": ["yes"] * (stop - start), "f": f}), x,
                          pl.DataFrame(schema={"id": pl.String, "reason": pl.String}))
    pl.DataFrame({"id": ids, "text": "a short example", "task": names, "label": "yes", "split": split}) \
        .write_parquet(examples)


def prepare(data: Path, rows: int, kinds: list[str]) -> dict[str, Path]:
    paths = {"pool": data / f"pool-{rows}", "target": data / "target", "ingest": data / f"ingest-{rows}",
             "texts": data / f"texts-{rows}", "target_texts": data / "target-texts",
             "grads": data / f"grads-{rows}", "examples": data / f"grads-{rows}-examples.parquet"}
    if "estimator" in kinds and not paths["examples"].is_file():
        write_grads(paths["grads"], paths["examples"], rows)
    if {"select", "domain"} & set(kinds) and not (paths["pool"] / "manifest.json").is_file():
        write_store(paths["pool"], rows, seed=1, prefix="p")
    if not (paths["target"] / "manifest.json").is_file():
        write_store(paths["target"], TARGET_ROWS, seed=2, prefix="t")
    if "ingest" in kinds and not paths["ingest"].is_dir():
        write_jsonl(paths["ingest"], rows)
    if "dsir" in kinds and not (paths["texts"] / "summary.json").is_file():
        write_texts(paths["texts"], rows, seed=1, prefix="p")
    if "dsir" in kinds and not (paths["target_texts"] / "summary.json").is_file():
        write_texts(paths["target_texts"], TARGET_ROWS, seed=2, prefix="t")
    return paths


class StatusPeaks:
    """Peaks of this process's resident memory by kind, sampled from /proc/self/status: RssAnon
    (its own heap: what grows if the driver holds rows), RssShmem (pages of Ray's shared-memory
    object store it has touched while reading blocks: bounded by the store's size, shared with
    the workers) and RssFile (mapped files: libraries, and the store shard a pass maps at a time;
    rows gathered by index are read, not mapped)."""

    FIELDS = ("RssAnon", "RssShmem", "RssFile")

    def __init__(self, every_s: float = 0.05):
        self.peaks = dict.fromkeys(self.FIELDS, 0)
        self.every_s, self._stop = every_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/self/status") as f:
                for line in f:
                    name, _, value = line.partition(":")
                    if name in self.peaks:
                        self.peaks[name] = max(self.peaks[name], int(value.split()[0]) * 1024)
            time.sleep(self.every_s)

    def __enter__(self) -> "StatusPeaks":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def child(kind: str, source: str, target: str, out: str) -> None:
    """One measured run in this process: prints wall seconds and this process's peak RSS."""
    from engine import runtime
    from engine.config import RuntimeConfig

    if kind != "estimator":  # the estimator's driver reads and fits without Ray
        runtime.start(RuntimeConfig(num_cpus=2))
    with StatusPeaks() as peaks:
        result, wall = _measured(kind, source, target, out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    kinds = {f"peak_{name[3:].lower()}_mb": round(value / 2**20) for name, value in peaks.peaks.items()}
    print("RESULT " + json.dumps({**result, "wall_s": round(wall, 1), "peak_rss_mb": round(peak / 2**20), **kinds}))


def _measured(kind: str, source: str, target: str, out: str) -> tuple[dict, float]:
    from engine.config import IngestConfig, SelectPoolConfig

    started = time.perf_counter()
    if kind in ("select", "domain", "dsir"):
        from engine.select.pool.select import select_pool

        method = {"method": "dsir"} if kind == "dsir" else {"domain_keep": DOMAIN_KEEP} if kind == "domain" else {}
        report = select_pool(SelectPoolConfig(pool=source, target=target, budget=BUDGET, out=out, support_size=2_000,
                                              threshold=0.1, **method))
        result = {"scored": report["counts"]["scored"], "converged": report["details"].get("converged"),
                  "kept": report["details"].get("domains", {}).get("kept")}
    elif kind == "estimator":
        from engine.select.tasks import subsets

        data = subsets.load(source, target)
        loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        load_s = time.perf_counter() - started
        sets = subsets.random_subsets(len(data.tasks) - 1, ESTIMATOR_SUBSETS, 0.5, seed=0)
        est = subsets.estimate(data, data.tasks[:1], sets, data.tasks[1:], lam=1.0)  # lam: few Newton steps
        result = {"rows": int(data.G.shape[0]), "gradients_mb": round(data.G.nbytes / 2**20), "load_s": round(load_s, 1),
                  "load_peak_rss_mb": round(loaded / 2**20), "mean_loss": float(est.loss.mean())}
    else:
        from engine.data.ingest import ingest

        summary = ingest(IngestConfig(inputs=[source], out=out))
        result = {"rows_in": summary.rows_in, "rows_out": summary.rows_out, "reasons": summary.reasons}
    return result, time.perf_counter() - started


def measure(root: Path, kind: str, paths: dict[str, Path], out: Path) -> dict:
    source, target = {"ingest": (paths["ingest"], paths["target"]),
                      "dsir": (paths["texts"], paths["target_texts"]),
                      "estimator": (paths["grads"], paths["examples"])}.get(kind, (paths["pool"], paths["target"]))
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", kind, str(source),
                           str(target), str(out)], cwd=root, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{kind} at {root} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,4000000", help="small,large rows")
    parser.add_argument("--roots", default=".", help="comma-separated checkouts to measure (engine imported from each)")
    parser.add_argument("--kinds", default="select,ingest", help="comma-separated: select, domain, dsir, ingest, estimator")
    parser.add_argument("--data", help="folder for the generated data (kept); default a temporary folder (deleted)")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "SOURCE", "TARGET", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    roots = [Path(r).resolve() for r in args.roots.split(",")]
    data = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="sift-memory-"))
    kinds = args.kinds.split(",")
    result: dict = {"sizes": sizes, "dim": DIM, "target_rows": TARGET_ROWS, "budget": BUDGET, "runs": {}}
    try:
        for rows in sizes:
            started = time.perf_counter()
            paths = prepare(data, rows, kinds)
            result.setdefault("generate_s", {})[rows] = round(time.perf_counter() - started, 1)
            for kind in kinds:
                for root in roots:  # side by side at each size, so machine noise hits both alike
                    run = measure(root, kind, paths, data / "out")
                    result["runs"].setdefault(f"{kind} @ {root}", {})[rows] = run
    finally:
        if not args.data:
            shutil.rmtree(data, ignore_errors=True)
    small, large = sizes[0], sizes[-1]
    for runs in result["runs"].values():
        runs["rss_ratio"] = round(runs[large]["peak_rss_mb"] / runs[small]["peak_rss_mb"], 2)
        runs["anon_ratio"] = round(runs[large]["peak_anon_mb"] / runs[small]["peak_anon_mb"], 2)
        runs["wall_ratio"] = round(runs[large]["wall_s"] / runs[small]["wall_s"], 2)
        if "gradients_mb" in runs[small]:  # the estimator: the peaks beyond the rows every fit reads
            for size in sizes:
                runs[size]["beyond_gradients_mb"] = runs[size]["peak_rss_mb"] - runs[size]["gradients_mb"]
                runs[size]["load_beyond_gradients_mb"] = runs[size]["load_peak_rss_mb"] - runs[size]["gradients_mb"]
            for name in ("beyond_gradients", "load_beyond_gradients"):
                runs[f"{name}_ratio"] = round(runs[large][f"{name}_mb"] / runs[small][f"{name}_mb"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
