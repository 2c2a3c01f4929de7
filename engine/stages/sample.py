"""`sift sample`: a pool stratified by task from an ingest folder, with a target held out of it.

Users with one big ingested corpus want two things before selection: a pool small enough to
embed now, and a labelled sample of what they care about kept out of that pool (selecting the
target's own rows would be cheating). The demo builds its GOT-D target this way.
"""

from __future__ import annotations

from pathlib import Path

from engine.config import SampleConfig
from engine.stages import Result, Stage

POOL = "pool.parquet"
TARGET = "target.parquet"


class SampleResult(Result):
    out: str
    pool_rows: int
    target_rows: int
    pool_by_task: dict[str, int]

    def line(self) -> str:
        target = f"; target of {self.target_rows:,} held out" if self.target_rows else ""
        return f"pool of {self.pool_rows:,} from {len(self.pool_by_task)} sources{target}"


def run(cfg: SampleConfig) -> SampleResult:
    import polars as pl

    from engine.data.ingest import read_examples
    from engine.errors import SiftError
    from engine.executor import require

    out = Path(require(cfg.out, "--out", "sample"))
    examples = read_examples(require(cfg.data, "--data", "sample"))  # an ingest folder or a parquet file
    out.mkdir(parents=True, exist_ok=True)
    target = examples.clear()
    if cfg.target_task is not None:
        topic = examples.filter((pl.col("task") == cfg.target_task)
                                & ((pl.col("label") == cfg.target_label) if cfg.target_label else True))
        if topic.height < 2:
            raise SiftError(f"sample: fewer than 2 rows of task {cfg.target_task!r}"
                            + (f" with label {cfg.target_label!r}" if cfg.target_label else "") + f" in {cfg.data}")
        target = topic.sample(min(cfg.target_rows, topic.height // 2), seed=cfg.seed)
        examples = examples.join(target.select("id"), on="id", how="anti")
    pool = _stratified(examples, cfg.rows, cfg.seed) if cfg.rows else examples
    pool.write_parquet(out / POOL)
    target.write_parquet(out / TARGET)
    counts = pool.group_by(pl.col("task").fill_null("(none)")).len().sort("task")
    return SampleResult(out=str(out), pool_rows=pool.height, target_rows=target.height,
                        pool_by_task=dict(counts.iter_rows()))


def _stratified(examples, rows: int, seed: int):
    """About `rows` rows, the same number from each task (all of a task smaller than its share)."""
    import polars as pl

    tasks = examples["task"].fill_null("").unique().sort().to_list()
    per_task = max(1, rows // max(len(tasks), 1))
    parts = [examples.filter(pl.col("task").fill_null("") == t) for t in tasks]
    return pl.concat([p.sample(min(per_task, p.height), seed=seed) for p in parts])


def show(result: SampleResult) -> None:
    from engine.report import table

    table(f"Sample -> {result.out}", ["source", "pool rows"], result.pool_by_task.items())
    print(f"{POOL}: {result.pool_rows:,} rows; {TARGET}: {result.target_rows:,} rows")


def arguments(p) -> None:
    p.add_argument("--data", help="an ingest folder or a parquet file of examples")
    p.add_argument("--out")
    p.add_argument("--rows", type=int, help="pool rows, stratified by task (default: all)")
    p.add_argument("--target-task", dest="target_task", help="hold out rows of this task as the target")
    p.add_argument("--target-label", dest="target_label")
    p.add_argument("--target-rows", dest="target_rows", type=int)


STAGE = Stage("sample", "a pool sampled by task from an ingest folder, a target held out of it", SampleConfig,
              SampleResult, run, show, arguments, inputs=("data",))
