"""`sift demo` (`make demo`): the built-in corpora through sift on the embedded Ray.

Today: corpora -> ingest (validation, quarantine) -> summary tables. Later stages (featurize,
select, train, serve) extend this same run.
"""

from __future__ import annotations

import time

import polars as pl

from engine import runtime
from engine.config import DemoConfig, IngestConfig
from engine.data import corpora
from engine.data.ingest import ingest, read_examples, show
from engine.report import table


def run(cfg: DemoConfig) -> None:
    started = time.perf_counter()
    info = runtime.start(cfg.runtime)
    print(f"Ray {info.mode} at {info.address}: {info.cpus:g} CPUs, {info.gpus:g} GPUs")
    inputs = [str(corpora.path(name)) for name in cfg.corpora]
    summary = ingest(IngestConfig(inputs=inputs, out=cfg.out / "ingest", runtime=cfg.runtime))
    show(summary)
    examples = read_examples(cfg.out / "ingest")
    per_task = examples.group_by("task").agg(
        rows=pl.len(),
        labels=pl.col("label").n_unique(),
        top_label=pl.col("label").mode().first(),
        median_chars=pl.col("text").str.len_chars().median(),
    ).sort("task")
    table("Built-in corpora after ingest", ["corpus", "rows", "labels", "a most common label", "median chars"],
          per_task.select("task", "rows", "labels", "top_label", pl.col("median_chars").cast(pl.Int64)).rows())
    print(f"demo finished in {time.perf_counter() - started:.1f} s; outputs in {cfg.out}")
