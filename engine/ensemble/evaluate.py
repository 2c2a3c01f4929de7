"""`sift evaluate MANIFEST --data DIR`: per-task accuracy, macro-F1 and NLL of the ensemble and
of each of its adapters alone, on any split of labelled rows (default: test, else validation)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from engine import storage
from engine.data.ingest import examples_path
from engine.ensemble import labels, manifest as manifest_io, metrics
from engine.ensemble.model import EnsembleModel
from engine.errors import SiftError
from engine.report import table


@dataclass
class TaskScores:
    """One task's rows under several models: the gold class of each row and each model's (B, L)
    label log-probabilities (None: the bare base model)."""

    gold: np.ndarray  # (B,) class index of each row's label
    logprobs: dict[str | None, torch.Tensor]

    def probs(self, model: str | None) -> np.ndarray:
        """(B, L) the model's class probabilities (renormalised over the labels)."""
        return labels.class_probs(self.logprobs[model]).numpy()

    def gold_prob(self, model: str | None) -> np.ndarray:
        """(B,) the model's probability of each row's gold label."""
        return self.probs(model)[np.arange(len(self.gold)), self.gold]

    def gold_odds(self, model: str | None) -> np.ndarray:
        """(B,) the model's log-odds of each row's gold label among the task's labels,
        z_gold - logsumexp(z_other labels): the margin a boosting step moves."""
        z = self.logprobs[model].double()
        rows, gold = torch.arange(len(self.gold)), torch.as_tensor(self.gold)
        others = z.clone()
        others[rows, gold] = float("-inf")
        return (z[rows, gold] - others.logsumexp(-1)).numpy()

    def combined(self, manifest: manifest_io.Manifest, task: str) -> np.ndarray:
        """(B, L) the ensemble's class probabilities under `manifest` (labels.combine)."""
        return labels.combine(self.logprobs, manifest, task).numpy()

    def nll(self, manifest: manifest_io.Manifest, task: str) -> float:
        probs = self.combined(manifest, task)[np.arange(len(self.gold)), self.gold]
        return float(-np.log(np.clip(probs, 1e-12, None)).mean())


def read_split(data: str | Path, tasks: list[str], split: str | None) -> tuple[pl.DataFrame, str]:
    """Rows of `tasks` from one split: the given one, else test when present, else validation."""
    frame = storage.read_parquet(examples_path(data)).filter(pl.col("task").is_in(tasks))
    present = set(frame["split"].drop_nulls().unique())
    split = split or ("test" if "test" in present else "validation")
    rows = frame.filter(pl.col("split") == split)
    if not rows.height:
        raise SiftError(f"no {split} rows of the manifest's tasks in {data}")
    return rows, split


def score_rows(ensemble: EnsembleModel, rows: pl.DataFrame, models: list[str | None] | None = None
               ) -> dict[str, TaskScores]:
    """Label log-probabilities of every row under each model (default: every adapter of the
    manifest and its anchor, the bare base when that is None)."""
    names = models if models is not None else [*(a.name for a in ensemble.manifest.adapters
                                                 if a.name != ensemble.manifest.anchor), ensemble.manifest.anchor]
    out = {}
    for task in sorted(set(rows["task"])):
        part = rows.filter(pl.col("task") == task)
        choices = ensemble.manifest.task(task).labels
        outside = sorted(set(part["label"]) - set(choices))
        if outside:
            raise SiftError(f"task {task!r}: labels {outside[:5]} are not among its verbalizers {choices}")
        logprobs = ensemble.label_logprobs(task, part["text"].to_list(), adapters=names)
        out[task] = TaskScores(np.array([choices.index(y) for y in part["label"]]), logprobs)
    return out


def report(ensemble: EnsembleModel, scores: dict[str, TaskScores]) -> dict:
    """Per task: the ensemble's metrics (the manifest's combination), each adapter's alone, the
    name of the task's own adapter (`own`: the group adapter trained on it, if any) and the bare
    base model's (`base`) when it was scored: an adapter should beat the base on its own tasks."""
    tasks = {}
    for task, s in scores.items():
        tasks[task] = {"ensemble": metrics.classification(s.combined(ensemble.manifest, task), s.gold),
                       "adapters": {a.name: metrics.classification(s.probs(a.name), s.gold)
                                    for a in ensemble.manifest.adapters if a.name in s.logprobs}}
        own = [a.name for a in ensemble.manifest.adapters if a.kind == "group" and task in a.tasks]
        if own and own[0] in s.logprobs:
            tasks[task]["own"] = own[0]
        if None in s.logprobs:
            tasks[task]["base"] = metrics.classification(s.probs(None), s.gold)
    average = {k: float(np.mean([t["ensemble"][k] for t in tasks.values()])) for k in ("accuracy", "macro_f1", "nll")}
    return {"tasks": tasks, "average": average}


def predictions(ensemble: EnsembleModel, rows: pl.DataFrame, scores: dict[str, TaskScores]) -> pl.DataFrame:
    """Per row (id, task, label): the ensemble's predicted label, for paired comparisons
    (bootstrap confidence intervals over rows)."""
    parts = []
    for task, s in scores.items():
        choices = ensemble.manifest.task(task).labels
        predicted = s.combined(ensemble.manifest, task).argmax(1)
        part = rows.filter(pl.col("task") == task).select("id", "task", "label")
        parts.append(part.with_columns(predicted=pl.Series([choices[k] for k in predicted], dtype=pl.String)))
    return pl.concat(parts)


def evaluate(manifest_path: str | Path, data: str | Path, split: str | None = None) -> dict:
    loaded = manifest_io.load(manifest_path)
    ensemble = EnsembleModel.load(loaded)
    rows, split = read_split(data, list(loaded.tasks), split)
    result = {"split": split, **report(ensemble, score_rows(ensemble, rows))}
    (loaded.folder / f"evaluation-{split}.json").write_text(json.dumps(result, indent=2))
    return result


def show(result: dict, title: str = "Ensemble") -> None:
    """The ensemble's metrics per task, beside the task's own adapter alone and the bare base
    model (accuracy / NLL): whether each adapter learned its own tasks."""
    def pair(m: dict | None) -> str:
        return f"{m['accuracy']:.3f} / {m['nll']:.3f}" if m else ""

    rows = [(task, str(t["ensemble"]["rows"]), f"{t['ensemble']['accuracy']:.3f}", f"{t['ensemble']['macro_f1']:.3f}",
             f"{t['ensemble']['nll']:.3f}", pair(t["adapters"].get(t.get("own"))), pair(t.get("base")))
            for task, t in result["tasks"].items()]
    avg = result["average"]
    rows.append(("average", "", f"{avg['accuracy']:.3f}", f"{avg['macro_f1']:.3f}", f"{avg['nll']:.3f}", "", ""))
    table(f"{title} on {result['split']} rows", ["task", "rows", "accuracy", "macro-F1", "NLL",
                                                 "own adapter acc / NLL", "base model acc / NLL"], rows)
