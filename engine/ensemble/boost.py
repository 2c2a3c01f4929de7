"""Boosting rounds of the ensemble, in closed form (docs/ALGORITHMS.md section 3, step 6).

The residual of a training row is r = 1 - p_ensemble(gold). A ridge regression on the rows'
projected gradients, G w ~ r - f*, asks for the adapter theta_init + P w whose first-order
output f* + G w matches the residual; that adapter joins the mixture with a fixed weight.
"""

from __future__ import annotations

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


def residual_w(G: torch.Tensor, f: torch.Tensor, residual: torch.Tensor, alpha: float) -> torch.Tensor:
    """argmin |G w - (r - f*)|^2 + alpha |w|^2."""
    d = G.shape[1]
    return torch.linalg.solve(G.T @ G + alpha * torch.eye(d, dtype=G.dtype), G.T @ (residual - f))


def save_adapter(anchor: Anchor, w: torch.Tensor, folder: Path) -> float:
    """theta_init + P w as a PEFT adapter folder; returns |P w|."""
    size = anchor.load(w)
    anchor.featurizer.score.model.save_pretrained(str(folder))
    anchor.reset()
    return size
