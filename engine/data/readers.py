"""Read user files (jsonl, csv/tsv, parquet, Hugging Face `save_to_disk` folders) into raw rows.

Two kinds of problems, kept apart on purpose:
- a *file* that cannot be read as what it claims to be (truncated JSON, missing text column,
  wrong column type, empty, unreadable encoding, a folder mixing formats) is a `SiftError`
  naming the file and the problem: the user must fix the input;
- a *row* that is readable but unusable (missing or non-string text, undecodable bytes, a CSV
  row with the wrong number of fields) is kept with a `reason` and quarantined downstream.

An input may also be a URI (s3://, gs://, hdfs://, file://): a file or a folder, read through
pyarrow's filesystems on whichever node reads it, with that node's credentials, so a cluster
needs no shared mount for its inputs. Globs and Hugging Face folders stay local-only.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine.config import IngestConfig, SchemaConfig
from engine.data.schema import RAW_SCHEMA, content_id
from engine.errors import SiftError

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv",
              ".tsv": "tsv", ".parquet": "parquet"}
ROW_BITS = 40  # order = file index << ROW_BITS | row number: a global, deterministic row order
FATAL_ORDER = -1  # a raw row with this order carries a file-level error message as its reason
BATCH_ROWS = 8192
SAMPLE_BYTES = 1 << 16

csv.field_size_limit(sys.maxsize)


@dataclass(frozen=True)
class Source:
    path: str
    format: str  # jsonl | csv | tsv | parquet | hf
    index: int


def resolve(inputs: list[str]) -> list[Source]:
    """Expand files, folders and globs into an ordered list of sources, one format per folder."""
    if not inputs:
        raise SiftError("no input given: pass at least one file, folder or glob")
    found: list[tuple[str, str]] = []
    for item in inputs:
        if is_uri(item):
            found += _uri_sources(item)
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise SiftError(f"no files match {item!r}")
            found += [(m, _format_of_file(m)) for m in matches if os.path.isfile(m)]
        elif os.path.isdir(item):
            found += _folder(item)
        elif os.path.isfile(item):
            found.append((item, _format_of_file(item)))
        else:
            raise SiftError(f"no such file or folder: {item}")
    unique: dict[str, str] = {}
    for path, fmt in found:
        unique.setdefault(path if is_uri(path) else os.path.abspath(path), fmt)
    return [Source(path, fmt, i) for i, (path, fmt) in enumerate(unique.items())]


def _folder(folder: str) -> list[tuple[str, str]]:
    if _is_hf_folder(folder):
        return [(folder, "hf")]
    return _one_format(folder, [str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()])


def _one_format(folder: str, relative: list[str]) -> list[tuple[str, str]]:
    """A folder's data files (hidden and `_`-prefixed parts skipped), which must share one format."""
    files = sorted(
        f"{folder.rstrip('/')}/{r}" for r in relative
        if not any(part.startswith((".", "_")) for part in r.split("/"))
    )
    if not files:
        raise SiftError(f"folder {folder} holds no data files")
    typed = [(f, _format_of_file(f)) for f in files]
    kinds = sorted({fmt for _, fmt in typed})
    if len(kinds) > 1:
        counts = ", ".join(f"{k}: {sum(fmt == k for _, fmt in typed)} files" for k in kinds)
        raise SiftError(f"folder {folder} mixes formats ({counts}); keep one format per folder")
    return typed


def _is_hf_folder(folder: str, names: set[str] | None = None) -> bool:
    names = set(os.listdir(folder)) if names is None else names
    return "dataset_dict.json" in names or {"state.json", "dataset_info.json"} <= names


def is_uri(path: str) -> bool:
    return "://" in path


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise SiftError(f"{uri}: cannot open ({str(exc).splitlines()[0]})") from None


def _uri_sources(uri: str) -> list[tuple[str, str]]:
    """A URI's file, or its folder's files; options after '?' (e.g. region=) stay on every file."""
    location, mark, options = uri.partition("?")
    if any(ch in location for ch in "*["):
        raise SiftError(f"{uri}: globs are not supported in URIs; pass the folder instead")
    fs, inner = _filesystem(uri)
    try:
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.File:
            return [(uri, _format_of_file(location))]
        if info.type != pafs.FileType.Directory:
            raise SiftError(f"no such file or folder: {uri}")
        base = inner.rstrip("/")
        listed = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as exc:
        raise SiftError(f"{uri}: cannot list ({str(exc).splitlines()[0]})") from None
    relative = [i.path[len(base) + 1:] for i in listed if i.type == pafs.FileType.File]
    if _is_hf_folder(uri, {r for r in relative if "/" not in r}):
        raise SiftError(f"{uri}: Hugging Face dataset folders are read from local disk only; "
                        "copy it to a shared mount or save it as parquet")
    return [(path + mark + options, fmt) for path, fmt in _one_format(location, relative)]


