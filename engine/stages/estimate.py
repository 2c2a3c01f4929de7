"""`sift estimate --calibrate`: the estimator against the model (approximation error) and against
real LoRA fine-tunes of random subsets (Ray Tune trials)."""

from __future__ import annotations

from engine.config import CalibrateConfig
from engine.stages import Result, Stage, split


class EstimateResult(Result):
    out: str
    fine_tunes: int
    spearman: float | None
    mean_squared_relative_error: float
    failed_fine_tunes: int = 0  # failed after their retries; left out of every figure

    def line(self) -> str:
        rho = "n/a" if self.spearman is None else f"{self.spearman:.2f}"
        failed = f" ({self.failed_fine_tunes} failed, left out)" if self.failed_fine_tunes else ""
        return (f"{self.fine_tunes} real fine-tunes{failed}: Spearman {rho}, "
                f"mean squared relative error {self.mean_squared_relative_error:.4f}")


def run(cfg: CalibrateConfig) -> EstimateResult:
    from engine.select.tasks.calibrate import calibrate

    report = calibrate(cfg)
    return EstimateResult(out=str(cfg.out), fine_tunes=len(report["real_loss"]), spearman=report["spearman"],
                          mean_squared_relative_error=report["mean_squared_relative_error"],
                          failed_fine_tunes=len(report["failed_fine_tunes"]))


def show(result: EstimateResult) -> None:
    from engine import storage
    from engine.select.tasks.calibrate import show as show_report

    show_report(storage.read_json(storage.join(result.out, "calibration.json")))


def arguments(p) -> None:
    p.add_argument("--calibrate", dest="_calibrate", action="store_true", required=True,
                   help="approximation error and real LoRA fine-tunes of random subsets (Ray Tune)")
    p.add_argument("--data")
    p.add_argument("--grads")
    p.add_argument("--target", type=split)
    p.add_argument("--out")
    p.add_argument("--subsets", type=int)
    p.add_argument("--steps", type=int)


STAGE = Stage("estimate", "check the first-order estimator against the model (--calibrate)", CalibrateConfig,
              EstimateResult, run, show, arguments, inputs=("data", "grads"))
