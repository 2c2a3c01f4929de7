"""`sift ingest`: user files -> validated `examples.parquet` + `quarantine.parquet` + `summary.json`.

Ray Data reads the files in parallel (one task per file, streaming batches) into a staging
folder; polars then validates the staged rows as a whole (duplicate ids need every row), writes
both outputs in input order, and checks the accounting `rows_in == rows_out + rows_quarantined`.
Skipping a finished ingest is the executor's job (engine/executor.py), as for every stage; an
ingest that kept no row fails, and leaves no done marker, so a rerun fails again. An --out
inside an input folder is fine: a folder or glob input never picks up this ingest's own outputs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl

from engine import runtime, storage
from engine.config import IngestConfig
from engine.data import readers
from engine.data.schema import COLUMNS, QUARANTINE_SCHEMA, RAW_SCHEMA
from engine.data.validate import with_reasons
from engine.errors import SiftError

EXAMPLES = "examples.parquet"
QUARANTINE = "quarantine.parquet"
SUMMARY = "summary.json"
STAGING = "_staging"
URI_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


@dataclass
class IngestSummary:
    out: str
    rows_in: int
    rows_out: int
    rows_quarantined: int
    reasons: dict[str, int] = field(default_factory=dict)
    sources: list[dict] = field(default_factory=list)  # path, rows_in, rows_out, rows_quarantined
    tasks: dict[str, int] = field(default_factory=dict)  # kept rows per task


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
    runtime.start(cfg.runtime)
    _read_to_staging(sources, cfg, staging)
    summary = _validate_and_write(staging, out, sources, cfg)
    shutil.rmtree(staging, ignore_errors=True)
    if summary.rows_out == 0:
        raise SiftError(f"no valid rows: all {summary.rows_in} rows were quarantined "
                        f"(see {Path(summary.out) / QUARANTINE})")
    return summary


def _read_to_staging(sources: list[readers.Source], cfg: IngestConfig, staging: Path) -> None:
    import ray

    items = [{"path": s.path, "format": s.format, "index": s.index} for s in sources]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(_read_files, batch_size=1, batch_format="pyarrow", fn_kwargs={"cfg": cfg})
    ds.write_parquet(str(staging))


def _read_files(batch, cfg: IngestConfig):
    """Ray Data UDF: one file spec in, its raw rows out (a file error travels as a fatal row)."""
    for spec in batch.to_pylist():
        source = readers.Source(spec["path"], spec["format"], spec["index"])
        try:
            yield from readers.read_source(source, cfg)
        except SiftError as exc:
            yield readers.fatal_table(source.path, str(exc))


def _validate_and_write(staging: Path, out: Path, sources, cfg: IngestConfig) -> IngestSummary:
    files = sorted(staging.glob("*.parquet"))
    raw = pl.scan_parquet(files) if files else pl.LazyFrame(schema=pl.Schema(RAW_SCHEMA))
    fatal = raw.filter(pl.col("order") == readers.FATAL_ORDER).select("reason").head(1).collect()
    if fatal.height:
        raise SiftError(fatal["reason"][0])

    checked = with_reasons(raw, cfg.max_chars, cfg.labels).sort("order").with_columns(
        file=(pl.col("order") // (1 << readers.ROW_BITS)).cast(pl.Int64)
    ).collect()
    kept = checked.filter(pl.col("reason").is_null())
    quarantined = checked.filter(pl.col("reason").is_not_null())
    kept.select(COLUMNS).write_parquet(out / EXAMPLES)
    quarantined.select(QUARANTINE_SCHEMA.names).write_parquet(out / QUARANTINE)

    per_file = checked.group_by("file").agg(
        rows_in=pl.len(), rows_quarantined=pl.col("reason").is_not_null().sum()
    )
    by_file = {row["file"]: row for row in per_file.iter_rows(named=True)}
    summary = IngestSummary(
        out=str(out),
        rows_in=checked.height,
        rows_out=kept.height,
        rows_quarantined=quarantined.height,
        reasons=_counts(quarantined, pl.col("reason").str.replace(r" \(.*", "")),
        sources=[
            {
                "path": s.path,
                "rows_in": by_file.get(s.index, {}).get("rows_in", 0),
                "rows_quarantined": by_file.get(s.index, {}).get("rows_quarantined", 0),
            }
            for s in sources
        ],
        tasks=_counts(kept, pl.col("task").fill_null("(none)")),
    )
    for s in summary.sources:
        s["rows_out"] = s["rows_in"] - s["rows_quarantined"]
    if summary.rows_in != summary.rows_out + summary.rows_quarantined:
        raise AssertionError(f"ingest lost rows: {summary}")
    (out / SUMMARY).write_text(json.dumps(asdict(summary), indent=2))
    return summary


def _counts(frame: pl.DataFrame, key: pl.Expr) -> dict[str, int]:
    counted = frame.group_by(key.alias("key")).len().sort(["len", "key"], descending=[True, False])
    return dict(zip(counted["key"].to_list(), counted["len"].to_list()))


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
