"""Per-label scores of one prompt under each adapter, and their weighted combination.

A task's classes are its verbalized answers. Each class is scored by the next-token
log-probability of the first token of its answer after the prompt (one forward pass per prompt
and adapter, exact over the label set; the vLLM backend computes the same number). Class
probabilities are those log-probabilities renormalised over the task's labels; the ensemble's
distribution (`combine`) is the weighted mixture of its adapters' class probabilities, plus the
boosting terms in label-logit space.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from engine.errors import SiftError
from engine.ensemble.manifest import Manifest


def label_token_ids(tokenizer, answer: str, labels: list[str]) -> list[int]:
    """The first token of each label's answer; labels must differ in it to be told apart."""
    ids = []
    for label in labels:
        tokens = tokenizer(answer.format(label=label), add_special_tokens=False)["input_ids"]
        if not tokens:
            raise SiftError(f"label {label!r} has an empty answer")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        clash = [lab for lab, i in zip(labels, ids) if ids.count(i) > 1]
        raise SiftError(f"labels {clash} start with the same token: they cannot be scored apart")
    return ids


def prompt_ids(tokenizer, manifest: Manifest, text: str, task: str) -> list[int]:
    """The prompt's token ids (formatted as in training), cut from the left to max_length - 1
    (one slot for the answer)."""
    if not text:
        raise SiftError("empty text")
    ids = tokenizer(manifest.prompt.format(text=text, task=task, label=""))["input_ids"]
    return ids[-(manifest.max_length - 1):]


@dataclass
class Shared:
    """The input of decoder layer `layer` for a batch of right-padded prompts. Below the first
    layer any loaded adapter changes, every adapter and the bare base compute the same thing, so
    an ensemble computes it once per batch and runs only the layers from `layer` up per model
    (the demo's LoRA sits on 4 of SmolLM2's 30 layers: scoring under 3 models costs 26 + 3 x 4
    layers instead of 3 x 30)."""

    layer: int
    hidden: torch.Tensor


class _Reached(Exception):
    """Raised by the pre-hook that takes a layer's input: the layers above need not run."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def _padded(prompts: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, :len(ids)] = torch.tensor(ids)
    return input_ids


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def first_adapted_layer(model) -> int | None:
    """The lowest decoder layer holding a LoRA module of any loaded adapter; None when the
    decoder has no `layers` list or no layer is adapted."""
    layers = getattr(_base(model).get_decoder(), "layers", None)
    if layers is None:
        return None
    return next((k for k, layer in enumerate(layers) if any("lora_" in n for n, _ in layer.named_modules())), None)


def shared_prefix(model, prompts: list[list[int]], pad_id: int, layer: int) -> Shared:
    """The prompts' hidden states at the input of decoder layer `layer` (layers below only)."""
    decoder = _base(model).get_decoder()

    def take(module, args, kwargs):
        raise _Reached(args[0] if args else kwargs["hidden_states"])

    handle = decoder.layers[layer].register_forward_pre_hook(take, with_kwargs=True)
    try:
        with torch.no_grad():
            decoder(input_ids=_padded(prompts, pad_id).to(next(decoder.parameters()).device), use_cache=False)
    except _Reached as reached:
        return Shared(layer, reached.hidden)
    finally:
        handle.remove()
    raise SiftError(f"decoder layer {layer} never ran")


def _upper(decoder, shared: Shared) -> torch.Tensor:
    """The decoder's output from `shared` (its layers from shared.layer up, then its norm),
    through the decoder's own forward with the lower layers taken out: position embeddings and
    the causal mask come from the model's code, not a copy of it."""
    layers = decoder.layers
    decoder.layers = layers[shared.layer:]
    try:
        return decoder(inputs_embeds=shared.hidden, use_cache=False).last_hidden_state
    finally:
        decoder.layers = layers


def next_token_logprobs(model, prompts: list[list[int]], token_ids: list[int], pad_id: int,
                        shared: Shared | None = None) -> torch.Tensor:
    """(B, L) log p(token | prompt) over the full vocabulary, for the L given tokens; with
    `shared` (shared_prefix of the same prompts), only the layers from shared.layer up run.

    Right padding with causal attention: the last real position of each prompt never sees the
    padding, so no mask is needed and only those positions go through the LM head."""
    base = _base(model)
    last = torch.tensor([len(p) - 1 for p in prompts])
    device = next(base.parameters()).device
    with torch.no_grad():
        if shared is None:
            hidden = base.get_decoder()(input_ids=_padded(prompts, pad_id).to(device)).last_hidden_state
        else:
            hidden = _upper(base.get_decoder(), shared)
        picked = hidden[torch.arange(len(prompts), device=device), last.to(device)]
        logp = base.get_output_embeddings()(picked).float().log_softmax(-1)
    return logp[:, token_ids].cpu()


def class_probs(logprobs: torch.Tensor) -> torch.Tensor:
    """Label log-probabilities (B, L) -> probabilities renormalised over the labels."""
    return torch.softmax(logprobs.double(), dim=-1)


def mixture(per_adapter: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The weighted mixture of the adapters' class probabilities (B, L)."""
    return sum(w * class_probs(per_adapter[name]) for name, w in weights.items() if w > 0)


def boosted(mixed: torch.Tensor, steps: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """Class probabilities (B, L) of softmax(log mixed + sum nu * delta) for (nu, delta) in
    `steps`, delta a boosting adapter's label log-probabilities minus the anchor's (B, L)."""
    logits = torch.log(mixed.double().clamp_min(1e-300))
    for nu, delta in steps:
        logits = logits + nu * delta.double()
    return torch.softmax(logits, dim=-1)


def combine(per_model: dict[str | None, torch.Tensor], manifest: Manifest, task: str) -> torch.Tensor:
    """The ensemble's class probabilities (B, L) for `task`, from the label log-probabilities
    (B, L) of every model in `manifest.models(task)` (None: the bare base): the weighted
    mixture of the adapters' class probabilities, then each boosting step added in label-logit
    space, nu * (the boosting adapter's log-probabilities - the anchor's). The anchor's own
    output is the first-order model's starting point, so only the boosting adapter's change
    from it is added; per-row constants (the full-vocabulary normaliser) cancel in the softmax."""
    entry = manifest.task(task)
    mixed = mixture(per_model, entry.weights)
    return boosted(mixed, [(b.step, per_model[b.adapter] - per_model[manifest.anchor]) for b in entry.boost])


@contextmanager
def active(model, adapter: str | None) -> Iterator[None]:
    """Run `model` (a PeftModel holding several named adapters) with one adapter, or the bare
    base with None."""
    if adapter is None:
        with model.disable_adapter():
            yield
        return
    model.set_adapter(adapter)
    yield
