"""Where sift keeps what it builds once and reuses: converted models, corpora as parquet."""

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$SIFT_CACHE` (default ~/.cache/sift), created on demand."""
    root = Path(os.environ.get("SIFT_CACHE") or Path.home() / ".cache" / "sift")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
