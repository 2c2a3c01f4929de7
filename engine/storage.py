"""Every read and write sift does, over local folders and object storage alike.

A location is a plain string: a local path (`runs/x`, `/data/x`), `file:///data/x`, `s3://bucket/key`,
`gs://bucket/key`, or any other scheme pyarrow or fsspec knows. All of them go through
`pyarrow.fs`; fsspec (wrapped in `pyarrow.fs.PyFileSystem`) only serves schemes pyarrow has no
backend for. On a cluster every node reads and writes the same object store with its own
credentials, so no node needs a shared POSIX mount.

S3 honours the standard environment, so any S3-compatible store works: `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL` (endpoint), `AWS_REGION` / `AWS_DEFAULT_REGION` (region), and credentials from
the usual chain (environment keys, `~/.aws`, instance profile). Filesystems are cached per
(scheme, bucket, endpoint, region), so a changed environment gets a new client.

Writes are atomic: a reader sees the old object, the whole new one, or none, never a part.
- Local: the bytes go to a temporary file in the same folder, then `os.replace` (atomic on POSIX).
- Object stores: the bytes are produced in memory first (a writer that fails before the end never
  opens a stream, so it leaves no object), then sent by one `write` + `close`. S3 publishes an object
  only when its PutObject or CompleteMultipartUpload succeeds, and since 2020 reads after that
  are strongly consistent, so no temporary key plus copy is needed (a copy would double the
  requests and is limited to 5 GB). pyarrow's `write` of one buffer either sends all of it or
  raises, and a failed part upload makes `close` fail instead of completing the upload.
`upload` is deliberately not atomic as a whole: a folder is many objects; the stage executor
writes its done marker last, so a half-uploaded folder is never taken for a finished one.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine.errors import SiftError
from engine.paths import cache_dir

# A scheme of two or more letters ("C:" is a Windows drive, not a scheme), then ':'.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(.*)$", re.S)
_BUCKETED = {"s3", "gs", "gcs", "s3a", "abfs", "az", "hdfs"}  # schemes whose first part names a bucket/host
_TMP = ".sift-tmp-"  # infix of local temporary files; never a finished object


# --- names ------------------------------------------------------------------------------------


def _scheme(uri: str) -> str:
    """The lower-case scheme of a URI; "" for a local path."""
    m = _SCHEME.match(uri)
    return m.group(1).lower() if m and m.group(2).startswith("//") else ""


def is_remote(uri: str | os.PathLike) -> bool:
    """True for object stores and other non-local schemes (file:// and plain paths are local)."""
    return _scheme(str(uri)) not in ("", "file")


def validate_uri(value: Any) -> str:
    """A location as a clean string, or a one-line SiftError saying what is wrong with it.

    Catches the classic mangling of `s3://b/x` into `s3:/b/x` (what `pathlib.Path` or a shell
    variable join does to a URI), a missing bucket, and values that are not locations at all.
    """
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise SiftError(f"{value!r} is not a path or URI (expected a local path or e.g. s3://bucket/key)")
    value = value.strip()
    m = _SCHEME.match(value)
    if m is None:
        return value  # a local path
    scheme, rest = m.group(1), m.group(2)
    if not rest.startswith("//"):
        fixed = f"{scheme}://{rest.lstrip('/')}"
        raise SiftError(f"{value!r} is a malformed URI: '{scheme}:' must be followed by '//' (did you mean "
                        f"{fixed!r}? a pathlib.Path collapses '//' to '/')")
    if scheme.lower() == "file":
        if not rest[2:].startswith("/"):
            raise SiftError(f"{value!r} is a malformed file URI: use file:///absolute/path")
        return value
    bucket = rest[2:].split("/", 1)[0]
    if scheme.lower() in _BUCKETED and not bucket:
        raise SiftError(f"{value!r} names no bucket: use {scheme}://BUCKET/key")
    return value


def _local_path(uri: str) -> str:
    """The absolute local path of a local path or file:// URI."""
    if _scheme(uri) == "file":
        uri = uri[len("file://"):]
    return os.path.abspath(os.path.expanduser(uri))


def absolute(uri: str | os.PathLike) -> str:
    """The same location, independent of the working directory (Ray workers run elsewhere):
    local paths become absolute paths, URIs stay as they are."""
    uri = validate_uri(uri)
    return uri if is_remote(uri) else _local_path(uri)


def join(uri: str | os.PathLike, *parts: str) -> str:
    """`uri/part/...`, keeping the scheme (no `pathlib`, which breaks `s3://`)."""
    uri = validate_uri(uri)
    if not is_remote(uri) and _scheme(uri) != "file":
        return os.path.join(uri, *parts)
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])


