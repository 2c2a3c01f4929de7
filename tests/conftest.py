"""Shared fixtures: one embedded Ray for the whole session (it takes seconds to start), and
helpers that write small real input files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine import runtime
from engine.config import RuntimeConfig


# Ray workers unpickle test-defined UDFs by module name (tests.test_x): let them import `tests`.
ROOT = Path(__file__).resolve().parent.parent
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def ray_session():
    info = runtime.start(RuntimeConfig(num_cpus=2))
    yield info
    runtime.stop()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tweets_ingest(tmp_path_factory, ray_session) -> Path:
    """An ingest folder of 600 real tweets (labels: negative / neutral / positive)."""
    from engine.config import IngestConfig
    from engine.data import corpora
    from engine.data.ingest import ingest

    root = tmp_path_factory.mktemp("tweets")
    corpora.load("tweets").sample(600, seed=0).write_parquet(root / "tweets.parquet")
    ingest(IngestConfig(inputs=[str(root / "tweets.parquet")], out=root / "ingest"))
    return root / "ingest"
