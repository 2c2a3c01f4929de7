"""A feature store: a folder (local or object storage) of shards plus a manifest that says exactly
what they hold.

    OUT/manifest.json                 kind, fingerprint (model, adapter, config, data), dim, dtype, seed
    OUT/config.json                   the full featurize request (written by the runner)
    OUT/shards/00000.npy              vectors of the shard's kept rows, (n, dim), float32 or float16
    OUT/shards/00000.parquet          id, task, label (+ f for gradients) of those rows, same order;
                                      its footer names the Ray node that wrote the shard
    OUT/shards/00000.quarantine.parquet   rows that produced no feature, with a reason

OUT is any location `engine.storage` serves (a local folder, s3://, gs://, ...). Shard k always
holds input rows [k * shard_rows, (k + 1) * shard_rows), so any worker on any node can compute any
shard and a rerun computes exactly the missing ones. Each file is written atomically and the rows
file last: that file existing means the shard is done. Nothing else counts: a vectors file
without its rows file (a writer killed mid-shard) or any other object under shards/ is ignored and
overwritten. A store is never silently reused for a different request: the manifest's fingerprint
must match, and a new manifest is only written after clearing shards/ (files there without a
manifest cannot be shown to belong to this request).

Local stores: rows asked for by index (`vectors()[rows]`) are read with explicit reads, never
through a map: a touched page of a mapped file counts in the process's RSS for as long as the map
lives, and the kernel maps whole page-cache folios around each touched row (up to megabytes with a
large readahead), so a few thousand rows gathered at random kept most of a store resident (issue
13). A pass over shards (`iter_batches`, `read_into`, `shard_vectors`) maps one shard at a time,
unmapped when the next is read: at most two maps at once, whatever the number of shards (Linux
allows 65,530 per process). Remote stores are read shard by shard: `vectors()` fetches a shard
when its rows are asked for (a few recent shards kept in memory), `iter_batches` streams them with
the next shard already downloading.
"""

from __future__ import annotations

import functools
import io
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from engine import storage
from engine.config import EmbedConfig, FeaturizeConfig, GradsConfig
from engine.errors import SiftError

MANIFEST = "manifest.json"
CONFIG = "config.json"
SHARDS = "shards"
CACHE_BYTES = 256 << 20  # remote shards kept in memory for random access
FETCH_THREADS = 8  # parallel GETs when many small shard files are read from object storage
WRITER_NODE = "sift.ray_node"  # rows-file metadata: the Ray node that wrote the shard


@dataclass(frozen=True)
class StoreSpec:
    kind: str  # "embeddings" | "grads"
    fingerprint: dict[str, str]  # model, adapter, config, data -> digest (or description)
    dim: int
    dtype: str
    seed: int | None
    rows: int  # input rows, kept + quarantined
    shard_rows: int

    @property
    def num_shards(self) -> int:
        return math.ceil(self.rows / self.shard_rows)


