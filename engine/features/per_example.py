"""Per-example gradients of the answer score f w.r.t. LoRA parameters: three ways, one answer.

`f` is the method's output function (docs/ALGORITHMS.md section 2), computed at the answer
positions only (the LM head never sees the prompt positions), by the store's objective:
`answer`, the mean over answer tokens of the clipped logit-odds of the gold token over the whole
vocabulary; `labels`, the clipped logit-odds of the gold label among its task's labels (their
answers' first tokens at the prompt's last position, an `objective.choice_batch`), so that
softplus(-f) is the label-set cross-entropy the ensemble's adapters train on and are judged by.

- `hooks` (default): one batched forward and one backward. A LoRA factor is a bias-free Linear
  y = x W^T, so example b's gradient is sum_t dy[b,t]^T x[b,t]: forward hooks keep each factor's
  input and output, autograd returns the gradients w.r.t. those outputs, one einsum finishes.
  Backprop stops by itself at the lowest layer holding LoRA weights: nothing below requires grad.
- `vmap`: torch.func.vmap(grad(f)) over the batch, the functional reference.
- `loop`: one forward/backward per example, the plain reference.
All three run the model in eval mode (dropout off) and must agree (tests/test_per_example.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

P_HIGH, P_LOW, P_SHIFT = 0.9, 0.001, 0.01


@dataclass
class AnswerBatch:
    """Right-padded token ids and, per example, the positions whose next token is an answer token."""

    input_ids: torch.Tensor  # (b, T)
    attention_mask: torch.Tensor  # (b, T)
    answer_pos: torch.Tensor  # (b, A): position t whose logits predict answer token t + 1
    answer_ids: torch.Tensor  # (b, A): the gold answer tokens
    answer_valid: torch.Tensor  # (b, A): 1 for real answer tokens, 0 for padding

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.input_ids, self.attention_mask, self.answer_pos, self.answer_ids, self.answer_valid

    def to(self, device) -> "AnswerBatch":
        return AnswerBatch(*(t.to(device) for t in self.tensors()))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def example(self, i: int) -> "AnswerBatch":
        """Example i alone, padding trimmed (for the loop reference)."""
        length = int(self.attention_mask[i].sum())
        answers = int(self.answer_valid[i].sum())
        return AnswerBatch(self.input_ids[i:i + 1, :length], self.attention_mask[i:i + 1, :length],
                           self.answer_pos[i:i + 1, :answers], self.answer_ids[i:i + 1, :answers],
                           self.answer_valid[i:i + 1, :answers])


def clipped_logit_odds(logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) with p nudged away from 0 and 1 (the shift is a constant: no gradient)."""
    p = logp.exp()
    shift = (torch.where(p > P_HIGH, -P_SHIFT, 0.0) + torch.where(p < P_LOW, P_SHIFT, 0.0)).detach()
    p = p + shift
    return torch.log(p) - torch.log1p(-p)


class AnswerScore(nn.Module):
    """f for a batch of examples, from a PEFT-wrapped causal LM, by `objective` (answer or labels)."""

    def __init__(self, model: nn.Module, objective: str = "answer"):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, input_ids, attention_mask, answer_pos, answer_ids, answer_valid,
                per_token: bool = False) -> torch.Tensor:
        """f per example, or with `per_token` the log-probabilities (b, A) of the answer tokens."""
        # Batches are right-padded and attention is causal, so padding never reaches a real
        # position: no mask is passed, which lets SDPA take its causal fast path and lets vmap
        # trace the model (the mask check is data-dependent control flow).
        del attention_mask
        base = self.model.get_base_model()
        hidden = base.get_decoder()(input_ids=input_ids).last_hidden_state
        picked = hidden.gather(1, answer_pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        logits = base.get_output_embeddings()(picked).float()
        logp = logits.log_softmax(-1).gather(-1, answer_ids.unsqueeze(-1)).squeeze(-1)
        if per_token:
            return logp
        if self.objective == "labels":  # the gold label (column 0) renormalised over the task's labels
            return clipped_logit_odds(logp.masked_fill(answer_valid == 0, float("-inf")).log_softmax(-1)[:, 0])
        valid = answer_valid.to(logp.dtype)
        return (clipped_logit_odds(logp) * valid).sum(-1) / valid.sum(-1).clamp_min(1)


def lora_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Trainable bias-free Linear modules (the LoRA factors), keyed by their weight's name."""
    found = {
        f"{name}.weight": module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.weight.requires_grad and module.bias is None
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(found) != trainable:
        missing = sorted(trainable - set(found))[:3]
        raise ValueError(f"trainable parameters outside bias-free Linear layers: {missing}")
    return found


def hook_grads(score: AnswerScore, batch: AnswerBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """f (b,) and per-example gradients {name: (b, numel)} from one batched backward."""
    modules = lora_linears(score.model)
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable:
        def hook(module, args, out):
            inputs[name], outputs[name] = args[0].detach(), out
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in modules.items()]
    try:
        f = score(*batch.tensors())
    finally:
        for h in handles:
            h.remove()
    names = list(outputs)
    grad_outputs = torch.autograd.grad(f.sum(), [outputs[n] for n in names])
    grads = {}
    for name, dy in zip(names, grad_outputs):
        x = inputs[name]
        equation = "bto,bti->boi" if x.dim() == 3 else "bo,bi->boi"
        grads[name] = torch.einsum(equation, dy.float(), x.float()).reshape(len(batch), -1)
    return f.detach(), grads


def vmap_grads(score: AnswerScore, batch: AnswerBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from torch.func import functional_call, grad_and_value, vmap

    params = {f"model.{n}": p.detach() for n, p in score.model.named_parameters() if p.requires_grad}

    def one(params, *example):
        return functional_call(score, params, tuple(t.unsqueeze(0) for t in example)).squeeze(0)

    grads, f = vmap(grad_and_value(one), in_dims=(None, 0, 0, 0, 0, 0))(params, *batch.tensors())
    return f.detach(), {n[len("model."):]: g.reshape(len(batch), -1) for n, g in grads.items()}


def loop_grads(score: AnswerScore, batch: AnswerBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    named = [(n, p) for n, p in score.model.named_parameters() if p.requires_grad]
    fs, per_example = [], []
    for i in range(len(batch)):
        f = score(*batch.example(i).tensors())[0]
        per_example.append(torch.autograd.grad(f, [p for _, p in named]))
        fs.append(f.detach())
    grads = {n: torch.stack([g[k] for g in per_example]).reshape(len(batch), -1) for k, (n, _) in enumerate(named)}
    return torch.stack(fs), grads


METHODS = {"hooks": hook_grads, "vmap": vmap_grads, "loop": loop_grads}
