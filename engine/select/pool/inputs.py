"""Turn what a user hands `select-pool` into what a method needs.

A pool or target may be: texts (files, folders, globs), an ingest folder, an embedding or
gradient feature store, or parquet with `id` and `embedding` columns; each a location
`engine.storage` serves (a local path, s3://, gs://, ...), read where it lies.

What select-pool derives from texts is made by the registered `ingest` and `embed` stages through
the one executor, exactly as `sift ingest` / `sift featurize embed` or a `sift run` step would:
OUT/<role>/ingest and OUT/<role>/embeddings each hold their own done marker, so a rerun of
select-pool (any of its other settings changed) skips them, and a changed input redoes them and
only them. Precomputed embeddings become a feature store under OUT/<role>/embeddings, reused while
its manifest names the same files (their `storage.stamp`).

Pool and target must come from one encoder: a feature store's manifest names its model
(`fingerprint["model"]`, name@content digest), and two different ones are refused; precomputed parquet
names none, so for it the dimension check in `select` is all there is.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import executor, storage
from engine.config import EmbedConfig, IngestConfig, SelectPoolConfig
from engine.data.ingest import EXAMPLES, QUARANTINE, SUMMARY
from engine.errors import SiftError
from engine.features.store import FeatureStore, StoreSpec
from engine.paths import cache_dir

PRECOMPUTED_SHARD_ROWS = 65_536
ROW_BATCH = 65_536  # rows per batch when examples or precomputed parquet are read in passes
STAGED = pa.schema([("id", pa.string()), ("order", pa.int64()), ("reason", pa.string())])


@dataclass
class Candidates:
    """One side of a selection: its features (if any), its examples (if texts), its upstream losses."""

    store: FeatureStore | None
    examples: str | None  # location of the examples (full columns), when the input was text
    rows_in: int  # rows the user handed in
    quarantine: pl.DataFrame  # id, reason, stage: rows lost before scoring
    derived: dict[str, str] = field(default_factory=dict)  # stage it derived -> "ran" / "skipped (done)"

    def count(self) -> int:
        """How many candidates can be scored, from the stored files' metadata."""
        if self.store is not None:
            return len(self.store.vectors())
        return storage.parquet_rows(self.examples)

    def row_batches(self) -> Iterator[pl.DataFrame]:
        """The candidates' rows (id, task, ...) in feature order (or example order without
        features), a store shard or a parquet batch at a time: never the whole pool at once."""
        if self.store is not None:
            for k in range(self.store.spec.num_shards):
                yield self.store.shard_rows_frame(k)
            return
        yield from storage.iter_parquet_batches(self.examples, batch_rows=ROW_BATCH)

    def text_batches(self) -> Iterator[list[str]]:
        """The texts in example order, a parquet batch at a time (text-only methods)."""
        if self.examples is None:
            raise SiftError("this method needs texts, but the input is precomputed features; pass the texts")
        for frame in storage.iter_parquet_batches(self.examples, columns=["text"], batch_rows=ROW_BATCH):
            yield frame["text"].to_list()

    @property
    def encoder(self) -> str | None:
        """The model the features came from, as its store's manifest names it; None when unknown."""
        return None if self.store is None else self.store.spec.fingerprint.get("model")


def resolve(spec: str | None, role: str, cfg: SelectPoolConfig, need: str) -> Candidates:
    """`need`: "embeddings", "grads", "texts" or "any"."""
    if not spec:
        raise SiftError(f"select-pool needs --{role}")
    spec = storage.validate_uri(spec)
    work = storage.join(cfg.out, role)
    if FeatureStore.exists(spec):
        store = FeatureStore(spec)
        if need in ("embeddings", "grads") and store.spec.kind != need:
            raise SiftError(f"{spec} is a {store.spec.kind} store, but method {cfg.method!r} needs {need}")
        if need == "texts":
            raise SiftError(f"method {cfg.method!r} needs texts, but {spec} is a feature store; pass the texts")
        return Candidates(store, None, store.spec.rows, _quarantine(store.quarantine(), "features"))
    if need == "grads":
        raise SiftError(f"method 'grad-cosine' needs gradient stores (`sift featurize grads`); {spec} is not one")
    files = _parquet_files(spec)
    if files and "embedding" in _column_names(files[0]):
        if "id" not in _column_names(files[0]):
            raise SiftError(f"{spec}: precomputed embeddings need an id column beside the embedding column")
        if need == "texts":
            raise SiftError(f"method {cfg.method!r} needs texts, but {spec} holds precomputed embeddings")
        store = _store_from_parquet(spec, files, storage.join(work, "embeddings"))
        return Candidates(store, None, store.spec.rows, _quarantine(store.quarantine(), "features"))

    folder, rows_in, lost, derived = _ingested(spec, work, cfg)
    examples = storage.join(folder, EXAMPLES)
    if need in ("texts", "any"):
        return Candidates(None, examples, rows_in, lost, derived)
    embeddings = storage.join(work, "embeddings")
    outcome = _derived("embed", EmbedConfig(data=folder, out=embeddings, model=cfg.encoder, runtime=cfg.runtime),
                       cfg.force)
    store = FeatureStore(embeddings)
    return Candidates(store, examples, rows_in, pl.concat([lost, _quarantine(store.quarantine(), "features")]),
                      {**derived, "embed": outcome.status})


