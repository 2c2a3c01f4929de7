"""The stage contract and its registry: one module per command (a "recipe").

Each module in this package defines one `STAGE`: its typed config (from engine.config), the typed
`Result` its `run(cfg)` returns, `show(result)` for the terminal, the command-line flags that set
config keys, which config fields it reads and writes, and which settings never change its
results. The `sift` CLI, `sift run PIPELINE.yaml` and `jobs/*.py` all dispatch through
`STAGES`; `engine.executor.run` fingerprints and skips. Adding a command is adding a module here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict


class Result(BaseModel):
    """A stage's typed result: saved in its done marker, shown on a skip as on a run."""

    model_config = ConfigDict(extra="forbid")

    def line(self) -> str:
        """One line for the pipeline's summary table."""
        raise NotImplementedError


@dataclass(frozen=True)
class Stage:
    name: str  # the command, the pipeline's stage name, the job's argument
    help: str
    config: type[BaseModel]
    result: type[Result]
    run: Callable[[Any], Result]
    show: Callable[[Any], None]
    arguments: Callable[[argparse.ArgumentParser], None]  # flags; each flag's dest is a config key
    inputs: tuple[str, ...] = ()  # config fields naming what the stage reads (URIs or built-in names)
    # Inputs that Ray workers load themselves, on whatever node they run (a model: each node caches
    # its own copy of a URI): fingerprinted like `inputs`, but passed on as given, never replaced by
    # the driver's cached local copy, which other nodes do not have.
    worker_inputs: tuple[str, ...] = ()
    output: str | None = "out"  # the config field naming where it writes; None: nothing to skip on
    ignore: tuple[str, ...] = ()  # settings that change speed, not results: left out of the fingerprint
    native_storage: bool = False  # reads and writes URIs itself (else the executor stages them locally)
    # When OUT holds this stage's own finished run for other settings or inputs, rerun with
    # replace_mismatch=True: its store is replaced if made for another request, resumed if not
    # (a feature store refuses another request's store otherwise).
    replace_stale: bool = False
    command: tuple[str, ...] = ()  # CLI words when not just `name` (e.g. featurize embed)


def split(text: str) -> list[str]:
    """A comma-separated flag value as a list."""
    return [part for part in text.split(",") if part]


def _registry() -> dict[str, Stage]:
    from engine.stages import (embed, estimate, evaluate, grads, group, ingest, sample, select_pool, select_tasks,
                               serve, suite, train, train_lora)

    modules = (ingest, sample, embed, grads, select_pool, suite, select_tasks, estimate, train_lora, group, train,
               evaluate, serve)
    return {m.STAGE.name: m.STAGE for m in modules}


STAGES: dict[str, Stage] = _registry()