class FeatureStore:
    def __init__(self, root: str | os.PathLike, spec: StoreSpec | None = None):
        self.root = storage.absolute(root)  # absolute: Ray workers may run in another directory
        self.remote = storage.is_remote(self.root)
        if spec is None:
            manifest = storage.join(self.root, MANIFEST)
            if not storage.is_file(manifest):
                raise SiftError(f"{self.root}: not a feature store (no {MANIFEST}); run `sift featurize` first")
            spec = StoreSpec(**storage.read_json(manifest))
        self.spec = spec
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()  # remote shards, most recent last

    @staticmethod
    def exists(root: str | os.PathLike) -> bool:
        """Whether `root` holds a feature store (a manifest)."""
        return storage.is_file(storage.join(root, MANIFEST))

    def path(self, name: str) -> str:
        """The location of a file beside the manifest (e.g. CONFIG)."""
        return storage.join(self.root, name)

    def config(self) -> FeaturizeConfig:
        """The featurize request that built this store (config.json), as its typed config."""
        if not storage.is_file(self.path(CONFIG)):
            raise SiftError(f"{self.root}: no {CONFIG}; rebuild the store with this version of `sift featurize`")
        cls = GradsConfig if self.spec.kind == "grads" else EmbedConfig
        return cls.model_validate_json(storage.read_text(self.path(CONFIG)))

    # --- writing ---------------------------------------------------------------------------

    @classmethod
    def prepare(cls, root: str | os.PathLike, spec: StoreSpec, force: bool = False,
                replace_mismatch: bool = False) -> "FeatureStore":
        """Create the store, or resume one made for the same request. A store made for a different
        request is an error, or replaced when `replace_mismatch` (stores sift derives itself)."""
        root = storage.absolute(root)
        manifest = storage.join(root, MANIFEST)
        if not force and storage.is_file(manifest):
            differs = _differences(storage.read_json(manifest), asdict(spec))
            if differs and replace_mismatch:
                return cls.prepare(root, spec, force=True)
            if differs:
                raise SiftError(f"{root} holds a feature store for a different request ({differs}); "
                                "use another --out, or --force to replace it")
            return cls(root, spec)
        # Manifest first: a crash in between leaves no manifest, never an old one over new shards.
        storage.delete(manifest)
        storage.delete(storage.join(root, SHARDS))
        storage.write_json(manifest, asdict(spec))
        return cls(root, spec)

    def shard_range(self, k: int) -> tuple[int, int]:
        start = k * self.spec.shard_rows
        return start, min(start + self.spec.shard_rows, self.spec.rows)

    def _files(self, k: int) -> tuple[str, str, str]:
        """Shard k's vectors, rows and quarantine files."""
        return tuple(storage.join(self.root, SHARDS, f"{k:05d}{suffix}")
                     for suffix in (".npy", ".parquet", ".quarantine.parquet"))

    def done(self, k: int) -> bool:
        return storage.is_file(self._files(k)[1])

    def missing_shards(self) -> list[int]:
        """Shards whose rows file is absent, from one listing of shards/ (one request on S3)."""
        present = {storage.name(f) for f in storage.list_files(storage.join(self.root, SHARDS), recursive=False)}
        return [k for k in range(self.spec.num_shards) if f"{k:05d}.parquet" not in present]

    def write_shard(self, k: int, rows: pl.DataFrame, vectors: np.ndarray, quarantine: pl.DataFrame) -> None:
        start, stop = self.shard_range(k)
        if rows.height + quarantine.height != stop - start:
            raise AssertionError(f"shard {k}: {rows.height} kept + {quarantine.height} quarantined != {stop - start} rows")
        if vectors.shape != (rows.height, self.spec.dim):
            raise AssertionError(f"shard {k}: vectors {vectors.shape} != ({rows.height}, {self.spec.dim})")
        npy, parquet, quarantined = self._files(k)
        with storage.atomic_writer(npy) as f:
            np.save(f, vectors.astype(self.spec.dtype, copy=False))
        storage.write_parquet(quarantine, quarantined)
        node = _ray_node()
        with storage.atomic_writer(parquet) as f:  # last: marks the shard done
            rows.write_parquet(f, metadata={WRITER_NODE: node} if node else None)

    # --- reading ---------------------------------------------------------------------------

    def check_complete(self) -> None:
        missing = self.missing_shards()
        if missing:
            raise SiftError(f"{self.root}: feature store is incomplete ({len(missing)} of {self.spec.num_shards} "
                            "shards missing); rerun the same `sift featurize` command to finish it")

    def rows(self, columns: list[str] | None = None) -> pl.DataFrame:
        """Row metadata (id, task, label, ...) of every stored vector, in store order; only
        `columns` when given (a large store's row metadata is read whole here)."""
        self.check_complete()
        return pl.concat(self._each_shard(lambda k: storage.read_parquet(self._files(k)[1], columns=columns)))

    def quarantine(self) -> pl.DataFrame:
        self.check_complete()
        return pl.concat(self._each_shard(lambda k: storage.read_parquet(self._files(k)[2])))

    def vectors(self) -> "ShardedVectors":
        """Every stored vector as one (n, dim) view aligned with `rows()`: rows read from the
        shard files as they are asked for (local), or shards fetched on demand (remote)."""
        self.check_complete()
        dtype = np.dtype(self.spec.dtype)
        if not self.remote:
            layouts = [_npy_layout(self._files(k)[0], dtype, self.spec.dim) for k in range(self.spec.num_shards)]
            counts = [rows for rows, _ in layouts]
            read = functools.partial(self._read_rows, [start for _, start in layouts])
            return ShardedVectors(counts, self.spec.dim, dtype, read, self.shard_vectors)
        counts = self._each_shard(lambda k: storage.parquet_rows(self._files(k)[1]))
        return ShardedVectors(counts, self.spec.dim, dtype, self._cached_rows, self._fetch_shard)

    def shard_vectors(self, k: int) -> np.ndarray:
        """Shard k's vectors: memory-mapped from a local store, downloaded (and kept in a small
        cache) from a remote one."""
        if not self.remote:
            return np.load(self._files(k)[0], mmap_mode="r")
        return self._cached_shard(k)

    def shard_rows_frame(self, k: int) -> pl.DataFrame:
        """Shard k's row metadata (id, task, ...), aligned with `shard_vectors(k)`: a pass over a
        large store reads it shard by shard instead of `rows()` whole."""
        return storage.read_parquet(self._files(k)[1])

    def shard_node(self, k: int) -> str | None:
        """The Ray node id that wrote finished shard k (None when written outside Ray), from its
        rows file's footer: where the work of a run actually went."""
        fs, path = storage.filesystem(self._files(k)[1])
        with fs.open_input_file(path) as f:
            value = (pq.ParquetFile(f).metadata.metadata or {}).get(WRITER_NODE.encode())
        return value.decode() if value else None

    def shard_nodes(self) -> list[str | None]:
        """`shard_node` of every shard, in order."""
        self.check_complete()
        return self._each_shard(self.shard_node)

    def size_bytes(self) -> int:
        return storage.size(storage.join(self.root, SHARDS))

    def _read_rows(self, starts: list[int], k: int, at: np.ndarray) -> np.ndarray:
        """Rows `at` of local shard k (whose vectors begin at byte `starts[k]` of its file), read
        with one explicit read per run of consecutive rows straight into the returned array: the
        file's pages stay in the page cache, never in this process's RSS."""
        wanted, inverse = np.unique(at, return_inverse=True)
        out = np.empty((len(wanted), self.spec.dim), dtype=self.spec.dtype)
        if not len(wanted):
            return out
        row_bytes = out.strides[0]
        flat = out.reshape(-1).view(np.uint8)
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        with open(self._files(k)[0], "rb", buffering=0) as f:
            for first, end in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(wanted)]])):
                at_byte = starts[k] + int(wanted[first]) * row_bytes
                _read_exactly(f.fileno(), flat[first * row_bytes:end * row_bytes], at_byte)
        return out if np.array_equal(wanted, at) else out[inverse]

    def _cached_rows(self, k: int, at: np.ndarray) -> np.ndarray:
        return self._cached_shard(k)[at]

    def _fetch_shard(self, k: int) -> np.ndarray:
        return np.load(io.BytesIO(storage.read_bytes(self._files(k)[0])))

    def _cached_shard(self, k: int) -> np.ndarray:
        """Shard k from the bounded cache of recently used remote shards (least recent evicted)."""
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        shard = self._fetch_shard(k)
        self._cache[k] = shard
        while len(self._cache) > 1 and sum(s.nbytes for s in self._cache.values()) > CACHE_BYTES:
            self._cache.popitem(last=False)
        return shard

    def _each_shard(self, read: Callable[[int], object]) -> list:
        """`read(k)` for every shard in order; in parallel threads for a remote store, where each
        call is a round trip."""
        shards = range(self.spec.num_shards)
        if not self.remote:
            return [read(k) for k in shards]
        with ThreadPoolExecutor(FETCH_THREADS) as pool:
            return list(pool.map(read, shards))


