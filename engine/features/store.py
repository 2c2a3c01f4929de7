"""A feature store: a folder of shards plus a manifest that says exactly what they hold.

    OUT/manifest.json                 kind, fingerprint (model, adapter, config, data), dim, dtype, seed
    OUT/shards/00000.npy              vectors of the shard's kept rows, (n, dim), float32 or float16
    OUT/shards/00000.parquet          id, task, label (+ f for gradients) of those rows, same order
    OUT/shards/00000.quarantine.parquet   rows that produced no feature, with a reason

Shard k always holds input rows [k * shard_rows, (k + 1) * shard_rows), so any worker can
compute any shard and a rerun computes exactly the missing ones. A shard is written to temporary
names and renamed into place, its rows file last: that file existing means the shard is done.
A store is never silently reused for a different request: the manifest's fingerprint must match.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from engine.errors import SiftError

MANIFEST = "manifest.json"


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
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()  # absolute: Ray workers may run in another directory
        path = self.root / MANIFEST
        if not path.is_file():
            raise SiftError(f"{self.root}: not a feature store (no {MANIFEST}); run `sift featurize` first")
        self.spec = StoreSpec(**json.loads(path.read_text()))

    # --- writing ---------------------------------------------------------------------------

    @classmethod
    def prepare(cls, root: str | os.PathLike, spec: StoreSpec, force: bool = False,
                replace_mismatch: bool = False) -> "FeatureStore":
        """Create the store, or resume one made for the same request. A store made for a different
        request is an error, or replaced when `replace_mismatch` (stores sift derives itself)."""
        root = Path(root)
        path = root / MANIFEST
        if path.is_file() and not force:
            old = json.loads(path.read_text())
            differs = _differences(old, asdict(spec))
            if differs and replace_mismatch:
                return cls.prepare(root, spec, force=True)
            if differs:
                raise SiftError(f"{root} holds a feature store for a different request ({differs}); "
                                "use another --out, or --force to replace it")
            return cls(root)
        if force:
            shutil.rmtree(root / "shards", ignore_errors=True)
        (root / "shards").mkdir(parents=True, exist_ok=True)
        _atomic_write(path, json.dumps(asdict(spec), indent=2).encode())
        return cls(root)

    def shard_range(self, k: int) -> tuple[int, int]:
        start = k * self.spec.shard_rows
        return start, min(start + self.spec.shard_rows, self.spec.rows)

    def _files(self, k: int) -> tuple[Path, Path, Path]:
        base = self.root / "shards" / f"{k:05d}"
        return base.with_suffix(".npy"), base.with_suffix(".parquet"), base.with_name(f"{k:05d}.quarantine.parquet")

    def done(self, k: int) -> bool:
        return self._files(k)[1].is_file()

    def missing_shards(self) -> list[int]:
        return [k for k in range(self.spec.num_shards) if not self.done(k)]

    def write_shard(self, k: int, rows: pl.DataFrame, vectors: np.ndarray, quarantine: pl.DataFrame) -> None:
        start, stop = self.shard_range(k)
        if rows.height + quarantine.height != stop - start:
            raise AssertionError(f"shard {k}: {rows.height} kept + {quarantine.height} quarantined != {stop - start} rows")
        if vectors.shape != (rows.height, self.spec.dim):
            raise AssertionError(f"shard {k}: vectors {vectors.shape} != ({rows.height}, {self.spec.dim})")
        npy, parquet, quarantined = self._files(k)
        tmp = f".tmp-{os.getpid()}"
        with open(f"{npy}{tmp}", "wb") as f:
            np.save(f, vectors.astype(self.spec.dtype, copy=False))
        quarantine.write_parquet(f"{quarantined}{tmp}")
        rows.write_parquet(f"{parquet}{tmp}")
        os.replace(f"{npy}{tmp}", npy)
        os.replace(f"{quarantined}{tmp}", quarantined)
        os.replace(f"{parquet}{tmp}", parquet)  # last: marks the shard done

    # --- reading ---------------------------------------------------------------------------

    def check_complete(self) -> None:
        missing = self.missing_shards()
        if missing:
            raise SiftError(f"{self.root}: feature store is incomplete ({len(missing)} of {self.spec.num_shards} "
                            "shards missing); rerun the same `sift featurize` command to finish it")

    def rows(self) -> pl.DataFrame:
        """Row metadata (id, task, label, ...) of every stored vector, in store order."""
        self.check_complete()
        return pl.concat([pl.read_parquet(self._files(k)[1]) for k in range(self.spec.num_shards)])

    def quarantine(self) -> pl.DataFrame:
        self.check_complete()
        return pl.concat([pl.read_parquet(self._files(k)[2]) for k in range(self.spec.num_shards)])

    def vectors(self) -> "ShardedVectors":
        """Every stored vector as one memory-mapped view, aligned with `rows()`."""
        self.check_complete()
        return ShardedVectors([self.shard_vectors(k) for k in range(self.spec.num_shards)])

    def shard_vectors(self, k: int) -> np.ndarray:
        """Shard k's vectors, memory-mapped."""
        return np.load(self._files(k)[0], mmap_mode="r")

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in (self.root / "shards").iterdir() if f.is_file())


class ShardedVectors:
    """Memory-mapped shards seen as one (n, dim) array; indexing reads only the rows asked for."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(s) for s in shards])
        self.dim = shards[0].shape[1] if shards else 0
        self.dtype = shards[0].dtype if shards else np.dtype("float32")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.dim

    def __getitem__(self, index) -> np.ndarray:
        rows = np.arange(len(self))[index]
        if np.ndim(rows) == 0:
            return self[[int(rows)]][0]
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows), self.dim), dtype=self.dtype)
        for k in np.unique(shard):
            where = shard == k
            out[where] = self.shards[k][rows[where] - self.offsets[k]]
        return out

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate(self.shards) if self.shards else np.empty((0, self.dim), self.dtype)
        return out if dtype is None else out.astype(dtype)

    def iter_batches(self, rows: int = 65536) -> Iterator[np.ndarray]:
        for shard in self.shards:
            for start in range(0, len(shard), rows):
                yield np.asarray(shard[start:start + rows])


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


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
