"""Boosting rounds of the ensemble, in closed form (docs/ALGORITHMS.md section 3, step 6).

Gradient boosting in label-logit space. The ensemble's label logits are z = log p_mixture (plus
earlier rounds); the negative gradient of its cross-entropy w.r.t. the gold label's log-odds
among the task's labels, z_gold - logsumexp(z_others), is the residual r = 1 - p_ensemble(gold).
A boosting adapter theta_init + P w starts at the anchor, where a training row's gold label-set
log-odds move by about x . w, x the projected gradient of those log-odds at the anchor
(`label_odds_gradients`: one gradient pass over the training rows, with the gradient store's
projection, so that `Anchor.load` lifts w to the same parameters). A ridge regression X w ~ r
asks for the adapter that raises each row's gold margin by its residual. Its change from the
anchor, delta = (its label log-probabilities - the anchor's), is added to z with a step size nu
chosen by line search on validation rows; the other adapters' weights stay as they are. The
update is norm-controlled: |P w| is capped (the first-order model holds near the anchor only)
before the adapter is saved.

Before issue 14's fix the design was the gradient store's rows centred per task: the gradient of
the answer score f, the gold answer's log-odds over the whole vocabulary, minus the task's mean.
That is not the margin the ensemble renormalises over the labels: its x-dependent
whole-vocabulary part cancels in the label softmax and the mean of the other rows is no stand-in
for the same row's other labels, so the predicted change of the margins and the real one hardly
agreed (jobs/bench/boosting.py), and the demo's rounds were rejected.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import torch

from engine.models.anchor import Anchor


class _GoldLabelOdds(torch.nn.Module):
    """The label-set log-odds of each row's gold label, z_gold - logsumexp(z_other labels), from a
    `objective.choice_batch` (the gold label's first token first): exactly the margin a boosting
    step changes once the ensemble renormalises over the task's labels (the full-vocabulary
    normaliser cancels)."""

    def __init__(self, score: torch.nn.Module):
        super().__init__()
        self.score = score
        self.model = score.model  # the per-example gradient methods find the LoRA factors here

    def forward(self, input_ids, attention_mask, answer_pos, answer_ids, answer_valid) -> torch.Tensor:
        logp = self.score(input_ids, attention_mask, answer_pos, answer_ids, answer_valid, per_token=True)
        others = logp[:, 1:].masked_fill(answer_valid[:, 1:] == 0, float("-inf")).logsumexp(-1)
        return logp[:, 0] - others


def label_odds_gradients(anchor: Anchor, prompts: list[list[int]], choices: list[list[int]],
                         batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d) projected gradients at the anchor of each row's gold label-set log-odds (prompt
    token ids; its labels' first tokens, the gold one first), with the store's projection (so
    `Anchor.load(w)` moves the log-odds by about X w), and the log-odds themselves (n,)."""
    from engine.features import objective

    module = _GoldLabelOdds(anchor.featurizer.score)
    device = anchor.featurizer.device
    X, odds = [], []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        encoded = objective.choice_batch([(prompts[i], choices[i]) for i in chunk], anchor.pad).to(device)
        f, grads = anchor.featurizer.method(module, encoded)
        X.append(anchor.featurizer.projector.project(grads).double().cpu())
        odds.append(f.double().cpu())
    inverse = torch.as_tensor(np.argsort(order))
    return torch.cat(X)[inverse], torch.cat(odds)[inverse]


def design(anchor: Anchor, tokenizer, manifest, rows: pl.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
    """`label_odds_gradients` of `rows` (task, text, label), in their order, with the prompts and
    label tokens the ensemble scores them by (engine/ensemble/labels.py)."""
    from engine.ensemble import labels

    prompts, choices = [], []
    for task, text, label in rows.select("task", "text", "label").iter_rows():
        names = manifest.task(task).labels
        ids = labels.label_token_ids(tokenizer, manifest.answer, names)
        gold = names.index(label)
        prompts.append(labels.prompt_ids(tokenizer, manifest, text, task))
        choices.append([ids[gold], *ids[:gold], *ids[gold + 1:]])
    return label_odds_gradients(anchor, prompts, choices)


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
