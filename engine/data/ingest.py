"""`sift ingest`: user files -> validated `examples.parquet` + `quarantine.parquet` + `summary.json`.

Ray Data reads the files in parallel (one task per file, streaming batches; the per-row checks
run there) and its blocks reach the driver through Ray's object store, in input order: no row
depends on which node read it or on a disk every node shares. The driver appends them to one
local staging file, never holding more than a block, and checks every file's row count as its
reader counted it against the rows that arrived: a lost block is an error, never a gap.
Duplicate ids are then found one hash bucket of ids at a time, and a last pass over the staged
rows writes both outputs in input order and the accounting `rows_in == rows_out +
rows_quarantined`, so the driver's memory does not grow with the number of rows (beyond 16
bytes per duplicate row). Skipping a finished ingest is the executor's job
(engine/executor.py), as for every stage; an ingest that kept no row fails, and leaves no done
marker, so a rerun fails again. An --out inside an input folder is fine: a folder or glob input
never picks up this ingest's own outputs.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import runtime, storage
from engine.config import IngestConfig
from engine.data import readers
from engine.data.schema import QUARANTINE_SCHEMA, RAW_SCHEMA, SCHEMA
from engine.data.validate import duplicates, row_reasons
from engine.errors import SiftError

EXAMPLES = "examples.parquet"
QUARANTINE = "quarantine.parquet"
SUMMARY = "summary.json"
STAGING = "_staging"
URI_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
BUCKET_ROWS = 1 << 19  # ids per duplicate-check bucket: the largest table the driver holds
PASS_ROWS = 1 << 16  # rows per batch of the passes over the staged rows
# The driver's share of the object store. Every block the driver reads maps that block's pages of
# the store's shared memory into the driver (its RssShmem), and they stay mapped after the block
# is freed; the store reuses freed space, so the pages the driver ever touches are bounded by the
# most bytes alive in the store at once, not by the rows: at most IN_FLIGHT_BYTES of read blocks
# wait there for the driver (with blocks kept in input order, later files wait for earlier ones),
# in blocks of at most BLOCK_BYTES (Ray Data's default, 128 MiB, would make a whole file one block
# and the limit moot). Measured by jobs/bench/memory.py --kinds ingest.
IN_FLIGHT_BYTES = 64 << 20
BLOCK_BYTES = 8 << 20
ID_SCHEMA = pa.schema([("id", pa.string()), ("order", pa.int64())])


@dataclass
class IngestSummary:
    out: str
    rows_in: int
    rows_out: int
    rows_quarantined: int
    reasons: dict[str, int] = field(default_factory=dict)
    sources: list[dict] = field(default_factory=list)  # path, rows_in, rows_out, rows_quarantined
    tasks: dict[str, int] = field(default_factory=dict)  # kept rows per task


@dataclass
class Staged:
    """The raw rows on the driver's disk, in input order, with their per-row reasons."""

    path: Path
    tallies: dict[int, int]  # file index -> rows its reader read (equal to the rows staged)
    passed: int  # rows without a reason: the duplicate check's input


def ingest(cfg: IngestConfig) -> IngestSummary:
    if cfg.out is None:
        raise SiftError("ingest needs an output folder (--out DIR)")
    if URI_LIKE.match(str(cfg.out)):  # a Path turns s3://b/x into s3:/b/x: a local folder named 's3:'
        raise SiftError(f"--out {cfg.out}: ingest() writes a local folder; `sift ingest` (the stage) stages it "
                        "locally and uploads it to object storage")
    out = Path(cfg.out)
    sources = readers.resolve(cfg.inputs, exclude=tuple(str(out / name) for name in (EXAMPLES, QUARANTINE, SUMMARY,
                                                                                      STAGING)))
    for source in sources:
        readers.preflight(source, cfg)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    runtime.start(cfg.runtime)
    try:
        staged = _receive(sources, cfg, staging)
        summary = _write_outputs(staged, repeated_ids(staged, staging), out, sources)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if summary.rows_out == 0:
        raise SiftError(f"no valid rows: all {summary.rows_in} rows were quarantined "
                        f"(see {Path(summary.out) / QUARANTINE})")
    return summary


