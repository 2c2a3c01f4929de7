"""Turn what a user hands `select-pool` into what a method needs.

A pool or target may be: texts (files, folders, globs: ingested here), an ingest folder, an
embedding or gradient feature store, or parquet with `id` and `embedding` columns. Stores sift
derives (ingest, embeddings) live under OUT/<role>/ and are reused when their inputs match.

Pool and target must come from one encoder: a feature store's manifest names its model
(`fingerprint["model"]`, name@content digest), and two different ones are refused; precomputed parquet
names none, so for it the dimension check in `select` is all there is.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.config import EmbedConfig, IngestConfig, SelectPoolConfig
from engine.data.ingest import EXAMPLES, SUMMARY, ingest
from engine.errors import SiftError
from engine.features.embed import embed
from engine.features.store import MANIFEST, FeatureStore, StoreSpec

PRECOMPUTED_SHARD_ROWS = 65_536
ROW_BATCH = 65_536  # example rows per batch when a pool of texts is read in passes


@dataclass
class Candidates:
    """One side of a selection: its features (if any), its examples (if texts), its upstream losses."""

    store: FeatureStore | None
    examples: Path | None  # examples.parquet with full columns, when the input was text
    rows_in: int  # rows the user handed in
    quarantine: pl.DataFrame  # id, reason, stage: rows lost before scoring

    def count(self) -> int:
        """How many candidates can be scored, from the stored files' metadata."""
        if self.store is not None:
            return len(self.store.vectors())
        return pq.ParquetFile(self.examples).metadata.num_rows

    def row_batches(self) -> Iterator[pl.DataFrame]:
        """The candidates' rows (id, task, ...) in feature order (or example order without
        features), a store shard or a parquet batch at a time: never the whole pool at once."""
        if self.store is not None:
            for k in range(self.store.spec.num_shards):
                yield self.store.shard_rows_frame(k)
            return
        for batch in pq.ParquetFile(self.examples).iter_batches(ROW_BATCH):
            yield pl.from_arrow(batch)

    @property
    def encoder(self) -> str | None:
        """The model the features came from, as its store's manifest names it; None when unknown."""
        return None if self.store is None else self.store.spec.fingerprint.get("model")

    def texts(self) -> pl.DataFrame:
        if self.examples is None:
            raise SiftError("this method needs texts, but the input is precomputed features; pass the texts")
        return pl.read_parquet(self.examples)


def resolve(spec: str | None, role: str, cfg: SelectPoolConfig, need: str) -> Candidates:
    """`need`: "embeddings", "grads", "texts" or "any"."""
    if not spec:
        raise SiftError(f"select-pool needs --{role}")
    path = Path(spec)
    work = Path(cfg.out) / role
    if (path / MANIFEST).is_file():
        store = FeatureStore(path)
        if need in ("embeddings", "grads") and store.spec.kind != need:
            raise SiftError(f"{path} is a {store.spec.kind} store, but method {cfg.method!r} needs {need}")
        if need == "texts":
            raise SiftError(f"method {cfg.method!r} needs texts, but {path} is a feature store; pass the texts")
        return Candidates(store, None, store.spec.rows, _quarantine(store.quarantine(), "features"))
    if need == "grads":
        raise SiftError(f"method 'grad-cosine' needs gradient stores (`sift featurize grads`); {path} is not one")
    if _has_embedding_column(path):
        if need == "texts":
            raise SiftError(f"method {cfg.method!r} needs texts, but {path} holds precomputed embeddings")
        store = _store_from_parquet(path, work / "embeddings")
        return Candidates(store, None, store.spec.rows, _quarantine(store.quarantine(), "features"))

    folder, rows_in, lost = _ingested(spec, work, cfg)
    if need in ("texts", "any"):
        return Candidates(None, folder / EXAMPLES, rows_in, lost)
    store, _ = embed(EmbedConfig(data=folder, out=work / "embeddings", model=cfg.encoder, runtime=cfg.runtime),
                     replace_mismatch=True)
    return Candidates(store, folder / EXAMPLES, rows_in, pl.concat([lost, _quarantine(store.quarantine(), "features")]))


def check_same_encoder(pool: Candidates, target: Candidates) -> None:
    """Features of two encoders are not comparable, even at equal dimension: refuse the pair. The
    manifests name a model as folder-name@content-digest; the digest decides (a renamed copy of
    the same weights is the same encoder), the names make the message readable."""
    def digest(encoder: str) -> str:
        return encoder.rpartition("@")[2]

    if pool.encoder is not None and target.encoder is not None and digest(pool.encoder) != digest(target.encoder):
        raise SiftError(f"pool features come from encoder {pool.encoder} but target features from {target.encoder}; "
                        "compute both with the same model")