def name(uri: str | os.PathLike) -> str:
    """The last part of a location (`s3://b/x/model` -> `model`)."""
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


# --- filesystems ------------------------------------------------------------------------------


def filesystem(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem serving `uri`, and the path within it."""
    uri = validate_uri(uri)
    scheme = _scheme(uri)
    if scheme in ("", "file"):
        return _local_fs(), _local_path(uri)
    rest = uri.split("://", 1)[1]
    bucket = rest.split("/", 1)[0]
    if scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""
        return _s3_fs(bucket, endpoint, region), rest.rstrip("/")
    if scheme in ("gs", "gcs"):
        return _gcs_fs(os.environ.get("STORAGE_EMULATOR_HOST", "")), rest.rstrip("/")
    fs = _fsspec_fs(scheme, bucket)
    return fs, fs.handler.fs._strip_protocol(uri)


@functools.cache
def _local_fs() -> pafs.FileSystem:
    return pafs.LocalFileSystem()


@functools.cache
def _s3_fs(bucket: str, endpoint: str, region: str) -> pafs.FileSystem:
    """One S3 client per (bucket, endpoint, region). Credentials are left to the AWS SDK's default
    chain (never copied into the filesystem object, so pickling it leaks no keys)."""
    if not region:
        region = "us-east-1" if endpoint else _bucket_region(bucket)
    return pafs.S3FileSystem(region=region, endpoint_override=endpoint or None)


def _bucket_region(bucket: str) -> str:
    try:
        return pafs.resolve_s3_region(bucket)
    except (OSError, pa.ArrowException):
        return "us-east-1"


@functools.cache
def _gcs_fs(emulator: str) -> pafs.FileSystem:
    """Google Cloud Storage with the default credentials; STORAGE_EMULATOR_HOST points it at an emulator."""
    if emulator:
        return pafs.GcsFileSystem(endpoint_override=emulator.split("://")[-1], scheme="http", anonymous=True)
    return pafs.GcsFileSystem()


@functools.cache
def _fsspec_fs(scheme: str, bucket: str) -> pafs.PyFileSystem:
    """A scheme pyarrow has no backend for (az://, abfs://, hf://, ...) through fsspec."""
    del bucket  # part of the cache key only: one client per container/host
    try:
        import fsspec

        fs = fsspec.filesystem(scheme)
    except (ImportError, ValueError) as exc:
        raise SiftError(f"{scheme}://: no filesystem for this scheme ({str(exc).splitlines()[0]})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _info(uri: str) -> pafs.FileInfo:
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path)
    except (OSError, pa.ArrowException) as exc:
        raise SiftError(f"{uri}: cannot read ({str(exc).splitlines()[0]})") from None


def _uri_of(uri: str, root_path: str, path: str) -> str:
    """The URI of `path` (a path of the filesystem serving `uri`, whose own path is `root_path`)."""
    return join(uri, path[len(root_path):].lstrip("/")) if path != root_path else uri


# --- queries ----------------------------------------------------------------------------------


def exists(uri: str | os.PathLike) -> bool:
    return _info(str(uri)).type != pafs.FileType.NotFound


def is_dir(uri: str | os.PathLike) -> bool:
    """A folder, or on an object store a prefix that holds at least one object."""
    return _info(str(uri)).type == pafs.FileType.Directory


def is_file(uri: str | os.PathLike) -> bool:
    return _info(str(uri)).type == pafs.FileType.File


def _file_infos(uri: str, recursive: bool = True) -> list[pafs.FileInfo]:
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except (OSError, pa.ArrowException) as exc:
        raise SiftError(f"{uri}: cannot list ({str(exc).splitlines()[0]})") from None
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def list_files(uri: str | os.PathLike, recursive: bool = True) -> list[str]:
    """The files under a folder/prefix as full locations (same scheme as `uri`), sorted; [] if none.
    Local temporary files of unfinished atomic writes are left out."""
    uri = validate_uri(uri)
    _, root = filesystem(uri)
    return [_uri_of(uri, root, i.path) for i in _file_infos(uri, recursive) if _TMP not in i.base_name]


def size(uri: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a folder/prefix."""
    uri = validate_uri(uri)
    info = _info(uri)
    if info.type == pafs.FileType.File:
        return info.size
    if info.type == pafs.FileType.NotFound:
        raise SiftError(f"{uri}: no such file or folder")
    return sum(i.size for i in _file_infos(uri))


def delete(uri: str | os.PathLike) -> None:
    """Remove a file, or a folder/prefix with everything under it; a missing one is fine."""
    uri = validate_uri(uri)
    fs, path = filesystem(uri)
    info = _info(uri)
    try:
        if info.type == pafs.FileType.File:
            fs.delete_file(path)
        elif info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
    except FileNotFoundError:
        pass  # removed meanwhile by someone else: the goal holds


# --- bytes, text, json --------------------------------------------------------------------------


def read_bytes(uri: str | os.PathLike) -> bytes:
    uri = validate_uri(uri)
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise SiftError(f"{uri}: no such file") from None
    except (OSError, pa.ArrowException) as exc:
        raise SiftError(f"{uri}: cannot read ({str(exc).splitlines()[0]})") from None


@contextmanager
def atomic_writer(uri: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write `uri` through; the object appears only when the block ends
    without an exception (see the module docstring for why this is atomic)."""
    uri = validate_uri(uri)
    fs, path = filesystem(uri)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}{_TMP}")
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
            os.replace(tmp, path)
        except BaseException:
            with _suppress_missing():
                os.unlink(tmp)
            raise
        return
    buffer = io.BytesIO()
    yield buffer  # an exception here propagates before any stream is opened: no object
    _put(uri, fs, path, buffer.getbuffer())


def _put(uri: str, fs: pafs.FileSystem, path: str, data) -> None:
    try:
        stream = fs.open_output_stream(path)
        stream.write(data)  # one C++ call: all of `data` or an exception
        stream.close()  # publishes the object; fails (publishing nothing) if a part upload failed
    except (OSError, pa.ArrowException) as exc:
        raise SiftError(f"{uri}: cannot write ({str(exc).splitlines()[0]})") from None


@contextmanager
def _suppress_missing():
    try:
        yield
    except FileNotFoundError:
        pass


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `uri` atomically (parent folders are created as needed)."""
    with atomic_writer(uri) as f:
        f.write(data)


def read_text(uri: str | os.PathLike) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str | os.PathLike, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str | os.PathLike) -> Any:
    text = read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SiftError(f"{uri}: not valid JSON ({exc})") from None


def write_json(uri: str | os.PathLike, value: Any, indent: int | None = 2) -> None:
    write_text(uri, json.dumps(value, indent=indent))


# --- parquet ----------------------------------------------------------------------------------


def read_parquet(uri: str | os.PathLike, columns: list[str] | None = None) -> pl.DataFrame:
    uri = validate_uri(uri)
    if not is_remote(uri):
        path = _local_path(uri)
        if not os.path.isfile(path):
            raise SiftError(f"{uri}: no such file")
        return pl.read_parquet(path, columns=columns)
    fs, path = filesystem(uri)
    try:
        with fs.open_input_file(path) as f:
            table = pq.ParquetFile(f).read(columns=columns)
    except FileNotFoundError:
        raise SiftError(f"{uri}: no such file") from None
    except (OSError, pa.ArrowException) as exc:
        raise SiftError(f"{uri}: cannot read parquet ({str(exc).splitlines()[0]})") from None
    return pl.from_arrow(table)


def write_parquet(df: pl.DataFrame, uri: str | os.PathLike) -> None:
    """Write `df` to `uri` atomically."""
    with atomic_writer(uri) as f:
        df.write_parquet(f)


def parquet_rows(uri: str | os.PathLike) -> int:
    """Row count from the footer alone."""
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def iter_parquet_batches(uri: str | os.PathLike, columns: list[str] | None = None,
                         batch_rows: int = 65536) -> Iterator[pl.DataFrame]:
    """A parquet file as frames of at most `batch_rows` rows, read one row group at a time
    (never the whole file in memory, local or remote)."""
    uri = validate_uri(uri)
    fs, path = filesystem(uri)
    try:
        f = fs.open_input_file(path)
    except FileNotFoundError:
        raise SiftError(f"{uri}: no such file") from None
    with f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns):
            yield pl.from_arrow(batch)


def read_parquet_slice(uri: str | os.PathLike, offset: int, length: int,
                       columns: list[str] | None = None) -> pl.DataFrame:
    """Rows [offset, offset + length) of a parquet file, reading only the row groups that hold them."""
    uri = validate_uri(uri)
    if not is_remote(uri):
        return pl.scan_parquet(_local_path(uri)).slice(offset, length).select(columns or pl.all()).collect()
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        groups, start, first = [], 0, None
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if start + n > offset and start < offset + length:
                groups.append(g)
                first = start if first is None else first
            start += n
        if not groups:
            return pl.from_arrow(pf.schema_arrow.empty_table()).select(columns or pl.all())
        table = pf.read_row_groups(groups, columns=columns)
    return pl.from_arrow(table).slice(offset - first, length)


# --- moving folders ---------------------------------------------------------------------------


def download(uri: str | os.PathLike, local_dir: str | os.PathLike) -> Path:
    """Copy a file (to `local_dir/<name>`, returned) or a folder's contents (into `local_dir`,
    returned) from any location to local disk."""
    uri = validate_uri(uri)
    local_dir = Path(local_dir)
    fs, path = filesystem(uri)
    info = _info(uri)
    if info.type == pafs.FileType.NotFound:
        raise SiftError(f"{uri}: no such file or folder")
    target = local_dir / name(uri) if info.type == pafs.FileType.File else local_dir
    local_dir.mkdir(parents=True, exist_ok=True)  # copy_files makes the folders below it, not it
    try:
        pafs.copy_files(path, str(target.resolve()), source_filesystem=fs, destination_filesystem=_local_fs())
    except (OSError, pa.ArrowException) as exc:
        raise SiftError(f"{uri}: cannot download ({str(exc).splitlines()[0]})") from None
    return target


def upload(local_path: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy a local file to `uri`, or a local folder's contents under `uri`. Each object is
    complete when visible, the folder as a whole is not: write a done marker after this."""
    uri = validate_uri(uri)
    local_path = Path(local_path)
    if not local_path.exists():
        raise SiftError(f"{local_path}: no such file or folder to upload")
    fs, path = filesystem(uri)
    if not is_remote(uri):  # copy_files makes the folders below the target, not the target's own
        os.makedirs(path if local_path.is_dir() else os.path.dirname(path), exist_ok=True)
    try:
        pafs.copy_files(str(local_path.resolve()), path, source_filesystem=_local_fs(), destination_filesystem=fs)
    except (OSError, pa.ArrowException) as exc:
        raise SiftError(f"{uri}: cannot upload {local_path} ({str(exc).splitlines()[0]})") from None


def local_copy(uri: str | os.PathLike) -> Path:
    """A local path holding `uri`'s file or folder, for libraries that read only from disk
    (transformers, peft). A local location is returned as it is. A remote one is downloaded once
    to `$SIFT_CACHE/objects/<hash of uri>/<hash of its objects' names, sizes and ETags>/<name>`
    (the same last name as the URI's); when the objects change, the next call downloads a fresh
    copy and removes the older ones."""
    uri = validate_uri(uri)
    if not is_remote(uri):
        return Path(_local_path(uri))
    info = _info(uri)
    home = cache_dir("objects", hashlib.sha256(uri.encode()).hexdigest()[:16])
    version = home / stamp(uri)
    if not version.exists():
        staging = Path(tempfile.mkdtemp(dir=home, prefix=_TMP))
        download(uri, staging if info.type == pafs.FileType.File else staging / name(uri))
        try:
            os.rename(staging, version)  # atomic: another process's finished copy wins, ours goes
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
        for old in home.iterdir():
            if old != version and not old.name.startswith(_TMP):
                shutil.rmtree(old, ignore_errors=True)
    return version / name(uri)


def stamp(uri: str | os.PathLike) -> str:
    """A digest of the names, sizes and versions (ETags, else mtimes) of a file or of every file
    under a folder/prefix: it changes whenever any of them is rewritten, without reading them.
    The executor fingerprints inputs with it; `local_copy` names its versions by it."""
    uri = validate_uri(uri)
    fs, _ = filesystem(uri)
    info = _info(uri)
    if info.type == pafs.FileType.NotFound:
        raise SiftError(f"{uri}: no such file or folder")
    files = [info] if info.type == pafs.FileType.File else _file_infos(uri)
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.path}\0{f.size}\0{_version_tag(fs, f)}\n".encode())
    return digest.hexdigest()[:16]


def _version_tag(fs: pafs.FileSystem, info: pafs.FileInfo) -> str:
    """What changes when an object is rewritten: its ETag where the store reports one (mtimes
    have one-second resolution on S3), else its mtime."""
    if isinstance(fs, pafs.S3FileSystem):
        with fs.open_input_file(info.path) as f:  # a HEAD request
            etag = f.metadata().get("ETag") or f.metadata().get(b"ETag")
        if etag:
            return etag.decode() if isinstance(etag, bytes) else str(etag)
    return str(info.mtime_ns)


# --- Ray workers ------------------------------------------------------------------------------

# What a worker on another node needs to reach the same object store as the driver. Keys are
# forwarded only when the driver has them in its environment (e.g. a MinIO or moto endpoint);
# on a cloud cluster the driver has none and each node uses its own instance profile.
WORKER_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "STORAGE_EMULATOR_HOST")


def worker_env() -> dict[str, str]:
    """The storage settings of this process's environment, for Ray's `runtime_env={"env_vars": ...}`."""
    return {k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)}

