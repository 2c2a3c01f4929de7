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
