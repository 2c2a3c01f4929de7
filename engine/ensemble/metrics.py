"""Classification metrics of class-probability matrices (accuracy, macro-F1, NLL), and a paired
bootstrap of two systems' predictions on the same rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def classification(probs: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """probs (B, L), gold (B,) class indices."""
    predicted = probs.argmax(1)
    f1 = []
    for c in range(probs.shape[1]):
        tp = np.sum((predicted == c) & (gold == c))
        fp = np.sum((predicted == c) & (gold != c))
        fn = np.sum((predicted != c) & (gold == c))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": float(np.mean(predicted == gold)), "macro_f1": float(np.mean(f1)),
            "nll": float(-np.log(np.clip(probs[np.arange(len(gold)), gold], 1e-12, None)).mean()), "rows": int(len(gold))}


@dataclass
class Interval:
    """A point estimate and its bootstrap percentile interval."""

    value: float
    low: float
    high: float

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high


@dataclass
class PairedComparison:
    """Two systems' predictions on the same rows: each one's metric and their difference (a - b),
    with intervals from one paired bootstrap."""

    metric: str
    a: Interval
    b: Interval
    difference: Interval

    @property
    def significant(self) -> bool:
        """False when the difference's interval holds 0: the rows cannot tell the systems apart."""
        return not self.difference.contains(0.0)


def paired_bootstrap(tasks: np.ndarray, gold: np.ndarray, a: np.ndarray, b: np.ndarray, replicates: int = 2000,
                     level: float = 0.95, seed: int = 0) -> list[PairedComparison]:
    """Accuracy and macro-F1 (each the mean over tasks, as the ensemble reports them) of two
    systems' predicted labels `a` and `b` for the same rows, with percentile intervals from a
    paired bootstrap: every replicate resamples the rows of each task with replacement (tasks keep
    their size) and scores both systems on the same resample."""
    rng = np.random.default_rng(seed)
    values = {m: np.zeros((3, replicates + 1)) for m in ("accuracy", "macro_f1")}  # column 0: the sample itself
    names = np.unique(tasks)
    for task in names:
        rows = np.flatnonzero(tasks == task)
        classes, codes = np.unique(np.concatenate([gold[rows], a[rows], b[rows]]), return_inverse=True)
        g, pa, pb = codes.reshape(3, -1)
        index = np.concatenate([np.arange(len(rows))[None], rng.integers(0, len(rows), (replicates, len(rows)))])
        for k, p in enumerate((pa, pb)):
            gi, pi = g[index], p[index]
            values["accuracy"][k] += (gi == pi).mean(1) / len(names)
            f1 = []
            for c in range(len(classes)):
                tp = ((pi == c) & (gi == c)).sum(1)
                wrong = ((pi == c) != (gi == c)).sum(1)  # fp + fn
                f1.append(np.where(tp + wrong > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), 0.0))
            values["macro_f1"][k] += np.mean(f1, 0) / len(names)
    out = []
    for metric, v in values.items():
        v[2] = v[0] - v[1]
        q = (1 - level) / 2
        low, high = np.quantile(v[:, 1:], [q, 1 - q], axis=1)
        out.append(PairedComparison(metric, *(Interval(float(v[k, 0]), float(low[k]), float(high[k])) for k in range(3))))
    return out
