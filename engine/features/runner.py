"""Run a featurizer over every shard of a store on Ray Data: one actor pool, resumable.

The unit of work is a store shard: Ray Data gets one block per missing shard, an actor reads
that shard's rows from the examples file, featurizes them in micro-batches and writes the shard
itself (so vectors never pass through the driver). A killed actor is restarted by Ray Data and
its shard redone; an interrupted run leaves finished shards behind, and the rerun does the rest.

A local store on a cluster must be a folder every node shares. The executor checks the nodes
alive when the stage starts (engine/shared.py); an actor on a node that joined later (an
autoscaled GPU worker) checks for itself, on start, that it reads the probe the driver keeps in
the store for the run, and otherwise stops the run with the same one-line error before any work.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl

from engine import runtime, shared, storage
from engine.config import FeaturizeConfig
from engine.errors import SiftError
from engine.features.store import CONFIG, FeatureStore, StoreSpec

QUARANTINE_COLUMNS = {"id": pl.String, "reason": pl.String}


@dataclass
class Featurized:
    """A featurizer's answer for one frame of rows: kept rows with vectors, the rest with reasons."""

    rows: pl.DataFrame
    vectors: np.ndarray
    quarantine: pl.DataFrame


class Featurizer(Protocol):
    def __init__(self, cfg: Any, threads: int): ...
    def __call__(self, frame: pl.DataFrame) -> Featurized: ...


@dataclass
class RunStats:
    shards_total: int
    shards_done_before: int
    rows: int = 0
    quarantined: int = 0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def run(
    cfg: FeaturizeConfig,
    spec: StoreSpec,
    featurizer: type[Featurizer],
    examples: str | Path,
    progress: str,
    records: dict[str, Any] | None = None,
) -> tuple[FeatureStore, RunStats]:
    """Fill the store at cfg.out (a local folder or a URI) with `featurizer` over `examples`,
    skipping finished shards. `records`: JSON files (name -> value) the featurizers read, written
    beside the config once the store is known to match the spec."""
    import ray
    from tqdm.auto import tqdm

    if cfg.out is None:
        raise SiftError("featurize needs --out DIR for the feature store")
    store = FeatureStore.prepare(cfg.out, spec, force=cfg.force, replace_mismatch=cfg.replace_mismatch)
    # The full request, so later stages can rebuild the anchor (model, LoRA, projection) exactly,
    # from any working directory (Ray Tune and Train workers run elsewhere): paths made absolute.
    storage.write_text(store.path(CONFIG), _absolute_paths(cfg).model_dump_json(indent=2, exclude={"runtime"}))
    for name, value in (records or {}).items():
        storage.write_json(store.path(name), value)
    todo = store.missing_shards()
    stats = RunStats(shards_total=spec.num_shards, shards_done_before=spec.num_shards - len(todo))
    if not todo:
        return store, stats

    info = runtime.start(cfg.runtime)
    pool = runtime.actor_pool(info.cpus, info.gpus, max_actors=cfg.actors, min_actors=cfg.min_actors,
                              gpus_per_actor=cfg.gpus_per_actor)
    if pool.num_gpus and info.gpus < pool.num_gpus * (pool.min_size or pool.size):
        print(f"featurize: waiting for {pool.num_gpus * (pool.min_size or pool.size):g} GPU(s) "
              f"(the cluster has {info.gpus:g} now)")
    started = time.perf_counter()
    with shared.run_probe(cfg.out) as probe, tqdm(total=len(todo), desc=progress, unit="shard") as bar:
        ds = ray.data.from_items([{"shard": k} for k in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            ShardWorker,
            batch_size=1,
            fn_constructor_kwargs=dict(featurizer=featurizer, cfg=_absolute_paths(cfg), store=store.root,
                                       examples=storage.absolute(examples), probe=probe),
            **pool.map_batches_kwargs(),
        )
        ds.context.raise_original_map_exception = True  # an actor's SiftError arrives as itself
        try:
            for row in ds.iter_rows():
                stats.rows += int(row["rows"])
                stats.quarantined += int(row["quarantined"])
                for reason, count in json.loads(row["reasons"]).items():
                    stats.reasons[reason] = stats.reasons.get(reason, 0) + count
                bar.update(1)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, SiftError):  # the run's error: its one line (Ray Data adds lines below it)
                raise SiftError(str(exc.cause).splitlines()[0]) from None
            raise
    stats.seconds = time.perf_counter() - started
    return store, stats


