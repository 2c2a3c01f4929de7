"""Boosting rounds of the ensemble, in closed form (docs/ALGORITHMS.md section 3, step 6).

Gradient boosting in label-logit space. The ensemble's label logits are z = log p_mixture (plus
earlier rounds); the negative gradient of its cross-entropy w.r.t. the gold label's logit is the
residual r = 1 - p_ensemble(gold). A boosting adapter theta_init + P w starts at the anchor,
where a row's answer score moves by about g . w (g: its projected gradient in the store). That
score is the gold token's log-odds over the whole vocabulary, and most of g is common to every
row of a task ("say any of the task's answer tokens"), a direction that cancels once
probabilities are renormalised over the labels. So the gradients are centred per task (g minus
the task's mean gradient: about the gold label's gradient against the task's other labels) and
a ridge regression G_c w ~ r asks for the adapter whose change of the gold label's logit
follows the residual. Its change from the anchor, delta = (its label log-probabilities - the
anchor's), is added to z with a step size nu chosen by line search on validation rows; the other
adapters' weights stay as they are. The update is norm-controlled: |P w| is capped (the
first-order model holds near the anchor only) before the adapter is saved.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import torch

from engine.errors import SiftError
from engine.features.store import FeatureStore
from engine.models.anchor import Anchor


def gradients_of(grads: str | Path, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected gradients and anchor outputs of the given rows, in their order."""
    store = FeatureStore(grads)
    rows = store.rows().select("id", "f").with_row_index("row")
    order = pl.DataFrame({"id": ids}).join(rows, on="id", how="left", maintain_order="left")
    missing = order.filter(pl.col("row").is_null()).height
    if missing:
        raise SiftError(f"{missing} training rows are not in the gradient store {grads}; featurize them first")
    index = order["row"].to_numpy()
    G = torch.as_tensor(np.array(store.vectors())[index], dtype=torch.float64)
    return G, torch.tensor(np.array(order["f"].to_numpy()), dtype=torch.float64)


def centred(G: torch.Tensor, groups: np.ndarray) -> torch.Tensor:
    """G with each group's (task's) mean row subtracted from its rows."""
    out = G.clone()
    for group in np.unique(groups):
        rows = torch.as_tensor(groups == group)
        out[rows] -= out[rows].mean(0)
    return out


def relative_alpha(G: torch.Tensor, alpha: float) -> float:
    """A ridge strength given relative to G's scale: alpha times the mean eigenvalue of G^T G
    (|G|_F^2 / d), so one setting means the same for any model and projection."""
    return alpha * float((G.double() ** 2).sum()) / G.shape[1]


def residual_w(G: torch.Tensor, residual: torch.Tensor, alpha: float) -> torch.Tensor:
    """argmin_w |G w - r|^2 + alpha |w|^2 (ridge on the projected gradients G (n, d))."""
    d = G.shape[1]
    G = G.double()
    return torch.linalg.solve(G.T @ G + alpha * torch.eye(d, dtype=G.dtype), G.T @ residual.double())


def save_adapter(anchor: Anchor, w: torch.Tensor, folder: Path, max_norm: float) -> tuple[float, float]:
    """theta_init + P w as a PEFT adapter folder, w first scaled down so that |P w| <= max_norm.
    Returns (|P w| as fitted, |P w| as saved)."""
    fitted = anchor.load(w)
    saved = fitted
    if fitted > max_norm:
        saved = anchor.load(w * (max_norm / fitted))
    anchor.featurizer.score.model.save_pretrained(str(folder))
    anchor.reset()
    return fitted, saved


def line_search(loss: Callable[[float], float], upper: float) -> tuple[float, float]:
    """The step nu in [0, upper] minimising `loss` (convex in nu here: a cross-entropy of logits
    affine in nu), by bounded Brent search; (nu, loss(nu)), or (0, loss(0)) if no step helps."""
    from scipy.optimize import minimize_scalar

    start = loss(0.0)
    found = minimize_scalar(loss, bounds=(0.0, upper), method="bounded", options={"xatol": 1e-3 * upper})
    nu, value = float(found.x), float(found.fun)
    return (nu, value) if value < start else (0.0, start)
