"""Row validation: every raw row leaves with a `reason` (quarantined) or without one (kept).

Checks run as polars expressions over the whole staged table, because one of them (duplicate
ids, first occurrence wins) needs every row; the rest are per row.
"""

from __future__ import annotations

import polars as pl

from engine.data.schema import normalize_label


def with_reasons(raw: pl.LazyFrame, max_chars: int, labels: list[str] | None) -> pl.LazyFrame:
    """`raw` with `reason` filled for every rejected row; reasons found at read time come first."""
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
    checked = raw.with_columns(reason=pl.coalesce(pl.col("reason"), *checks))

    # Among rows that passed, the first occurrence of an id (in input order) wins.
    ok = pl.col("reason").is_null()
    first_order = pl.col("order").filter(ok).min().over("id")
    first_source = pl.col("source").filter(ok).sort_by(pl.col("order").filter(ok)).first().over("id")
    duplicate = ok & (pl.col("order") != first_order)
    return checked.with_columns(
        reason=pl.when(duplicate)
        .then(pl.format("duplicate id (first seen at {})", first_source))
        .otherwise(pl.col("reason"))
    )
