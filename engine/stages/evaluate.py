"""`sift evaluate`: accuracy, macro-F1 and NLL of an ensemble manifest on labelled rows."""

from __future__ import annotations

from pydantic import Field

from engine.config import RuntimeConfig, StrictModel, Uri
from engine.stages import Result, Stage


class EvaluateConfig(StrictModel):
    manifest: Uri | None = Field(None, description="ensemble.json or its folder")
    data: Uri | None = Field(None, description="labelled rows (an ingest folder or parquet)")
    split: str | None = Field(None, description="default: test when present, else validation")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


class EvaluateResult(Result):
    split: str
    accuracy: float
    macro_f1: float
    nll: float
    report: str  # where the per-task figures were written

    def line(self) -> str:
        return f"{self.split} accuracy {self.accuracy:.3f}, macro-F1 {self.macro_f1:.3f}, NLL {self.nll:.3f}"


def run(cfg: EvaluateConfig) -> EvaluateResult:
    from engine.ensemble import manifest
    from engine.ensemble.evaluate import evaluate
    from engine.executor import require

    result = evaluate(require(cfg.manifest, "MANIFEST", "evaluate"), require(cfg.data, "--data", "evaluate"),
                      cfg.split)
    average = result["average"]
    written = manifest.load(cfg.manifest).folder / f"evaluation-{result['split']}.json"
    return EvaluateResult(split=result["split"], accuracy=average["accuracy"], macro_f1=average["macro_f1"],
                          nll=average["nll"], report=str(written))


def show(result: EvaluateResult) -> None:
    from engine import storage
    from engine.ensemble.evaluate import show as show_report

    show_report(storage.read_json(result.report))


def arguments(p) -> None:
    p.add_argument("manifest", nargs="?", help="ensemble.json or its folder")
    p.add_argument("--data")
    p.add_argument("--split", help="default: test when present, else validation")


STAGE = Stage("evaluate", "accuracy, macro-F1, NLL of an ensemble manifest on labelled rows", EvaluateConfig,
              EvaluateResult, run, show, arguments, inputs=("manifest", "data"), output=None)