def _receive(sources: list[readers.Source], cfg: IngestConfig, staging: Path) -> Staged:
    """Read every source on Ray Data; stage the rows that reach the driver, block by block."""
    import ray

    items = [{"path": s.path, "format": s.format, "index": s.index} for s in sources]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(_read_files, batch_size=1, batch_format="pyarrow", fn_kwargs={"cfg": cfg})
    arrived: Counter[int] = Counter()
    tallies: dict[int, int] = {}
    passed, last = 0, -1
    path = staging / "raw.parquet"
    context = ds.context
    options = context.execution_options
    preserved, limits, block_bytes = options.preserve_order, options.resource_limits, context.target_max_block_size
    options.preserve_order = True  # blocks in input order: no sort
    options.resource_limits = limits.copy(object_store_memory=IN_FLIGHT_BYTES)
    context.target_max_block_size = BLOCK_BYTES
    try:
        with pq.ParquetWriter(path, RAW_SCHEMA) as writer:
            for table in _blocks(ds):
                table = table.cast(RAW_SCHEMA)
                is_control = pc.less(table["order"], 0)
                control = table.filter(is_control)
                if control.num_rows:
                    fatal = control.filter(pc.equal(control["order"], readers.FATAL_ORDER))
                    if fatal.num_rows:
                        raise SiftError(fatal["reason"][0].as_py())
                    tallies.update(readers.read_tallies(control))
                    table = table.filter(pc.invert(is_control))
                if table.num_rows == 0:
                    continue
                order = table["order"].to_numpy()
                if order[0] <= last or (np.diff(order) <= 0).any():
                    raise AssertionError("Ray Data delivered ingest blocks out of input order")
                last = int(order[-1])
                writer.write_table(table)
                files, counts = np.unique(order >> readers.ROW_BITS, return_counts=True)
                arrived.update(dict(zip(files.tolist(), counts.tolist())))
                passed += table["reason"].null_count
    finally:
        options.preserve_order, options.resource_limits, context.target_max_block_size = preserved, limits, block_bytes
    for source in sources:
        read, got = tallies.get(source.index), arrived.get(source.index, 0)
        if read is None:
            raise SiftError(f"{source.path}: its reader's row count never reached the driver ({got:,} rows did); "
                            "rows may be missing: rerun the ingest")
        if read != got:
            raise SiftError(f"{source.path}: its reader read {read:,} rows but {got:,} reached the driver; "
                            "rows were lost on the way: rerun the ingest")
    return Staged(path, tallies, passed)


def _blocks(ds) -> Iterator[pa.Table]:
    """Ray Data's output blocks as they reach the driver through the object store."""
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def _read_files(batch, cfg: IngestConfig):
    """Ray Data UDF: one file spec in, its checked raw rows out, then the reader's count of them
    (a file error travels as a fatal row)."""
    for spec in batch.to_pylist():
        source = readers.Source(spec["path"], spec["format"], spec["index"])
        rows = 0
        try:
            for table in readers.read_source(source, cfg):
                rows += table.num_rows
                yield row_reasons(table, cfg.max_chars, cfg.labels)
        except SiftError as exc:
            yield readers.fatal_table(source.path, str(exc))
            continue
        yield readers.tally_table(source, rows)


def repeated_ids(staged: Staged, staging: Path) -> pl.DataFrame:
    """`order`, `first` of every row that repeats an earlier row's id, by order.

    All rows of an id share a bucket (a hash of the id picks it), so each bucket is checked on
    its own and the driver holds one bucket at a time; one bucket when the rows are few.
    """
    buckets = max(1, math.ceil(staged.passed / BUCKET_ROWS))
    passed = pl.col("reason").is_null()
    if buckets == 1:
        found = [duplicates(pl.scan_parquet(staged.path).filter(passed).select(ID_SCHEMA.names).collect())]
    else:
        paths = [staging / f"ids-{b:05d}.arrow" for b in range(buckets)]
        sinks = [pa.OSFile(str(p), "wb") for p in paths]
        writers = [pa.ipc.new_stream(sink, ID_SCHEMA) for sink in sinks]
        try:
            for batch in pq.ParquetFile(staged.path).iter_batches(PASS_ROWS, columns=["id", "order", "reason"]):
                frame = pl.from_arrow(batch).filter(passed).select(ID_SCHEMA.names)
                bucket = (frame["id"].hash(seed=0) % buckets).to_numpy()
                for b in np.unique(bucket):
                    writers[b].write_table(frame.filter(bucket == b).to_arrow().cast(ID_SCHEMA))
        finally:
            for writer, sink in zip(writers, sinks):
                writer.close()
                sink.close()
        found = []
        for p in paths:
            found.append(duplicates(pl.read_ipc_stream(p)))
            p.unlink()
    return pl.concat(found).sort("order")