def _open(path: str):
    """A binary file object for a local path or a URI."""
    if not is_uri(path):
        return open(path, "rb")
    fs, inner = _filesystem(path)
    return io.BufferedReader(fs.open_input_file(inner))


def file_stat(path: str) -> tuple[int, int]:
    """(size, mtime in ns) of a local path or a URI."""
    if not is_uri(path):
        stat = os.stat(path)
        return stat.st_size, stat.st_mtime_ns
    fs, inner = _filesystem(path)
    info = fs.get_file_info(inner)
    return info.size, info.mtime_ns or 0


def _format_of_file(path: str) -> str:
    fmt = EXTENSIONS.get(Path(path).suffix.lower())
    if fmt is None:
        supported = ", ".join(sorted(EXTENSIONS))
        raise SiftError(f"{path}: unsupported file type (supported: {supported}, or a Hugging Face dataset folder)")
    return fmt


def preflight(source: Source, cfg: IngestConfig) -> None:
    """Cheap checks on the driver so most broken files fail in a second, before any Ray work."""
    if source.format == "hf":
        _hf_dataset(source.path)
        return
    if file_stat(source.path)[0] == 0:
        raise SiftError(f"{source.path}: file is empty")
    if source.format == "parquet":
        _check_columns(source.path, _parquet_file(source.path).schema_arrow, cfg.columns)
        return
    with _open(source.path) as f:
        sample = f.read(SAMPLE_BYTES)
    _check_encoding(source.path, sample, cfg.encoding)
    if source.format == "jsonl":
        first = next(_jsonl_records(source.path, cfg.encoding, limit=1), None)
        if first is None:
            raise SiftError(f"{source.path}: file holds no records")
        if cfg.columns.text not in first[1]:
            fields = ", ".join(sorted(first[1])) or "none"
            raise SiftError(f"{source.path}: first record has no {cfg.columns.text!r} field (fields: {fields}); "
                            "set columns.text")
    else:
        header = next(_csv_records(source.path, cfg.encoding, source.format, header_only=True), None)
        if header is None:
            raise SiftError(f"{source.path}: file holds no header row")
        if cfg.columns.text not in header[1]:
            raise SiftError(f"{source.path}: no {cfg.columns.text!r} column (columns: {', '.join(header[1])}); "
                            "set columns.text")


def _check_encoding(path: str, sample: bytes, encoding: str) -> None:
    if sample.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SiftError(f"{path}: unreadable encoding (UTF-16/32 byte-order mark); convert the file to UTF-8")
    if b"\x00" in sample:
        raise SiftError(f"{path}: unreadable encoding (NUL bytes: binary data or UTF-16); convert to UTF-8 text")
    lines = [ln for ln in sample.split(b"\n")[:-1] if ln.strip()] or [sample]
    bad = 0
    for line in lines:
        try:
            line.decode(encoding)
        except UnicodeDecodeError:
            bad += 1
        except LookupError:
            raise SiftError(f"unknown encoding {encoding!r}") from None
    if bad * 2 > len(lines):
        raise SiftError(f"{path}: unreadable encoding: {bad} of the first {len(lines)} lines are not valid "
                        f"{encoding}; set encoding (e.g. latin-1)")


def read_source(source: Source, cfg: IngestConfig) -> Iterator[pa.Table]:
    """Raw rows of one source as arrow tables of RAW_SCHEMA, in file order."""
    columns = cfg.columns
    records = {
        "jsonl": lambda: _jsonl_records(source.path, cfg.encoding),
        "csv": lambda: _csv_records(source.path, cfg.encoding, "csv"),
        "tsv": lambda: _csv_records(source.path, cfg.encoding, "tsv"),
        "parquet": lambda: _parquet_records(source.path, columns),
        "hf": lambda: _hf_records(source.path, columns),
    }[source.format]()
    rows: dict[str, list] = {name: [] for name in RAW_SCHEMA.names}
    for row_number, record, reason in records:
        for key, value in _normalize(record, reason, columns).items():
            rows[key].append(value)
        rows["source"].append(f"{source.path}:{row_number}")
        rows["order"].append((source.index << ROW_BITS) | row_number)
        if len(rows["order"]) >= BATCH_ROWS:
            yield pa.Table.from_pydict(rows, schema=RAW_SCHEMA)
            rows = {name: [] for name in RAW_SCHEMA.names}
    if rows["order"]:
        yield pa.Table.from_pydict(rows, schema=RAW_SCHEMA)


def fatal_table(path: str, message: str) -> pa.Table:
    """A file-level error travelling through Ray Data as data, so the driver can print it as one line."""
    row = {name: [None] for name in RAW_SCHEMA.names}
    row.update(source=[path], order=[FATAL_ORDER], reason=[message])
    return pa.Table.from_pydict(row, schema=RAW_SCHEMA)


_MISSING = object()


