"""Classification metrics of class-probability matrices: accuracy, macro-F1, NLL."""

from __future__ import annotations

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