def _ingested(spec: str, work: Path, cfg: SelectPoolConfig) -> tuple[Path, int, pl.DataFrame]:
    """An ingest folder for the input (the input itself if it already is one)."""
    path = Path(spec)
    if (path / EXAMPLES).is_file() and (path / SUMMARY).is_file():
        folder = path
    else:
        ingest(IngestConfig(inputs=[spec], out=work / "ingest", runtime=cfg.runtime))
        folder = work / "ingest"
    summary = json.loads((folder / SUMMARY).read_text())
    lost = pl.read_parquet(folder / "quarantine.parquet", columns=["id", "reason"])
    return folder, summary["rows_in"], _quarantine(lost, "ingest")


def _quarantine(frame: pl.DataFrame, stage: str) -> pl.DataFrame:
    return frame.select("id", "reason").with_columns(stage=pl.lit(stage))


def _has_embedding_column(path: Path) -> bool:
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or files[0].suffix != ".parquet" or not files[0].is_file():
        return False
    return "embedding" in pq.read_schema(files[0]).names


def _store_from_parquet(path: Path, out: Path) -> FeatureStore:
    """Precomputed embeddings (id + embedding columns) as a feature store. Rows without an id,
    with a non-finite vector, or repeating an earlier good row's id (the first wins: a repeated id
    would be selected twice, past the budget) are quarantined with the reason.

    The vectors go from arrow's list columns straight into float32 arrays, a parquet batch at a
    time (two passes: finiteness for the id check, then the shards), never as Python lists."""
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    stamp = hashlib.sha256("".join(f"{f}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in files).encode())
    ids = pl.read_parquet(files, columns=["id"])
    if ids.height == 0:
        raise SiftError(f"{path}: holds no rows")
    dims, finite = set(), []
    for vectors in _embedding_batches(files, path):
        dims.add(vectors.shape[1])
        finite.append(np.isfinite(vectors).all(axis=1))
    if len(dims) != 1:
        raise SiftError(f"{path}: the embedding column must hold equal-length lists of numbers")
    spec = StoreSpec(kind="embeddings", fingerprint={"source": f"{path}@{stamp.hexdigest()[:16]}",
                                                     "checks": "id, finite, unique id"},
                     dim=dims.pop(), dtype="float32", seed=None, rows=ids.height,
                     shard_rows=PRECOMPUTED_SHARD_ROWS)
    store = FeatureStore.prepare(out, spec, replace_mismatch=True)
    checked = _row_reasons(ids, np.concatenate(finite))
    missing = set(store.missing_shards())
    for k, vectors in enumerate(_rechunk(_embedding_batches(files, path), spec.shard_rows)):
        if k in missing:
            start, stop = store.shard_range(k)
            part = checked.slice(start, stop - start)
            ok = part["reason"].is_null()
            store.write_shard(k, part.filter(ok).select("id"), vectors[ok.to_numpy()],
                              part.filter(~ok).select("id", "reason"))
    return store


def _embedding_batches(files: list[Path], path: Path) -> Iterator[np.ndarray]:
    """The embedding column as float32 (rows, dim) arrays, one parquet batch at a time."""
    def refuse() -> SiftError:
        return SiftError(f"{path}: the embedding column must hold equal-length lists of numbers")

    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(ROW_BATCH, columns=["embedding"]):
            column = batch.column(0)
            if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
                    or pa.types.is_fixed_size_list(column.type)) or column.null_count:
                raise refuse()
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
            if len(lengths) and (lengths != lengths[0]).any():
                raise refuse()
            values = column.flatten()
            if values.null_count:
                raise refuse()
            try:
                flat = values.cast(pa.float32()).to_numpy(zero_copy_only=False)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise refuse() from None
            yield flat.reshape(len(column), int(lengths[0]) if len(lengths) else 0)


def _rechunk(batches: Iterator[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    """The same rows in arrays of exactly `rows` (the last one shorter)."""
    pending: list[np.ndarray] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += len(batch)
        while held >= rows:
            joined = np.concatenate(pending)
            yield joined[:rows]
            pending, held = [joined[rows:]], held - rows
    if held:
        yield np.concatenate(pending)


def _row_reasons(ids: pl.DataFrame, finite: np.ndarray) -> pl.DataFrame:
    """id, reason (null: kept) per precomputed row; among otherwise good rows the first id wins."""
    row = pl.col("row")
    reason = (pl.when(pl.col("id").is_null()).then(pl.lit("missing id"))
              .when(~pl.col("finite")).then(pl.lit("non-finite embedding")))
    checked = ids.with_row_index("row").with_columns(finite=pl.Series(finite)).with_columns(reason=reason)
    first = row.filter(pl.col("reason").is_null()).min().over("id")
    return checked.with_columns(
        reason=pl.when(pl.col("reason").is_null() & (row != first))
        .then(pl.format("duplicate id (first at row {})", first + 1))
        .otherwise(pl.col("reason"))
    ).select("id", "reason")
