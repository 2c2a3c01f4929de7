"""The training losses shared by `train-lora`, the ensemble's group adapters and the calibration
fine-tunes; batched scoring of encoded rows by the answer score f; the optimizer steps over
random batches.

`answer` (train-lora, the meta anchor, the calibration fine-tunes) is plain cross-entropy on the
answer tokens. The clipped f of engine/features/per_example.py is the estimator's output
function, a gradient feature only: as a loss, softplus(-f) has ~p/0.01 of cross-entropy's
gradient below p = 0.001 (where a fresh adapter starts on most label tokens) and jumps where
the clip switches on.

`labels` (the ensemble's group adapters) is the cross-entropy of the gold label among the task's
labels: the first answer token's log-probability renormalised over the labels' first tokens,
exactly the class probability the ensemble scores, combines and is judged by
(engine/ensemble/labels.py). On the demo's groups, 24 steps of `answer` at lr 1e-3 spend
themselves on the answer format (loss 10.3 -> 5.7: every label token raised together) and leave
the held-out label NLL worse than the base model's (0.84 against 0.59), while the same steps of
`labels` lower it (0.46) -- a few dozen CPU steps cannot afford to learn the format first."""

from __future__ import annotations

import numpy as np
import torch

from engine.features import answers
from engine.features.per_example import AnswerBatch

Choice = tuple[list[int], list[int]]  # prompt ids; the first token of every label's answer, the gold one first


def choice_batch(examples: list[Choice], pad_id: int) -> AnswerBatch:
    """Prompts whose 'answer tokens' are their labels' first tokens, every one read at the
    prompt's last position (so the answer score's per-token log-probabilities are the labels'
    next-token log-probabilities, through the module's own forward, as DDP needs)."""
    return answers.pad([(ids, [len(ids) - 1] * len(choices), choices) for ids, choices in examples], pad_id)


def collate(examples: list, pad_id: int, objective: str = "answer") -> AnswerBatch:
    """A batch of encoded rows: `Choice`s for `labels`, `answers.Encoded` otherwise."""
    return choice_batch(examples, pad_id) if objective == "labels" else answers.collate(examples, pad_id)


def loss(module, batch: AnswerBatch, objective: str = "answer") -> torch.Tensor:
    """Cross-entropy of the gold tokens. answer: per example, the mean over its answer tokens,
    then the mean over the batch (every example counts once, whatever its answer's length);
    lm: the mean over every token of the text; labels (a `choice_batch`): per example, minus
    the log of the gold label's probability renormalised over the task's labels, then the mean."""
    batch = batch.to(next(module.parameters()).device)
    logp = module(*batch.tensors(), per_token=True)
    valid = batch.answer_valid.to(logp.dtype)
    if objective == "lm":
        return -(logp * valid).sum() / valid.sum()
    if objective == "labels":
        over_labels = logp.masked_fill(batch.answer_valid == 0, float("-inf")).log_softmax(-1)
        return -over_labels[:, 0].mean()
    return (-(logp * valid).sum(-1) / valid.sum(-1).clamp_min(1)).mean()


def score(module, encoded: list, pad: int, batch: int = 32, objective: str = "answer") -> torch.Tensor:
    """f of every encoded row (`collate`'s kind for the objective), without gradients."""
    with torch.no_grad():
        device = next(module.parameters()).device
        return torch.cat([module(*collate(encoded[i:i + batch], pad, objective).to(device).tensors()).cpu()
                          for i in range(0, len(encoded), batch)])


def train_steps(module, optimizer: torch.optim.Optimizer, encoded: list, steps: int,
                batch_size: int, pad: int, rng: np.random.Generator, objective: str = "answer") -> list[float]:
    """`steps` optimizer steps, each on a random batch of `encoded` (`collate`'s kind for the
    objective); the losses."""
    losses = []
    for _ in range(steps):
        batch = [encoded[i] for i in rng.choice(len(encoded), size=min(batch_size, len(encoded)), replace=False)]
        value = loss(module, collate(batch, pad, objective), objective)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(float(value.detach()))
    return losses