def check_same_encoder(pool: Candidates, target: Candidates) -> None:
    """Features of two encoders are not comparable, even at equal dimension: refuse the pair. The
    manifests name a model as folder-name@content-digest; the digest decides (a renamed copy of
    the same weights is the same encoder), the names make the message readable."""
    def digest(encoder: str) -> str:
        return encoder.rpartition("@")[2]

    if pool.encoder is not None and target.encoder is not None and digest(pool.encoder) != digest(target.encoder):
        raise SiftError(f"pool features come from encoder {pool.encoder} but target features from {target.encoder}; "
                        "compute both with the same model")


def _derived(name: str, cfg, force: bool) -> executor.Outcome:
    """Registered stage `name` on `cfg` through the executor: skipped when its output holds a
    finished run of the same fingerprint, run otherwise; `force` redoes it from scratch.

    The output lies under select-pool's OUT and belongs to it, so a feature store there made for
    another request (an earlier input, a run killed before its marker) is select-pool's own stale
    output: replaced, where the embed stage alone would refuse it. A store made for this very
    request is resumed, so an input rewritten with the same rows reruns ingest but embeds nothing."""
    from engine.stages import STAGES  # the registry sits above this module: looked up when used

    if force and "force" in type(cfg).model_fields:
        cfg = cfg.model_copy(update={"force": True})  # a feature store discards its finished shards too
    elif "replace_mismatch" in type(cfg).model_fields:  # not fingerprinted: a finished run is still skipped
        cfg = cfg.model_copy(update={"replace_mismatch": True})
    return executor.run(STAGES[name], cfg, force=force)


def _ingested(spec: str, work: str, cfg: SelectPoolConfig) -> tuple[str, int, pl.DataFrame, dict[str, str]]:
    """An ingest folder for the input (the input itself if it already is one), its rows in, its
    quarantined rows and what was derived."""
    if storage.is_file(storage.join(spec, EXAMPLES)) and storage.is_file(storage.join(spec, SUMMARY)):
        folder, rows_in, derived = spec, storage.read_json(storage.join(spec, SUMMARY))["rows_in"], {}
    else:
        folder = storage.join(work, "ingest")
        outcome = _derived("ingest", IngestConfig(inputs=[spec], out=folder, runtime=cfg.runtime), cfg.force)
        rows_in, derived = outcome.result.rows_in, {"ingest": outcome.status}
    lost = storage.read_parquet(storage.join(folder, QUARANTINE), columns=["id", "reason"])
    return folder, rows_in, _quarantine(lost, "ingest"), derived


def _quarantine(frame: pl.DataFrame, stage: str) -> pl.DataFrame:
    return frame.select("id", "reason").with_columns(stage=pl.lit(stage))


def _parquet_files(spec: str) -> list[str]:
    """The parquet file `spec`, or the parquet files directly in folder `spec`; [] otherwise."""
    if storage.is_file(spec):
        return [spec] if spec.endswith(".parquet") else []
    if storage.is_dir(spec):
        return [f for f in storage.list_files(spec, recursive=False) if f.endswith(".parquet")]
    return []


def _column_names(file: str) -> list[str]:
    fs, path = storage.filesystem(file)
    return pq.read_schema(path, filesystem=fs).names


