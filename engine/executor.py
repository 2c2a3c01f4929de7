"""One way to run a stage: fingerprint it, skip it when done, write its done marker last.

A stage's fingerprint is the hash of its whole config (less the settings that only say where or
how fast it runs) and of the fingerprints of what it reads: an input that is a finished stage's
output contributes that stage's fingerprint, any other input a digest of its content. So a rerun
with the same config on the same inputs skips the stage, and any change to a setting or to an
input upstream reruns it and everything downstream.

The done marker (`OUT/_sift_done.json`: stage, fingerprint, seconds, result) is deleted before a
stage starts and written after every output, so a half-written output — a crash, a killed node,
an object left under the prefix by someone else — is never taken for a finished one. Finer
resumption inside a stage (feature-store shards, Train checkpoints, Tune experiments) names its
state with `digest` too.

Outputs on object storage: a stage whose code writes a local folder runs into a local work folder
that is uploaded before the marker is written; its remote inputs are read from cached local copies.
Stages that speak storage natively (feature stores) get their URIs as they are.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from engine import shared, storage
from engine.errors import SiftError
from engine.paths import cache_dir

MARKER = "_sift_done.json"


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (pydantic models and paths are dumped first)."""
    canonical = json.dumps([_jsonable(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def input_digest(uri: str | os.PathLike | None) -> str:
    """What an input contributes to a fingerprint: a finished stage's fingerprint when `uri` is
    one's output, else the names, sizes and modification times (ETags on object storage) of its
    files, so an edited file is never mistaken for the one a stage already read. Built-in names
    (a model such as "minilm", a corpus) stand for themselves."""
    if uri is None:
        return "none"
    uri = os.fspath(uri)
    if not storage.is_remote(uri) and glob.has_magic(uri):  # an ingest glob: the files it matches now
        return f"glob:{digest([storage.stamp(f) for f in sorted(glob.glob(uri, recursive=True))])}"
    if not storage.exists(uri):
        return f"name:{uri}"
    marker = read_marker(uri)
    if marker is not None:
        return f"stage:{marker.fingerprint}"
    return f"files:{storage.stamp(uri)}"


def settings_digest(cfg: BaseModel, exclude: set[str] | tuple[str, ...] = ()) -> str:
    """Digest of a config's settings, less where it runs and where it reads and writes."""
    return digest(cfg.model_dump(mode="json", exclude={"data", "out", "force", "replace_mismatch", "runtime", "actors",
                                                       *exclude}))


def data_digest(examples: str | os.PathLike) -> str:
    """Digest of the example columns that features depend on (id, text, task, label): edited
    data never reuses stale features, whatever its file's name or time."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(examples)
    names = pq.read_schema(path, filesystem=fs).names
    table = pq.read_table(path, columns=[c for c in ("id", "text", "task", "label") if c in names], filesystem=fs)
    h = hashlib.sha256()
    for column in table.itercolumns():
        for chunk in column.chunks:
            for buffer in chunk.buffers():
                if buffer is not None:
                    h.update(memoryview(buffer))
    return f"{table.num_rows} rows@{h.hexdigest()[:16]}"


def folder_digest(folder: str | os.PathLike | None) -> str:
    """Name and content digest of a model or adapter folder: its JSON files and the bytes of its
    weights, so a retrained adapter of the same rank and size is never taken for the old one.
    Hashing weights is slow for big models, so each file's digest is cached by path, size and
    modification time."""
    if folder is None:
        return "none"
    h = hashlib.sha256()
    for f in sorted(Path(folder).iterdir()):
        if f.suffix == ".json":
            h.update(f.read_bytes())
        elif f.suffix == ".safetensors":
            h.update(f"{f.name}:{_file_digest(f)}".encode())
    return f"{Path(folder).name}@{h.hexdigest()[:12]}"


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key = digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    cached = cache_dir("digests") / key
    if cached.is_file():
        return cached.read_text()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    value = h.hexdigest()[:16]
    storage.write_text(str(cached), value)
    return value


class Marker(BaseModel):
    stage: str
    fingerprint: str
    seconds: float
    result: dict[str, Any]


def read_marker(out: str) -> Marker | None:
    path = storage.join(out, MARKER)
    if not storage.exists(path):
        return None
    try:
        return Marker.model_validate(storage.read_json(path))
    except (SiftError, ValueError):
        return None  # a foreign or corrupt marker is no proof of anything: the stage reruns


@dataclass(frozen=True)
class Outcome:
    """What a stage run ended as: ran now, or skipped because its marker matched."""

    stage: str
    status: Literal["ran", "skipped (done)"]
    seconds: float
    fingerprint: str
    result: Any  # the stage's typed Result


def fingerprint(stage, cfg) -> str:
    """Hash of the stage's settings and of the digests of its inputs. Input and output paths
    enter by content, not by name, so a finished output copied elsewhere is still finished."""
    reads_from = (*stage.inputs, *stage.worker_inputs)
    paths = set(reads_from) | ({stage.output} if stage.output else set())
    settings = cfg.model_dump(mode="json", exclude=set(stage.ignore) | {"runtime", "force"} | paths)
    reads = {}
    for field in reads_from:
        value = getattr(cfg, field)
        reads[field] = [input_digest(v) for v in value] if isinstance(value, list) else input_digest(value)
    return digest(stage.name, settings, reads)


def run(stage, cfg, force: bool = False) -> Outcome:
    """Run `stage` on `cfg` unless its output already holds a finished run of the same fingerprint."""
    out = getattr(cfg, stage.output) if stage.output else None
    fp = fingerprint(stage, cfg)
    marker = read_marker(out) if out is not None else None
    if marker is not None and marker.stage == stage.name:
        if marker.fingerprint == fp and not force:
            return Outcome(stage.name, "skipped (done)", marker.seconds, fp, stage.result.model_validate(marker.result))
        if stage.replace_stale:  # its own earlier output, for other settings or inputs: replaced if it differs
            cfg = cfg.model_copy(update={"replace_mismatch": True})
    shared.check_output(out, getattr(cfg, "runtime", None))  # on a cluster, a local `out` every node sees
    started = time.perf_counter()
    if out is not None:
        storage.delete(storage.join(out, MARKER))
    result = _run_with_storage(stage, cfg, out, fp)
    seconds = round(time.perf_counter() - started, 1)
    if out is not None:
        storage.write_json(storage.join(out, MARKER), Marker(stage=stage.name, fingerprint=fp, seconds=seconds,
                                                             result=result.model_dump(mode="json")).model_dump())
    return Outcome(stage.name, "ran", seconds, fp, result)


def _run_with_storage(stage, cfg, out: str | None, fp: str):
    """Local code on local paths: remote inputs become cached local copies, a remote output a
    local work folder uploaded when the stage returns (before the marker is written)."""
    remote_out = out is not None and storage.is_remote(out)
    update: dict[str, Any] = {}
    if not stage.native_storage:
        for field in stage.inputs:
            value = getattr(cfg, field)
            if isinstance(value, list):
                update[field] = [_local(v) for v in value]
            elif value is not None:
                update[field] = _local(value)
        if remote_out:
            work = cache_dir("work", f"{stage.name}-{fp}")
            update[stage.output] = str(work)
            runtime = getattr(cfg, "runtime", None)
            if runtime is not None and runtime.checkpoints is None:  # Train/Tune state where every node sees it
                update["runtime"] = runtime.model_copy(update={"checkpoints": storage.join(out, "_checkpoints")})
    result = stage.run(cfg.model_copy(update=update) if update else cfg)
    if remote_out and not stage.native_storage:
        storage.upload(work, out)
        shutil.rmtree(work, ignore_errors=True)
        if "out" in type(result).model_fields:  # the result names where its output is, not the work folder
            result = result.model_copy(update={"out": out})
    return result


def _local(uri: str) -> str:
    return str(storage.local_copy(uri)) if storage.is_remote(uri) else uri


def require(value, flag: str, command: str):
    """A required setting: a one-line error naming the flag when it is missing."""
    if value in (None, [], ""):
        raise SiftError(f"{command} needs {flag}")
    return value