def _normalize(record: dict[str, Any], reason: str | None, columns: SchemaConfig) -> dict[str, Any]:
    text = record.get(columns.text, _MISSING)
    if text is _MISSING or text is None:
        reason, text = reason or "missing text", None
    elif not isinstance(text, str):
        reason, text = reason or f"non-string text ({type(text).__name__})", str(text)
    task = _as_str(record.get(columns.task))
    given_id = record.get(columns.id)
    if given_id is not None:
        row_id = str(given_id)
    else:
        row_id = content_id(text if text is not None else "", task)
    known = {columns.text, columns.id, columns.task, columns.label, columns.split}
    extra = {k: v for k, v in record.items() if k not in known}
    return {
        "id": row_id,
        "text": text,
        "task": task,
        "label": _as_str(record.get(columns.label)),
        "split": _as_str(record.get(columns.split)),
        "meta": json.dumps(extra, ensure_ascii=False, default=str, sort_keys=True) if extra else None,
        "reason": reason,
    }


def _as_str(value: Any) -> str | None:
    return None if value is None else str(value)


# --- record iterators: (row number, record, reason known at read time) ----------------------

def _jsonl_records(path: str, encoding: str, limit: int | None = None) -> Iterator[tuple[int, dict, str | None]]:
    with _open(path) as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            reason = None
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError:
                line, reason = raw.decode(encoding, errors="replace"), "undecodable bytes"
            if number == 1 and line.lstrip().startswith("["):
                raise SiftError(f"{path}: holds a JSON array; sift reads JSON lines (one object per line)")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if not raw.endswith(b"\n"):
                    raise SiftError(f"{path}: truncated JSON at line {number} (the file ends mid-record)") from None
                raise SiftError(f"{path}: invalid JSON at line {number}: {exc.msg}") from None
            if not isinstance(record, dict):
                raise SiftError(f"{path}: line {number} holds a JSON {type(record).__name__}, expected an object")
            yield number, record, reason
            if limit is not None and number >= limit:
                return


def _csv_records(path: str, encoding: str, fmt: str, header_only: bool = False) -> Iterator[tuple[int, dict, str | None]]:
    delimiter = "\t" if fmt == "tsv" else ","
    with io.TextIOWrapper(_open(path), encoding=encoding, errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                return
            if header_only:
                yield 1, dict.fromkeys(header), None
                return
            for fields in reader:
                if not fields:
                    continue
                reason = None
                if any(_has_surrogates(v) for v in fields):
                    fields, reason = [_repair(v, encoding) for v in fields], "undecodable bytes"
                if len(fields) != len(header):
                    reason = reason or f"malformed CSV row ({len(fields)} fields, header has {len(header)})"
                yield reader.line_num, dict(zip(header, fields)), reason
        except csv.Error as exc:
            raise SiftError(f"{path}: malformed CSV at line {reader.line_num}: {exc}") from None


def _has_surrogates(value: str) -> bool:
    try:
        value.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _repair(value: str, encoding: str) -> str:
    return value.encode(encoding, "surrogateescape").decode(encoding, "replace")


def _parquet_file(path: str) -> pq.ParquetFile:
    try:
        if is_uri(path):
            fs, inner = _filesystem(path)
            return pq.ParquetFile(inner, filesystem=fs)
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise SiftError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None


def _check_columns(path: str, schema: pa.Schema, columns: SchemaConfig) -> None:
    if columns.text not in schema.names:
        raise SiftError(f"{path}: no {columns.text!r} column (columns: {', '.join(schema.names)}); set columns.text")
    kind = schema.field(columns.text).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
            or pa.types.is_string_view(kind)):
        raise SiftError(f"{path}: column {columns.text!r} has type {kind}, expected string")


def _parquet_records(path: str, columns: SchemaConfig) -> Iterator[tuple[int, dict, str | None]]:
    file = _parquet_file(path)
    _check_columns(path, file.schema_arrow, columns)
    number = 0
    for batch in file.iter_batches(batch_size=BATCH_ROWS):
        for record in batch.to_pylist():
            number += 1
            yield number, record, None


def _hf_dataset(path: str):
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as exc:  # datasets raises many types for a broken folder
        raise SiftError(f"{path}: not a readable Hugging Face dataset folder ({str(exc).splitlines()[0]})") from None
    return loaded


def _hf_records(path: str, columns: SchemaConfig) -> Iterator[tuple[int, dict, str | None]]:
    import datasets

    loaded = _hf_dataset(path)
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    number = 0
    for split_name, dataset in sorted(splits, key=lambda kv: kv[0] or ""):
        _check_columns(path, dataset.data.schema, columns)
        for batch in dataset.data.table.to_batches(max_chunksize=BATCH_ROWS):
            for record in batch.to_pylist():
                number += 1
                if split_name is not None and record.get(columns.split) is None:
                    record[columns.split] = split_name
                yield number, record, None
