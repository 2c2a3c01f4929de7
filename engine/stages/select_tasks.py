"""`sift select-tasks`: which training tasks help a target, by the first-order estimator."""

from __future__ import annotations

from engine.config import SelectTasksConfig
from engine.stages import Result, Stage, split


class SelectTasksResult(Result):
    out: str
    target: list[str]
    selected: list[str]
    failed_trials: int = 0  # --search tune: trials that failed after their retries (left out; report.json)

    def line(self) -> str:
        failed = f" ({self.failed_trials} Tune trial(s) failed, left out)" if self.failed_trials else ""
        return f"for {', '.join(self.target)}: {', '.join(self.selected) or 'no other task'}{failed}"


def run(cfg: SelectTasksConfig) -> SelectTasksResult:
    from engine.select.tasks.select import select_tasks

    report = select_tasks(cfg)
    return SelectTasksResult(out=str(cfg.out), target=cfg.target, selected=report["selected"],
                             failed_trials=len(report["failed_trials"]))


def show(result: SelectTasksResult) -> None:
    from engine import storage
    from engine.select.tasks.select import show as show_report

    report = storage.read_json(storage.join(result.out, "report.json"))
    show_report(report, storage.local_copy(storage.join(result.out, "tasks.parquet")))


def arguments(p) -> None:
    p.add_argument("--data", help="examples with task and split (ingest folder or parquet)")
    p.add_argument("--grads", help="their gradient store")
    p.add_argument("--target", type=split, help="target task(s), comma-separated")
    p.add_argument("--out")
    p.add_argument("--search", choices=["random", "forward", "tune"])
    p.add_argument("--subsets", type=int)


STAGE = Stage("select-tasks", "estimate which training tasks help a target (first-order estimator)",
              SelectTasksConfig, SelectTasksResult, run, show, arguments, inputs=("data", "grads"))
