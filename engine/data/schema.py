"""The one row shape every stage of sift reads and writes.

`id` and `text` are required; `task`, `label` and `split` may be null; any other input column is
carried through as a JSON object in `meta`, so nothing a user had is lost.
"""

from __future__ import annotations

import hashlib

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
