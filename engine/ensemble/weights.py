"""Per-task mixture weights over adapters, fitted on validation rows.

The weights minimise the validation NLL of the mixture sum_a w_a p_a(y | x) of the adapters'
class probabilities. That is a mixture-proportion problem, so EM solves it exactly: each step
is closed form, never increases the NLL, and keeps the weights on the simplex.
"""

from __future__ import annotations

import numpy as np


def fit(gold_probs: np.ndarray, iters: int = 500, tol: float = 1e-10, prune: float = 1e-3) -> np.ndarray:
    """gold_probs (A, B): adapter a's probability of row b's gold label. Returns weights (A,).
    Weights below `prune` are dropped (each costs a forward pass per request when served)."""
    A = gold_probs.shape[0]
    P = np.clip(gold_probs, 1e-12, None)
    w = np.full(A, 1.0 / A)
    previous = np.inf
    for _ in range(iters):
        mixture = w @ P  # (B,)
        nll = -np.log(mixture).mean()
        if previous - nll < tol:
            break
        previous = nll
        w = (w[:, None] * P / mixture).mean(1)
    w = np.where(w >= prune, w, 0.0)
    return w / w.sum()


def nll(gold_probs: np.ndarray, w: np.ndarray) -> float:
    return float(-np.log(np.clip(w @ gold_probs, 1e-12, None)).mean())
