"""The model a gradient store was taken at, rebuilt from the store's config.

Lets later stages evaluate theta* + P w for real: load a projected solution w into the LoRA
weights, score examples with the same answer function f, and go back to theta*. Only the
factors the store projected (parameters.json: those with a gradient at the anchor) are moved;
the others stay at theta*, exactly as the first-order model assumes. Boosting adapters, forward
scoring and calibration all lift through `load`, never through the projector directly.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import torch

from engine import storage
from engine.config import GradsConfig
from engine.errors import SiftError
from engine.features import answers, objective
from engine.features.grads import Factors, GradFeaturizer


class Anchor:
    def __init__(self, grads: str | Path, threads: int | None = None):
        path = storage.join(grads, "config.json")
        if not storage.is_file(path):
            raise SiftError(f"{grads}: no config.json; rebuild the store with this version of `sift featurize grads`")
        Factors.read(grads)  # a store from before the record is refused, not lifted onto every factor
        # The featurizer checks its own live factors against the store's record.
        self.featurizer = GradFeaturizer(GradsConfig.model_validate_json(storage.read_text(path)),
                                         threads=threads or torch.get_num_threads())
        model = self.featurizer.score.model
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
        self.theta = {n: p.detach().clone() for n, p in self.lora.items()}

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
        """Set the LoRA weights to theta* + P w (projected factors only); returns |P w|."""
        lifted = self.featurizer.projector.lift(w.float())
        self.reset()
        with torch.no_grad():
            for name, delta in lifted.items():
                self.params[name].add_(delta.view_as(self.params[name]))
        return float(sum(v.norm() ** 2 for v in lifted.values()) ** 0.5)

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
