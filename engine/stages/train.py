"""`sift train`: one LoRA/QLoRA per group, the ensemble's weights and boosting (ensemble.json)."""

from __future__ import annotations

from engine.config import EnsembleTrainConfig
from engine.stages import Result, Stage


class TrainResult(Result):
    out: str
    adapters: int
    split: str  # test when the data has a test split, else validation
    accuracy: float
    macro_f1: float
    failed_groups: dict[str, str] = {}  # group -> why its training failed (its tasks use the other adapters)

    def line(self) -> str:
        line = f"{self.adapters} adapters; {self.split} accuracy {self.accuracy:.3f}, macro-F1 {self.macro_f1:.3f}"
        for name, error in self.failed_groups.items():
            line += f"; {name} FAILED ({error}), its tasks served by the other adapters (--force retries it)"
        return line


def run(cfg: EnsembleTrainConfig) -> TrainResult:
    from engine.train.ensemble import train_ensemble

    report = train_ensemble(cfg)
    split = "test" if "test" in report else "validation"
    average = report[split]["average"]
    return TrainResult(out=str(cfg.out), adapters=len(report["groups"]), split=split, accuracy=average["accuracy"],
                       macro_f1=average["macro_f1"],
                       failed_groups={n: f["error"] for n, f in report["failed_groups"].items()})


def show(result: TrainResult) -> None:
    from engine import storage
    from engine.ensemble.evaluate import show as show_split
    from engine.report import table

    report = storage.read_json(storage.join(result.out, "report.json"))
    table("Adapters", ["adapter", "tasks", "best epoch", "val accuracy (answer)"],
          [(n, ", ".join(report["groups"][n]), str(b["epoch"]), f"{b['val_accuracy']:.3f}")
           for n, b in report["training"].items()])
    for r in report["boosting"]:
        print(f"boosting round {r['round']}: validation NLL {r['before']:.4f} -> {r['validation_nll']:.4f}"
              f" ({'kept' if r['accepted'] else 'dropped, stopping'})")
    for split in ("validation", "test"):
        if split in report:
            show_split({"split": split, **report[split]})
    print(f"ensemble.json in {result.out}")


def show_ensemble(result: TrainResult) -> None:
    """The ensemble's per-task table on its test (else validation) rows: the pipeline's last word."""
    from engine import storage
    from engine.ensemble.evaluate import show as show_split

    report = storage.read_json(storage.join(result.out, "report.json"))
    show_split({"split": result.split, **report[result.split]}, title="Adapter ensemble")


def arguments(p) -> None:
    p.add_argument("--groups", help="a `sift group` output folder")
    p.add_argument("--out")
    p.add_argument("--qlora", dest="quantize", action="store_const", const="nf4", help="4-bit nf4 base")
    p.add_argument("--boost", type=int, help="boosting rounds (residual adapters)")
    p.add_argument("--epochs", type=int)


STAGE = Stage("train", "train one LoRA/QLoRA per group, fit the ensemble's weights (ensemble.json)",
              EnsembleTrainConfig, TrainResult, run, show, arguments, inputs=("groups", "data", "grads"),
              ignore=("workers", "gpus_per_worker"))