class ShardedVectors:
    """A store's shards seen as one (n, dim) array; indexing reads only the shards asked for."""

    def __init__(self, counts: list[int], dim: int, dtype: np.dtype,
                 gather: Callable[[int, np.ndarray], np.ndarray], fetch: Callable[[int], np.ndarray]):
        """`gather(k, at)`: rows `at` (positions within the shard) of shard k, for random access;
        `fetch(k)`: shard k's vectors whole (memory-mapped or downloaded, not cached), for a pass
        over the shards."""
        self.offsets = np.cumsum([0] + counts)
        self.dim = dim
        self.dtype = dtype
        self._gather = gather
        self._fetch = fetch

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.dim

    @property
    def num_shards(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index) -> np.ndarray:
        rows = np.arange(len(self))[index]
        if np.ndim(rows) == 0:
            return self[[int(rows)]][0]
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows), self.dim), dtype=self.dtype)
        for k in np.unique(shard):
            where = shard == k
            out[where] = self._gather(int(k), rows[where] - self.offsets[k])
        return out

    def __array__(self, dtype=None, copy=None):
        return self.read_into(np.empty(self.shape, dtype=dtype or self.dtype))

    def read_into(self, out: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """out[i] = self[rows[i]] for `rows` in store order (non-decreasing; None: every row),
        converted to out's dtype, one shard at a time with the next one already fetching: the
        only copy of the vectors made, straight into the caller's array (which may be longer, for
        rows the caller adds itself). Shards holding none of `rows` are not read. Returns out."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        if len(rows) > len(out):
            raise ValueError(f"{len(rows)} rows do not fit in an array of {len(out)}")
        if len(rows) and (rows[0] < 0 or rows[-1] >= len(self) or (np.diff(rows) < 0).any()):
            raise ValueError("rows must be store positions in store order")
        bounds = np.searchsorted(rows, self.offsets)  # rows[bounds[k]:bounds[k + 1]] lie in shard k
        wanted = [k for k in range(self.num_shards) if bounds[k + 1] > bounds[k]]
        for k, shard in zip(wanted, self._shards(wanted)):
            at = rows[bounds[k]:bounds[k + 1]] - self.offsets[k]
            if at[-1] - at[0] + 1 == len(at):  # a run of consecutive rows: a slice, no gathered temporary
                out[bounds[k]:bounds[k + 1]] = shard[at[0]:at[-1] + 1]
            else:
                out[bounds[k]:bounds[k + 1]] = shard[at]
        return out

    def iter_batches(self, rows: int = 65536) -> Iterator[np.ndarray]:
        """Batches of at most `rows` vectors in store order, one shard in memory at a time."""
        for shard in self._shards(range(self.num_shards)):
            for start in range(0, len(shard), rows):
                yield np.asarray(shard[start:start + rows])

    def _shards(self, shards) -> Iterator[np.ndarray]:
        """Shards `shards` in order, the next one fetched while the current one is used."""
        shards = list(shards)
        with ThreadPoolExecutor(1) as pool:
            ahead = pool.submit(self._fetch, shards[0]) if shards else None
            for i in range(len(shards)):
                shard = ahead.result()
                ahead = pool.submit(self._fetch, shards[i + 1]) if i + 1 < len(shards) else None
                yield shard


def _ray_node() -> str | None:
    """The Ray node this process runs on, when it is a Ray worker (Ray is never imported here:
    a process that has not imported it is not one)."""
    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None


def _npy_layout(path: str, dtype: np.dtype, dim: int) -> tuple[int, int]:
    """(rows, byte offset of the first row) of a local .npy shard, from its header (without
    mapping it). Its rows are read by offset, so a shard other than a C-ordered (rows, dim) array
    of `dtype` is an error."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, stored = read(f)
        if fortran_order or stored != dtype or len(shape) != 2 or shape[1] != dim:
            raise SiftError(f"{path}: holds a {'Fortran-ordered ' if fortran_order else ''}{stored} array of shape "
                            f"{shape}; the manifest says ({shape[0] if shape else '?'}, {dim}) {dtype}")
        return shape[0], f.tell()


def _read_exactly(fd: int, buffer: np.ndarray, offset: int) -> None:
    """Fill `buffer` from byte `offset` of file `fd` (a read may return less than asked)."""
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got == 0:
            raise SiftError(f"a feature store shard ended {len(buffer) - done} bytes early (truncated file?)")
        done += got


def _differences(old: dict, new: dict) -> str:
    parts = []
    for key in sorted(set(old) | set(new)):
        if key == "fingerprint":
            for name in sorted(set(old[key]) | set(new[key])):
                if old[key].get(name) != new[key].get(name):
                    parts.append(f"{name}: stored {old[key].get(name)!r}, requested {new[key].get(name)!r}")
        elif old.get(key) != new.get(key):
            parts.append(f"{key}: stored {old.get(key)!r}, requested {new.get(key)!r}")
    return "; ".join(parts)
