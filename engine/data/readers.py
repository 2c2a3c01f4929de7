"""Read user files (jsonl, csv/tsv, parquet, Hugging Face `save_to_disk` folders) into raw rows.

Two kinds of problems, kept apart on purpose:
- a *file* that cannot be read as what it claims to be (truncated JSON, missing text column,
  wrong column type, empty, unreadable encoding, a folder mixing formats) is a `SiftError`
  naming the file and the problem: the user must fix the input;
- a *row* that is readable but unusable (missing or non-string text, undecodable bytes, a lone
  surrogate from a JSON `\\ud800` escape, a line over `max_line_bytes`, a list where a label
  belongs, an unknown split, a CSV row with the wrong number of fields) is kept with a `reason`
  and quarantined downstream.

Values are normalised here, once, so the same datum reads the same from any file type: labels
and ids by `schema.normalize_label` / `schema.scalar_text`, splits to train / validation / test
(`val`, `dev`, `valid` -> validation), a UTF-8 byte-order mark dropped.

Folders and `**` globs are walked by `_walk`: symlinked folders are followed, each real folder
once (a symlink loop ends), and an entry that cannot be read is an error, never a silent gap.

An input may also be a URI (s3://, gs://, hdfs://, file://): a file or a folder, read through
pyarrow's filesystems on whichever node reads it, with that node's credentials, so a cluster
needs no shared mount for its inputs. Globs and Hugging Face folders stay local-only.
"""

from __future__ import annotations

import codecs
import csv
import fnmatch
import glob
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine.config import IngestConfig, SchemaConfig
from engine.data.schema import RAW_SCHEMA, content_id, normalize_label, scalar_text
from engine.errors import SiftError

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv",
              ".tsv": "tsv", ".parquet": "parquet"}
ROW_BITS = 40  # order = file index << ROW_BITS | row number: a global, deterministic row order
FATAL_ORDER = -1  # a raw row with this order carries a file-level error message as its reason
TALLY_ORDER = -2  # a raw row with this order says how many rows the reader read from one file
BATCH_ROWS = 8192
SAMPLE_BYTES = 1 << 16
SKIP_CHUNK = 1 << 20  # an over-long line is skipped in chunks of this size, never held whole
SPLITS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
          "val": "validation", "dev": "validation", "test": "test", "testing": "test"}


@dataclass(frozen=True)
class Source:
    path: str
    format: str  # jsonl | csv | tsv | parquet | hf
    index: int


def resolve(inputs: list[str], exclude: tuple[str, ...] = ()) -> list[Source]:
    """Expand files, folders and globs into an ordered list of sources, one format per folder.

    `exclude`: local paths (files or folders) a folder or glob must not pick up, e.g. the outputs
    of the ingest being run when its --out lies inside an input folder; naming one of them
    explicitly is an error. A file reached twice (through a symlink, or by two inputs) is read once.
    """
    if not inputs:
        raise SiftError("no input given: pass at least one file, folder or glob")
    excluded = tuple(os.path.realpath(e) for e in exclude)

    def wanted(path: str) -> bool:
        real = os.path.realpath(path)
        return not any(real == e or real.startswith(e + os.sep) for e in excluded)

    found: list[tuple[str, str]] = []
    for item in inputs:
        if is_uri(item):
            found += _uri_sources(item)
        elif any(ch in item for ch in "*?["):
            matches = [m for m in _glob(item) if wanted(m)]
            if not matches:
                raise SiftError(f"no files match {item!r}")
            found += [(m, _format_of_file(m)) for m in matches]
        elif os.path.isdir(item):
            found += _folder(item, wanted)
        elif os.path.isfile(item):
            if not wanted(item):
                raise SiftError(f"{item} is an output of this ingest; choose another --out")
            found.append((item, _format_of_file(item)))
        else:
            raise SiftError(f"no such file or folder: {item}")
    unique: dict[str, tuple[str, str]] = {}
    for path, fmt in found:
        key = path if is_uri(path) else os.path.realpath(path)
        unique.setdefault(key, (path if is_uri(path) else os.path.abspath(path), fmt))
    return [Source(path, fmt, i) for i, (path, fmt) in enumerate(unique.values())]


