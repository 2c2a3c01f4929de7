"""The model a gradient store was taken at, rebuilt from the store's config.

Lets later stages evaluate theta* + P w for real: load a projected solution w into the LoRA
weights, score examples with the same answer function f, and go back to theta*. Only the
factors the store projected (parameters.json: those with a gradient at the anchor) are moved;
the others stay at theta*, exactly as the first-order model assumes. Boosting adapters, forward
scoring and calibration all lift through `load`, never through the projector directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch

from engine import storage
from engine.config import GradsConfig
from engine.errors import SiftError
from engine.features import answers, objective
from engine.features.grads import Factors, GradFeaturizer


@dataclass
class Displacement:
    """theta - theta* of the LoRA weights (Anchor.displacement)."""

    projected: torch.Tensor  # (d,) u = P^T (theta - theta*) over the projected factors
    norm: float  # |theta - theta*| over every LoRA factor
    projected_norm: float  # |theta - theta*| over the projected factors only


class Anchor:
    def __init__(self, grads: str | Path, threads: int | None = None):
        path = storage.join(grads, "config.json")
        if not storage.is_file(path):
            raise SiftError(f"{grads}: no config.json; rebuild the store with this version of `sift featurize grads`")
        Factors.read(grads)  # a store from before the record is refused, not lifted onto every factor
        # The featurizer checks its own live factors against the store's record.
        self.featurizer = GradFeaturizer(GradsConfig.model_validate_json(storage.read_text(path)),
                                         threads=threads or torch.get_num_threads(), store=grads)
        model = self.featurizer.score.model
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
        self.theta = {n: p.detach().clone() for n, p in self.lora.items()}

    def encode(self, frame: pl.DataFrame) -> list[answers.Encoded | objective.Choice]:
        """Every row that has an answer, encoded for the store's objective (rows without one are skipped)."""
        encoded = [self.featurizer.encode(row) for row in frame.iter_rows(named=True)]
        return [e for e in encoded if not isinstance(e, str)]

    @property
    def pad(self) -> int:
        return self.featurizer.tokenizer.pad_token_id

    @property
    def objective(self) -> str:
        """The store's objective: what f is (per_example), and the loss a real fine-tune trains on."""
        return self.featurizer.cfg.objective

    def scores(self, encoded: list, batch: int = 32) -> torch.Tensor:
        return objective.score(self.featurizer.score, encoded, self.pad, batch, self.objective)

    def load(self, w: torch.Tensor) -> float:
        """Set the LoRA weights to theta* + P w (projected factors only); returns |P w|."""
        lifted = self.featurizer.projector.lift(w.float())
        self.reset()
        with torch.no_grad():
            for name, delta in lifted.items():
                self.params[name].add_(delta.view_as(self.params[name]))
        return float(sum(v.norm() ** 2 for v in lifted.values()) ** 0.5)

    def displacement(self) -> "Displacement":
        """How far the LoRA weights are from theta* now (e.g. after a real fine-tune), in the
        estimator's coordinates: u = P^T (theta - theta*) over the projected factors, the w whose
        first-order effect g . P w = (P^T g) . u matches the real update's g . (theta - theta*)
        (E[P P^T] = I for P's +-1/sqrt(d) entries), and the norms in parameter space. Note
        |u| ~ |theta - theta*| while a lifted |P w| ~ sqrt(D/d) |w|: a fitted w and a real update
        are compared by |w| against |u|, never |P w| against |theta - theta*|."""
        names = list(self.featurizer.projector.sizes)
        with torch.no_grad():
            delta = {n: (p.detach() - self.theta[n]).float() for n, p in self.lora.items()}
            u = self.featurizer.projector.project({n: delta[n].reshape(1, -1) for n in names})[0]
            squared = {n: float(v.norm() ** 2) for n, v in delta.items()}
        return Displacement(u.double().cpu(), sum(squared.values()) ** 0.5,
                            sum(v for n, v in squared.items() if n in names) ** 0.5)

    def reset(self) -> None:
        """Every LoRA factor back to theta*."""
        with torch.no_grad():
            for name, p in self.lora.items():
                p.copy_(self.theta[name])

    def trainable(self) -> list[torch.nn.Parameter]:
        """Every LoRA factor, made trainable: a real fine-tune moves A and B alike."""
        for p in self.lora.values():
            p.requires_grad_(True)
        return list(self.lora.values())