def _store_from_parquet(spec: str, files: list[str], out: str) -> FeatureStore:
    """Precomputed embeddings (id + embedding columns) as a feature store. Rows without an id,
    with a non-finite vector, or repeating an earlier good row's id (the first wins: a repeated id
    would be selected twice, past the budget) are quarantined with the reason.

    Never the whole column in the driver: a first pass over parquet batches checks the vectors
    (arrow lists straight into float32 arrays, never Python lists) and stages id, row number and
    reason in a local file; repeated ids are found there one hash bucket at a time (ingest's
    bucketed check, at most `engine.data.ingest.BUCKET_ROWS` ids in memory); a second pass writes
    the shards. What the driver keeps whole: the row numbers of repeated ids (16 bytes per
    repeat). A store already finished from these very files is reused without a pass."""
    rows = sum(storage.parquet_rows(f) for f in files)
    if rows == 0:
        raise SiftError(f"{spec}: holds no rows")
    fingerprint = {"source": f"{spec}@{storage.stamp(spec)}", "checks": "id, finite, unique id"}
    if FeatureStore.exists(out):
        done = FeatureStore(out)
        if done.spec.fingerprint == fingerprint and done.spec.rows == rows and not done.missing_shards():
            return done
    with tempfile.TemporaryDirectory(dir=cache_dir("work"), prefix="precomputed-") as scratch:
        staged, dim, repeats = _check_rows(spec, files, Path(scratch))
        spec_ = StoreSpec(kind="embeddings", fingerprint=fingerprint, dim=dim, dtype="float32", seed=None, rows=rows,
                          shard_rows=PRECOMPUTED_SHARD_ROWS)
        store = FeatureStore.prepare(out, spec_, replace_mismatch=True)
        missing = set(store.missing_shards())
        repeat_rows = repeats["order"].to_numpy()
        for k, vectors in enumerate(_rechunk(_embedding_batches(files, spec), spec_.shard_rows)):
            if k not in missing:
                continue
            start, stop = store.shard_range(k)
            part = storage.read_parquet_slice(staged, start, stop - start)
            lo, hi = np.searchsorted(repeat_rows, [start, stop])
            if hi > lo:
                again = repeats.slice(lo, hi - lo).select(
                    "order", duplicate=pl.format("duplicate id (first at row {})", pl.col("first") + 1))
                part = part.join(again, on="order", how="left", maintain_order="left").with_columns(
                    reason=pl.coalesce("reason", "duplicate"))
            ok = part["reason"].is_null()
            store.write_shard(k, part.filter(ok).select("id"), vectors[ok.to_numpy()],
                              part.filter(~ok).select("id", "reason"))
    return store


def _check_rows(spec: str, files: list[str], scratch: Path) -> tuple[str, int, pl.DataFrame]:
    """First pass: (staged file of id, order, reason), the dimension, and (order, first) of every
    good row whose id an earlier good row has."""
    from engine.data.ingest import Staged, repeated_ids  # its bucketed check, on our staged rows

    staged = scratch / "ids.parquet"
    dims, passed, order = set(), 0, 0
    reason = (pl.when(pl.col("id").is_null()).then(pl.lit("missing id"))
              .when(~pl.col("finite")).then(pl.lit("non-finite embedding")))
    with pq.ParquetWriter(staged, STAGED) as writer:
        for frame, vectors in _id_and_vector_batches(files, spec):
            dims.add(vectors.shape[1])
            checked = frame.select(pl.col("id").cast(pl.String), order=pl.int_range(order, order + frame.height),
                                   finite=pl.Series(np.isfinite(vectors).all(axis=1))).with_columns(reason=reason)
            writer.write_table(checked.select(STAGED.names).to_arrow().cast(STAGED))
            passed += checked["reason"].null_count()
            order += frame.height
    if len(dims) != 1:
        raise _not_vectors(spec)
    repeats = repeated_ids(Staged(staged, {}, passed), scratch) if passed else pl.DataFrame(
        schema={"order": pl.Int64, "first": pl.Int64})
    return str(staged), dims.pop(), repeats


def _not_vectors(spec: str) -> SiftError:
    return SiftError(f"{spec}: the embedding column must hold equal-length lists of numbers")


def _id_and_vector_batches(files: list[str], spec: str) -> Iterator[tuple[pl.DataFrame, np.ndarray]]:
    for file in files:
        for frame in storage.iter_parquet_batches(file, columns=["id", "embedding"], batch_rows=ROW_BATCH):
            yield frame.select("id"), _float32_rows(frame["embedding"].to_arrow(), spec)


def _embedding_batches(files: list[str], spec: str) -> Iterator[np.ndarray]:
    """The embedding column as float32 (rows, dim) arrays, one parquet batch at a time."""
    for file in files:
        for frame in storage.iter_parquet_batches(file, columns=["embedding"], batch_rows=ROW_BATCH):
            yield _float32_rows(frame["embedding"].to_arrow(), spec)


def _float32_rows(column: pa.Array, spec: str) -> np.ndarray:
    """An arrow list column of equal-length number lists as a float32 (rows, dim) array."""
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)) or column.null_count:
        raise _not_vectors(spec)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        raise _not_vectors(spec)
    values = column.flatten()
    if values.null_count:
        raise _not_vectors(spec)
    try:
        flat = values.cast(pa.float32()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise _not_vectors(spec) from None
    return flat.reshape(len(column), int(lengths[0]) if len(lengths) else 0)


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