def _folder(folder: str, wanted) -> list[tuple[str, str]]:
    if _is_hf_folder(folder):
        return [(folder, "hf")]
    files, problems = _walk(folder, prune=lambda name: name.startswith((".", "_")))
    _refuse_unreadable(folder, problems)
    return _one_format(folder, [r for r in files if wanted(os.path.join(folder, r))])


@dataclass(frozen=True)
class Unreadable:
    """An entry of an input folder that cannot be read, and why."""

    path: str  # relative to the walked folder
    why: str
    folder: bool

    def __str__(self) -> str:
        return f"{self.path}{'/' if self.folder else ''} ({self.why})"


def _walk(root: str, prune=lambda name: False, max_depth: int | None = None) -> tuple[list[str], list[Unreadable]]:
    """Relative paths of the regular files under `root`, following symlinked folders, and the
    entries that cannot be read (a folder or file without permission, a dangling symlink).

    Each real folder is entered once (keyed by device and inode), so a symlink loop ends and two
    links to one folder do not read it twice. Folders for which `prune(name)` holds are not
    entered; `max_depth` bounds how many folder levels a file may sit below `root`.
    """
    files: list[str] = []
    problems: list[Unreadable] = []
    seen: set[tuple[int, int]] = set()

    def unreadable_folder(error: OSError) -> None:
        problems.append(Unreadable(os.path.relpath(error.filename, root), error.strerror, folder=True))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable_folder):
        stat = os.stat(dirpath)
        if (stat.st_dev, stat.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        rel = os.path.relpath(dirpath, root)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        deeper = max_depth is None or depth < max_depth
        dirnames[:] = sorted(d for d in dirnames if deeper and not prune(d))
        for name in sorted(filenames):
            path, relative = os.path.join(dirpath, name), (name if rel == "." else os.path.join(rel, name))
            if not os.path.exists(path):
                problems.append(Unreadable(relative, "dangling symlink", folder=False))
            elif not os.path.isfile(path):
                problems.append(Unreadable(relative, "not a regular file", folder=False))
            elif not os.access(path, os.R_OK):
                problems.append(Unreadable(relative, "permission denied", folder=False))
            else:
                files.append(relative)
    return files, problems


def _refuse_unreadable(root: str, problems: list[Unreadable]) -> None:
    """Part of an input that cannot be read is an error with a count, never a silent gap."""
    if problems:
        count = f"{len(problems)} unreadable {'entry' if len(problems) == 1 else 'entries'}"
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise SiftError(f"{root}: {count}: {problems[0]}{more}; fix or remove them")


def _glob(pattern: str) -> list[str]:
    """Files matching a glob (`**` spans folders), like `glob.glob(recursive=True)` but walked by
    `_walk`: a symlink loop is entered once instead of until the path length limit, and an
    unreadable entry the pattern could match is an error rather than a gap."""
    parts = pattern.split("/")
    fixed = 0
    while fixed < len(parts) - 1 and not glob.has_magic(parts[fixed]):
        fixed += 1
    base = "/".join(parts[:fixed]) or ("/" if pattern.startswith("/") else "")
    rest = tuple(parts[fixed:])
    if not os.path.isdir(base or "."):
        return []
    files, problems = _walk(base or ".", max_depth=None if "**" in rest else len(rest) - 1)
    _refuse_unreadable(base or ".", [p for p in problems if p.folder or _glob_match(_parts(p.path), rest)])
    return sorted(os.path.join(base, r) for r in files if _glob_match(_parts(r), rest))


def _parts(relative: str) -> tuple[str, ...]:
    return tuple(relative.split(os.sep))


def _glob_match(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Path parts against pattern parts with glob's rules: `**` is zero or more folders (the last
    `**` also the file); a wildcard does not match a leading dot."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        if not rest:
            return bool(parts) and not any(p.startswith(".") for p in parts)
        return any(_glob_match(parts[i:], rest) for i in range(len(parts))
                   if not any(p.startswith(".") for p in parts[:i]))
    return (bool(parts) and (head.startswith(".") or not parts[0].startswith("."))
            and fnmatch.fnmatchcase(parts[0], head) and _glob_match(parts[1:], rest))


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
    _check_encoding(source.path, sample, cfg.encoding, truncated=len(sample) == SAMPLE_BYTES)
    if source.format == "jsonl":
        records = _jsonl_records(source.path, cfg.encoding, cfg.max_line_bytes)
        first = next((r for r in records if r[2] != _too_long(cfg.max_line_bytes)), None)
        if first is None:
            raise SiftError(f"{source.path}: file holds no records")
        if cfg.columns.text not in first[1]:
            fields = ", ".join(sorted(first[1])) or "none"
            raise SiftError(f"{source.path}: first record has no {cfg.columns.text!r} field (fields: {fields}); "
                            "set columns.text")
    else:
        header = next(_csv_records(source.path, cfg.encoding, source.format, cfg.max_line_bytes, header_only=True),
                      None)
        if header is None:
            raise SiftError(f"{source.path}: file holds no header row")
        if cfg.columns.text not in header[1]:
            raise SiftError(f"{source.path}: no {cfg.columns.text!r} column (columns: {', '.join(header[1])}); "
                            "set columns.text")


def _check_encoding(path: str, sample: bytes, encoding: str, truncated: bool) -> None:
    """Judge the encoding on the first lines. When the sample was cut short, its last piece may
    end mid-character: it is decoded as unfinished, so a cut is not taken for bad bytes."""
    if sample.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SiftError(f"{path}: unreadable encoding (UTF-16/32 byte-order mark); convert the file to UTF-8")
    if b"\x00" in sample:
        raise SiftError(f"{path}: unreadable encoding (NUL bytes: binary data or UTF-16); convert to UTF-8 text")
    *complete, tail = sample.split(b"\n")
    lines = [(ln, True) for ln in complete if ln.strip()] or [(tail, not truncated)]
    bad = 0
    for line, final in lines:
        try:
            codecs.getincrementaldecoder(encoding)().decode(line, final=final)
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
        "jsonl": lambda: _jsonl_records(source.path, cfg.encoding, cfg.max_line_bytes),
        "csv": lambda: _csv_records(source.path, cfg.encoding, "csv", cfg.max_line_bytes),
        "tsv": lambda: _csv_records(source.path, cfg.encoding, "tsv", cfg.max_line_bytes),
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


def tally_table(source: Source, rows: int) -> pa.Table:
    """The reader's count of one file's rows, sent after them through Ray Data as data: the driver
    checks it against the rows that reached it, so a lost block is an error, never a gap."""
    row = {name: [None] for name in RAW_SCHEMA.names}
    row.update(source=[source.path], order=[TALLY_ORDER], id=[str(source.index)], text=[str(rows)])
    return pa.Table.from_pydict(row, schema=RAW_SCHEMA)


def read_tallies(control: pa.Table) -> dict[int, int]:
    """File index -> rows read, from the tally rows among `control` (rows with a negative order)."""
    tallies = {}
    for row in control.filter(pc.equal(control["order"], TALLY_ORDER)).to_pylist():
        tallies[int(row["id"])] = int(row["text"])
    return tallies


_MISSING = object()


def _normalize(record: dict[str, Any], reason: str | None, columns: SchemaConfig) -> dict[str, Any]:
    """A record as one row of RAW_SCHEMA; the first problem found becomes its reason.

    A value that cannot be what its field means (a list or an object where text, a label, an
    id, a task or a split belongs) is stored as JSON for the quarantine file, never as a Python
    repr.
    """
    problems = [reason] if reason else []
    text = record.get(columns.text, _MISSING)
    if text is _MISSING or text is None:
        problems.append("missing text")
        text = None
    elif not isinstance(text, str):
        problems.append(f"non-string text ({type(text).__name__})")
        text = _json(text)
    keys = {}
    for name, column, normalize in (("id", columns.id, scalar_text), ("task", columns.task, scalar_text),
                                    ("label", columns.label, normalize_label), ("split", columns.split, _split)):
        value = record.get(column)
        try:
            keys[name] = normalize(value)
        except TypeError:
            problems.append(f"{name} is a {type(value).__name__} (expected a string or a number)")
            keys[name] = _json(value)
        except ValueError as exc:
            problems.append(str(exc))
            keys[name] = str(value)
    if keys["id"] is None:
        keys["id"] = content_id(text if text is not None else "", keys["task"])
    known = {columns.text, columns.id, columns.task, columns.label, columns.split}
    extra = {k: v for k, v in record.items() if k not in known}
    return {"text": text, **keys, "meta": _json(extra) if extra else None, "reason": problems[0] if problems else None}


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str, sort_keys=True)


