"""`sift group`: split the tasks of a gradient store into m groups for the adapter ensemble."""

from __future__ import annotations

from engine.config import GroupConfig
from engine.stages import Result, Stage


class GroupResult(Result):
    out: str
    groups: list[list[str]]
    chosen: str  # the start (sdp, spectral, random-k) whose refined partition won
    failed_starts: int = 0  # local searches that failed after their retries (left out; groups.json)

    def line(self) -> str:
        failed = f" ({self.failed_starts} local search(es) failed, left out)" if self.failed_starts else ""
        return " | ".join(", ".join(g) for g in self.groups) + failed


def run(cfg: GroupConfig) -> GroupResult:
    from engine.ensemble.group import group_tasks

    report = group_tasks(cfg)
    return GroupResult(out=str(cfg.out), groups=report["groups"], chosen=report["chosen"],
                       failed_starts=len(report["failed_starts"]))


def show(result: GroupResult) -> None:
    from engine import storage
    from engine.ensemble.group import show as show_report

    show_report(storage.read_json(storage.join(result.out, "groups.json")))


def arguments(p) -> None:
    p.add_argument("--data")
    p.add_argument("--grads")
    p.add_argument("--groups", type=int, help="m (default: the fewest groups whose estimated validation loss is "
                                              "within one standard error of the best m's)")
    p.add_argument("--out")


STAGE = Stage("group", "split the tasks of a gradient store into m groups (adapter ensemble)", GroupConfig,
              GroupResult, run, show, arguments, inputs=("data", "grads"))