def _absolute_paths(cfg: FeaturizeConfig) -> FeaturizeConfig:
    """Local paths made absolute (URIs and built-in model names stay as they are)."""
    update = {k: storage.absolute(getattr(cfg, k)) for k in ("data", "out", "adapter") if getattr(cfg, k, None) is not None}
    if cfg.model is not None and not storage.is_remote(cfg.model) and Path(cfg.model).exists():  # a local folder
        update["model"] = storage.absolute(cfg.model)
    return cfg.model_copy(update=update)


class ShardWorker:
    """Ray Data actor: shard numbers in, written shards and their counts out. It reads its rows
    from and writes its shard to storage every node sees (a local path only on one machine or a
    shared mount; s3:// or gs:// on a cluster), so vectors never pass through the driver.

    On start it reads back the driver's probe of a local store (`probe`; None for object
    storage). An actor whose node cannot (it joined after the driver's check and sees another
    folder) loads no model and fails its first shard with the shared-output error, before
    writing anything: raised from the constructor, the error would reach the driver only as the
    text of Ray's ActorDiedError, while a task's SiftError arrives as itself."""

    def __init__(self, featurizer: type[Featurizer], cfg: FeaturizeConfig, store: str, examples: str,
                 probe: shared.Probe | None):
        import torch

        self.refused = probe.refusal() if probe is not None else None
        if self.refused is not None:
            return
        threads = runtime.assigned_threads()  # the CPUs Ray gave this actor, wherever it landed
        torch.set_num_threads(threads)
        self.store = FeatureStore(store)
        self.examples = examples
        self.featurizer = featurizer(cfg, threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        if self.refused is not None:
            raise self.refused
        out: dict[str, list] = {"shard": [], "rows": [], "quarantined": [], "reasons": []}
        for k in batch["shard"].tolist():
            start, stop = self.store.shard_range(k)
            frame = storage.read_parquet_slice(self.examples, start, stop - start)
            result = self.featurizer(frame)
            self.store.write_shard(k, result.rows, result.vectors, result.quarantine)
            reasons = result.quarantine.group_by("reason").len().rows()
            out["shard"].append(k)
            out["rows"].append(frame.height)
            out["quarantined"].append(result.quarantine.height)
            out["reasons"].append(json.dumps(dict(reasons)))
        return out


def split_finite(frame: pl.DataFrame, vectors: np.ndarray, extra: dict[str, np.ndarray] | None = None,
                 reasons: dict[int, str] | None = None) -> Featurized:
    """Keep rows whose vector (and extra values) are finite and that have no reason yet."""
    reasons = dict(reasons or {})
    finite = np.isfinite(vectors).all(axis=1)
    for name, values in (extra or {}).items():
        for i in np.flatnonzero(~np.isfinite(values)):
            reasons.setdefault(int(i), f"non-finite {name}")
    for i in np.flatnonzero(~finite):
        reasons.setdefault(int(i), "non-finite features")
    keep = np.array([i not in reasons for i in range(frame.height)], dtype=bool)
    rows = frame.select([c for c in ("id", "task", "label") if c in frame.columns]).filter(pl.Series(keep))
    for name, values in (extra or {}).items():
        rows = rows.with_columns(pl.Series(name, values[keep], dtype=pl.Float32))
    quarantine = pl.DataFrame(
        {"id": [frame["id"][i] for i in sorted(reasons)], "reason": [reasons[i] for i in sorted(reasons)]},
        schema=QUARANTINE_COLUMNS,
    )
    return Featurized(rows, vectors[keep], quarantine)
