"""The answer-score objective shared by training (`train-lora`) and calibration: the loss,
batched scoring of encoded rows, and the optimizer steps over random batches."""

from __future__ import annotations

import numpy as np
import torch

from engine.features import answers


def loss(module, batch: answers.AnswerBatch, objective: str = "answer") -> torch.Tensor:
    """answer: softplus(-f) (CE for one-token answers); lm: mean token CE over the text."""
    batch = batch.to(next(module.parameters()).device)
    if objective == "lm":
        logp = module(*batch.tensors(), per_token=True)
        valid = batch.answer_valid.to(logp.dtype)
        return -(logp * valid).sum() / valid.sum()
    return torch.nn.functional.softplus(-module(*batch.tensors())).mean()


def score(module, encoded: list[answers.Encoded], pad: int, batch: int = 32) -> torch.Tensor:
    """f of every encoded row, without gradients."""
    with torch.no_grad():
        device = next(module.parameters()).device
        return torch.cat([module(*answers.collate(encoded[i:i + batch], pad).to(device).tensors()).cpu()
                          for i in range(0, len(encoded), batch)])


def train_steps(module, optimizer: torch.optim.Optimizer, encoded: list[answers.Encoded], steps: int,
                batch_size: int, pad: int, rng: np.random.Generator, objective: str = "answer") -> list[float]:
    """`steps` optimizer steps, each on a random batch of `encoded`; the losses."""
    losses = []
    for _ in range(steps):
        batch = [encoded[i] for i in rng.choice(len(encoded), size=min(batch_size, len(encoded)), replace=False)]
        value = loss(module, answers.collate(batch, pad), objective)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(float(value.detach()))
    return losses
