"""`sift suite`: the built-in multi-task suite (labelled tasks of different kinds) as an ingest folder."""

from __future__ import annotations

from pathlib import Path

from engine.config import SuiteConfig
from engine.stages import Result, Stage, split


class SuiteResult(Result):
    out: str
    rows: int
    tasks: dict[str, int]  # kept rows per task

    def line(self) -> str:
        return f"{self.rows:,} labelled rows in {len(self.tasks)} tasks"


def run(cfg: SuiteConfig) -> SuiteResult:
    from engine.config import IngestConfig
    from engine.data import suite
    from engine.data.ingest import ingest
    from engine.executor import require

    out = Path(require(cfg.out, "--out", "suite"))
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "suite.parquet"
    suite.build(cfg.per_task, cfg.validation, cfg.seed, cfg.tasks, cfg.noisy_groups, cfg.noisy_shuffled,
                cfg.test).write_parquet(raw)
    summary = ingest(IngestConfig(inputs=[str(raw)], out=str(out), runtime=cfg.runtime))
    return SuiteResult(out=str(out), rows=summary.rows_out, tasks=summary.tasks)


def show(result: SuiteResult) -> None:
    from engine.report import table

    table(f"Suite -> {result.out}", ["task", "rows"], result.tasks.items())


def arguments(p) -> None:
    p.add_argument("--out")
    p.add_argument("--tasks", type=split, help="comma-separated task names (default: all)")
    p.add_argument("--per-task", dest="per_task", type=int)
    p.add_argument("--noisy-groups", dest="noisy_groups", type=int)
    p.add_argument("--noisy-shuffled", dest="noisy_shuffled", type=int)


STAGE = Stage("suite", "build the built-in multi-task suite as an ingest folder", SuiteConfig, SuiteResult, run,
              show, arguments)
