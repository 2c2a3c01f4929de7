"""The training loss shared by `train-lora`, the ensemble's group adapters and the calibration
fine-tunes; batched scoring of encoded rows by the answer score f; the optimizer steps over
random batches.

Training minimises plain cross-entropy on the answer tokens. The clipped f of
engine/features/per_example.py is the estimator's output function, a gradient feature only: as
a loss, softplus(-f) has ~p/0.01 of cross-entropy's gradient below p = 0.001 (where a fresh
adapter starts on most label tokens) and jumps where the clip switches on."""

from __future__ import annotations

import numpy as np
import torch

from engine.features import answers


def loss(module, batch: answers.AnswerBatch, objective: str = "answer") -> torch.Tensor:
    """Cross-entropy of the gold tokens. answer: per example, the mean over its answer tokens,
    then the mean over the batch (every example counts once, whatever its answer's length);
    lm: the mean over every token of the text."""
    batch = batch.to(next(module.parameters()).device)
    logp = module(*batch.tensors(), per_token=True)
    valid = batch.answer_valid.to(logp.dtype)
    if objective == "lm":
        return -(logp * valid).sum() / valid.sum()
    return (-(logp * valid).sum(-1) / valid.sum(-1).clamp_min(1)).mean()


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
