"""Row validation: every raw row leaves with a `reason` (quarantined) or without one (kept).

Two kinds of checks, run in different places so that no process ever holds every row:
- per-row checks (empty or over-long text, an unknown label) need only the row: `row_reasons`
  runs on each batch inside the Ray task that read it;
- the duplicate-id check (among rows that passed, the first occurrence in input order wins)
  needs every row of an id: `duplicates` runs on one hash bucket of ids at a time (the driver
  routes rows to buckets by a hash of the id, so all rows of an id share a bucket).
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from engine.data.schema import RAW_SCHEMA, normalize_label


def row_reasons(raw: pa.Table, max_chars: int, labels: list[str] | None) -> pa.Table:
    """`raw` (RAW_SCHEMA) with `reason` filled for every row a per-row check rejects; a reason
    found at read time comes first."""
    text = pl.col("text")
    checks = [
        pl.when(text.str.strip_chars() == "").then(pl.lit("empty text")),
        pl.when(text.str.len_chars() > max_chars).then(
            pl.format("text longer than {} chars ({})", pl.lit(max_chars), text.str.len_chars())
        ),
    ]
    if labels is not None:
        labels = [normalize_label(label) for label in labels]  # as the readers wrote the rows' labels
        checks.append(
            pl.when(pl.col("label").is_not_null() & ~pl.col("label").is_in(labels)).then(
                pl.format("unknown label '{}'", pl.col("label"))
            )
        )
    checked = pl.from_arrow(raw).with_columns(reason=pl.coalesce(pl.col("reason"), *checks))
    return checked.to_arrow().cast(RAW_SCHEMA)


def duplicates(bucket: pl.DataFrame) -> pl.DataFrame:
    """`order`, `first` (the order of the id's first row) of every row of `bucket` (id, order of
    rows that passed the per-row checks; all rows of each of its ids) that repeats an earlier id."""
    first = bucket.group_by("id").agg(first=pl.col("order").min())
    return (bucket.join(first, on="id").filter(pl.col("order") != pl.col("first"))
            .select("order", "first"))