def _write_outputs(staged: Staged, repeats: pl.DataFrame, out: Path, sources: list[readers.Source]) -> IngestSummary:
    """One pass over the staged rows: duplicates marked, kept and quarantined rows written in input
    order, every count of the summary taken on the way."""
    paths = {s.index: s.path for s in sources}
    repeat_orders = repeats["order"].to_numpy()
    rows_in: Counter[int] = Counter()
    rows_quarantined: Counter[int] = Counter()
    reasons: Counter[str] = Counter()
    tasks: Counter[str] = Counter()
    with (pq.ParquetWriter(out / EXAMPLES, SCHEMA, compression="zstd") as kept_writer,
          pq.ParquetWriter(out / QUARANTINE, QUARANTINE_SCHEMA, compression="zstd") as quarantine_writer):
        for batch in pq.ParquetFile(staged.path).iter_batches(PASS_ROWS):
            frame = pl.from_arrow(batch)
            start, stop = np.searchsorted(repeat_orders, frame["order"][0]), np.searchsorted(
                repeat_orders, frame["order"][-1], side="right")
            if stop > start:
                here = repeats.slice(start, stop - start)
                first_seen = [f"duplicate id (first seen at {paths[f >> readers.ROW_BITS]}:"
                              f"{f & ((1 << readers.ROW_BITS) - 1)})" for f in here["first"].to_list()]
                frame = frame.join(here.select("order", duplicate=pl.Series(first_seen)), on="order", how="left",
                                   maintain_order="left").with_columns(
                    reason=pl.coalesce("reason", "duplicate")).drop("duplicate")
            rejected = pl.col("reason").is_not_null()
            kept, quarantined = frame.filter(~rejected), frame.filter(rejected)
            kept_writer.write_table(kept.select(SCHEMA.names).to_arrow().cast(SCHEMA))
            quarantine_writer.write_table(quarantined.select(QUARANTINE_SCHEMA.names).to_arrow().cast(QUARANTINE_SCHEMA))
            per_file = frame.group_by(file=pl.col("order") // (1 << readers.ROW_BITS)).agg(
                rows=pl.len(), quarantined=rejected.sum())
            for file, rows, bad in per_file.iter_rows():
                rows_in[file] += rows
                rows_quarantined[file] += bad
            reasons.update(_tally(quarantined, pl.col("reason").str.replace(r" \(.*", "")))
            tasks.update(_tally(kept, pl.col("task").fill_null("(none)")))
    for source in sources:
        if rows_in[source.index] != staged.tallies[source.index]:
            raise AssertionError(f"{source.path}: read {staged.tallies[source.index]} rows, wrote {rows_in[source.index]}")
    summary = IngestSummary(
        out=str(out),
        rows_in=sum(rows_in.values()),
        rows_out=sum(tasks.values()),
        rows_quarantined=sum(reasons.values()),
        reasons=_ranked(reasons),
        sources=[{"path": s.path, "rows_in": rows_in[s.index], "rows_quarantined": rows_quarantined[s.index],
                  "rows_out": rows_in[s.index] - rows_quarantined[s.index]} for s in sources],
        tasks=_ranked(tasks),
    )
    if summary.rows_in != summary.rows_out + summary.rows_quarantined:
        raise AssertionError(f"ingest lost rows: {summary}")
    (out / SUMMARY).write_text(json.dumps(asdict(summary), indent=2))
    return summary


def _tally(frame: pl.DataFrame, key: pl.Expr) -> dict[str, int]:
    return dict(frame.group_by(key.alias("key")).len().iter_rows())


def _ranked(counts: Counter[str]) -> dict[str, int]:
    """Most frequent first, ties by name (as summary.json has always listed them)."""
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def examples_path(data: str | os.PathLike | None) -> str:
    """The examples file of `--data` (a location, local or remote): an ingest folder's
    examples.parquet, or a parquet file."""
    if data is None:
        raise SiftError("--data is required (an ingest folder or a parquet file of examples)")
    data = storage.validate_uri(data)
    path = storage.join(data, EXAMPLES) if storage.is_dir(data) else data
    if not storage.is_file(path):
        raise SiftError(f"{data}: no {EXAMPLES}; run `sift ingest` first")
    return path


def read_examples(folder: str | os.PathLike) -> pl.DataFrame:
    """The validated examples of an ingest folder (or a parquet file of examples)."""
    return storage.read_parquet(examples_path(folder))
