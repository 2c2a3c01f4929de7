"""`sift evaluate MANIFEST --data DIR`: per-task accuracy, macro-F1 and NLL of the ensemble and
of each of its adapters alone, on any split of labelled rows (default: test, else validation)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from engine.data.ingest import examples_path
from engine.ensemble import labels, manifest as manifest_io, metrics
from engine.ensemble.model import EnsembleModel
from engine.errors import SiftError
from engine.report import table


@dataclass
class TaskScores:
    gold: np.ndarray  # (B,) class index of each row's label
    probs: dict[str, np.ndarray]  # adapter -> (B, L) class probabilities

    def gold_prob(self, adapter: str) -> np.ndarray:
        """(B,) the adapter's probability of each row's gold label."""
        return self.probs[adapter][np.arange(len(self.gold)), self.gold]

    def mixed_gold_prob(self, weights: dict[str, float]) -> np.ndarray:
        return sum(w * self.gold_prob(n) for n, w in weights.items() if w > 0)


def read_split(data: str | Path, tasks: list[str], split: str | None) -> tuple[pl.DataFrame, str]:
    """Rows of `tasks` from one split: the given one, else test when present, else validation."""
    frame = pl.read_parquet(examples_path(data)).filter(pl.col("task").is_in(tasks))
    present = set(frame["split"].drop_nulls().unique())
    split = split or ("test" if "test" in present else "validation")
    rows = frame.filter(pl.col("split") == split)
    if not rows.height:
        raise SiftError(f"no {split} rows of the manifest's tasks in {data}")
    return rows, split


def score_rows(ensemble: EnsembleModel, rows: pl.DataFrame, adapters: list[str] | None = None) -> dict[str, TaskScores]:
    """Class probabilities of every row under each adapter (default: every adapter)."""
    names = adapters or [a.name for a in ensemble.manifest.adapters]
    out = {}
    for task in sorted(set(rows["task"])):
        part = rows.filter(pl.col("task") == task)
        choices = ensemble.manifest.task(task).labels
        outside = sorted(set(part["label"]) - set(choices))
        if outside:
            raise SiftError(f"task {task!r}: labels {outside[:5]} are not among its verbalizers {choices}")
        logprobs = ensemble.label_logprobs(task, part["text"].to_list(), adapters=names)
        out[task] = TaskScores(np.array([choices.index(y) for y in part["label"]]),
                               {n: labels.class_probs(lp).numpy() for n, lp in logprobs.items()})
    return out


def report(ensemble: EnsembleModel, scores: dict[str, TaskScores]) -> dict:
    """Per task: the ensemble's metrics (with the manifest's weights) and each adapter's alone."""
    tasks = {}
    for task, s in scores.items():
        weights = ensemble.manifest.task(task).weights
        mixed = sum(w * s.probs[n] for n, w in weights.items() if w > 0)
        tasks[task] = {"ensemble": metrics.classification(mixed, s.gold),
                       "adapters": {a.name: metrics.classification(s.probs[a.name], s.gold)
                                    for a in ensemble.manifest.adapters if a.name in s.probs}}
    average = {k: float(np.mean([t["ensemble"][k] for t in tasks.values()])) for k in ("accuracy", "macro_f1", "nll")}
    return {"tasks": tasks, "average": average}


def evaluate(manifest_path: str | Path, data: str | Path, split: str | None = None) -> dict:
    loaded = manifest_io.load(manifest_path)
    ensemble = EnsembleModel.load(loaded)
    rows, split = read_split(data, list(loaded.tasks), split)
    result = {"split": split, **report(ensemble, score_rows(ensemble, rows))}
    (loaded.folder / f"evaluation-{split}.json").write_text(json.dumps(result, indent=2))
    return result


def show(result: dict, title: str = "Ensemble") -> None:
    rows = [(task, str(t["ensemble"]["rows"]), f"{t['ensemble']['accuracy']:.3f}", f"{t['ensemble']['macro_f1']:.3f}",
             f"{t['ensemble']['nll']:.3f}", f"{max(a['accuracy'] for a in t['adapters'].values()):.3f}")
            for task, t in result["tasks"].items()]
    avg = result["average"]
    rows.append(("average", "", f"{avg['accuracy']:.3f}", f"{avg['macro_f1']:.3f}", f"{avg['nll']:.3f}", ""))
    table(f"{title} on {result['split']} rows", ["task", "rows", "accuracy", "macro-F1", "NLL", "best single adapter"],
          rows)
