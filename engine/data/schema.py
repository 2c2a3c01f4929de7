"""The one row shape every stage of sift reads and writes.

`id` and `text` are required; `task`, `label` and `split` may be null; any other input column is
carried through as a JSON object in `meta`, so nothing a user had is lost.

Values read the same whatever file type they came from (JSON has types, CSV has only text):
- `scalar_text` (id, task, split): a bool is `true`/`false`, an integral float its integer
  (`1.0` -> `1`), another float its shortest repr (`0.5`), a NaN or a blank string missing;
  a list, an object or bytes is no scalar (TypeError: the reader quarantines the row);
- `normalize_label` also reads a label written as text by what it means, so `1`, `1.0`, `"1"`,
  `"1.0"` are all `1`, `true`, `"True"` are `true`, `" pos "` is `pos`. Ids keep their text
  (`"007"` stays `007`): two different ids must never become one.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from typing import Any

import polars as pl
import pyarrow as pa

COLUMNS = ("id", "text", "task", "label", "split", "meta")

SCHEMA = pa.schema([(name, pa.string()) for name in COLUMNS])

# Reader bookkeeping, dropped from the validated output: where a row came from, its position
# (for a deterministic order), and a reason already known at read time (e.g. undecodable bytes).
INTERNAL = pa.schema(
    [("source", pa.string()), ("order", pa.int64()), ("reason", pa.string())]
)

RAW_SCHEMA = pa.schema(list(SCHEMA) + list(INTERNAL))

QUARANTINE_SCHEMA = pa.schema(list(SCHEMA) + [("source", pa.string()), ("reason", pa.string())])


def content_id(text: str, task: str | None) -> str:
    """A stable id from the content: the same text of the same task gets the same id anywhere."""
    digest = hashlib.blake2b(f"{task or ''}\x1f{text}".encode("utf-8", "surrogatepass"), digest_size=10)
    return digest.hexdigest()


_INTEGER = re.compile(r"[+-]?\d+")
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def scalar_text(value: Any) -> str | None:
    """A scalar field value as the text sift stores (see the module docstring); TypeError for a
    list, an object or bytes."""
    if type(value) is str:  # the common case first: this runs for several fields of every row
        return value if value and not value.isspace() else None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (list, tuple, dict, set, bytes, bytearray)):
        raise TypeError(type(value).__name__)
    text = str(value)
    return text if text.strip() else None


def normalize_label(value: Any) -> str | None:
    """A label as text by what it means: numbers by value, booleans lower-case, no outer spaces."""
    text = scalar_text(value)
    return None if text is None else _label_text(text)


@functools.lru_cache(maxsize=1 << 16)  # a label column holds few distinct values
def _label_text(text: str) -> str:
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower()
    if _INTEGER.fullmatch(text):
        return str(int(text))
    if _DECIMAL.fullmatch(text):
        return scalar_text(float(text))
    return text


def label_sets(frame: pl.DataFrame) -> dict[str, list[str]]:
    """Each task's labels in `frame` (every split), sorted: the class order of the ensemble, the
    estimator's label metrics and the labels objective. A task with no labelled row has none."""
    grouped = frame.filter(pl.col("task").is_not_null()).group_by("task").agg(pl.col("label").drop_nulls().unique())
    return {task: sorted(labels) for task, labels in sorted(grouped.iter_rows())}