def _split(value: Any) -> str | None:
    """train / validation / test, whatever the input calls them (val, dev, valid -> validation)."""
    name = scalar_text(value)
    if name is None:
        return None
    canonical = SPLITS.get(name.strip().lower())
    if canonical is None:
        raise ValueError(f"unknown split '{name}' (expected train, validation (val, dev) or test)")
    return canonical


# --- record iterators: (row number, record, reason known at read time) ----------------------

def _too_long(max_bytes: int) -> str:
    return f"line longer than {max_bytes} bytes"


def _lines(path: str, encoding: str, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, raw line) of a text file, `None` for a line over `max_bytes`: such a line is
    skipped in chunks, never held whole. A UTF-8 byte-order mark before line 1 is dropped."""
    utf8 = codecs.lookup(encoding).name.startswith("utf-8")
    with _open(path) as f:
        number = 0
        while raw := f.readline(max_bytes + 1):
            number += 1
            if number == 1 and utf8 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if len(raw) > max_bytes and not raw.endswith(b"\n"):
                while (chunk := f.readline(SKIP_CHUNK)) and not chunk.endswith(b"\n"):
                    pass
                yield number, None
            else:
                yield number, raw


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _repair_surrogates(value: Any) -> Any:
    """A parsed JSON value with every lone surrogate (keys too, nested) replaced by U+FFFD."""
    if isinstance(value, str):
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    if isinstance(value, list):
        return [_repair_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_repair_surrogates(k): _repair_surrogates(v) for k, v in value.items()}
    return value


def _jsonl_records(path: str, encoding: str, max_bytes: int) -> Iterator[tuple[int, dict, str | None]]:
    for number, raw in _lines(path, encoding, max_bytes):
        if raw is None:
            yield number, {}, _too_long(max_bytes)
            continue
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
        if _SURROGATE_ESCAPE.search(line):  # a \ud800-\udfff escape: arrow and UTF-8 cannot hold one alone
            broken = [k for k, v in record.items() if _has_surrogates(json.dumps({k: v}, ensure_ascii=False))]
            if broken:
                record = _repair_surrogates(record)
                reason = reason or (f"lone surrogate in field '{_repair_surrogates(broken[0])}' "
                                    "(an unpaired \\u escape such as \\ud800)")
        yield number, record, reason


def _csv_records(path: str, encoding: str, fmt: str, max_bytes: int,
                 header_only: bool = False) -> Iterator[tuple[int, dict, str | None]]:
    """CSV/TSV rows by header. The csv module reads from `_lines`, so an over-long line becomes an
    empty line there and the record holding it is quarantined; a quoted field longer than
    `max_bytes` over several lines (an unclosed quote) is a file error, not a file in memory."""
    long_lines: list[int] = []

    def text_lines() -> Iterator[str]:
        for number, raw in _lines(path, encoding, max_bytes):
            if raw is None:
                long_lines.append(number)
            yield "\n" if raw is None else raw.decode(encoding, "surrogateescape")

    csv.field_size_limit(max_bytes)
    reader = csv.reader(text_lines(), delimiter="\t" if fmt == "tsv" else ",")
    try:
        header = next(reader, None)
        if long_lines:
            raise SiftError(f"{path}: the header line is longer than {max_bytes} bytes (max_line_bytes)")
        if header is None or not any(h.strip() for h in header):
            return
        if header_only:
            yield 1, dict.fromkeys(header), None
            return
        seen_long = 0
        for fields in reader:
            reason = _too_long(max_bytes) if len(long_lines) > seen_long else None
            seen_long = len(long_lines)
            if not fields and reason is None:
                continue
            if any(_has_surrogates(v) for v in fields):
                fields, reason = [_repair(v, encoding) for v in fields], reason or "undecodable bytes"
            if fields and len(fields) != len(header):
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
