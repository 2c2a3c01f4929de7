"""`sift train-lora`: one LoRA/QLoRA on tasks' training rows with Ray Train; the best epoch kept."""

from __future__ import annotations

from engine.config import LoraTrainConfig
from engine.stages import Result, Stage, split


class Epoch(Result):
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float


class TrainLoraResult(Result):
    adapter: str
    history: list[Epoch]
    best_epoch: int
    best_val_accuracy: float

    def line(self) -> str:
        return f"best epoch {self.best_epoch} (validation accuracy {self.best_val_accuracy:.3f}) -> {self.adapter}"


def run(cfg: LoraTrainConfig) -> TrainLoraResult:
    from engine.train.lora import train_lora

    report = train_lora(cfg)
    fields = Epoch.model_fields
    return TrainLoraResult(adapter=str(report["adapter"]),
                           history=[Epoch(**{k: m[k] for k in fields}) for m in report["history"]],
                           best_epoch=report["best"]["epoch"], best_val_accuracy=report["best"]["val_accuracy"])


def show(result: TrainLoraResult) -> None:
    from engine.report import table

    table(f"train-lora -> {result.adapter}", ["epoch", "train loss", "val loss", "val accuracy"],
          [(m.epoch, round(m.train_loss, 4), round(m.val_loss, 4), round(m.val_accuracy, 3)) for m in result.history])
    print(result.line())


def arguments(p) -> None:
    p.add_argument("--data")
    p.add_argument("--model")
    p.add_argument("--out")
    p.add_argument("--adapter", help="start from this adapter instead of a fresh LoRA")
    p.add_argument("--tasks", type=split)
    p.add_argument("--epochs", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--qlora", dest="quantize", action="store_const", const="nf4", help="4-bit nf4 base")


STAGE = Stage("train-lora", "fit one LoRA/QLoRA on tasks with Ray Train (best epoch kept)", LoraTrainConfig,
              TrainLoraResult, run, show, arguments, inputs=("data", "adapter"),
              worker_inputs=("model",), ignore=("workers", "gpus_per_worker"))
