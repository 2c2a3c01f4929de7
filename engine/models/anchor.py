"""The model a gradient store was taken at, rebuilt from the store's config.

Lets later stages evaluate theta* + P w for real: load a projected solution w into the LoRA
weights, score examples with the same answer function f, and go back to theta*.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import torch

from engine.config import GradsConfig
from engine.errors import SiftError
from engine.features import answers, objective
from engine.features.grads import GradFeaturizer


class Anchor:
    def __init__(self, grads: str | Path, threads: int | None = None):
        path = Path(grads) / "config.json"
        if not path.is_file():
            raise SiftError(f"{grads}: no config.json; rebuild the store with this version of `sift featurize grads`")
        self.featurizer = GradFeaturizer(GradsConfig.model_validate_json(path.read_text()),
                                         threads=threads or torch.get_num_threads())
        self.params = {n: p for n, p in self.featurizer.score.model.named_parameters() if p.requires_grad}
        self.theta = {n: p.detach().clone() for n, p in self.params.items()}

    def encode(self, frame: pl.DataFrame) -> list[answers.Encoded]:
        """Token ids of every row that has an answer (rows without one are skipped)."""
        encoded = [self.featurizer.encode(row) for row in frame.iter_rows(named=True)]
        return [e for e in encoded if not isinstance(e, str)]

    @property
    def pad(self) -> int:
        return self.featurizer.tokenizer.pad_token_id

    def scores(self, encoded: list[answers.Encoded], batch: int = 32) -> torch.Tensor:
        return objective.score(self.featurizer.score, encoded, self.pad, batch)

    def load(self, w: torch.Tensor) -> float:
        """Set the LoRA weights to theta* + P w; returns |P w|."""
        lifted = self.featurizer.projector.lift(w.float())
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.theta[name] + lifted[name].view_as(p))
        return float(sum(v.norm() ** 2 for v in lifted.values()) ** 0.5)

    def reset(self) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.theta[name])

    def trainable(self) -> list[torch.nn.Parameter]:
        return list(self.params.values())
