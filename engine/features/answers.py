"""Examples -> token ids with the answer marked: what the gradient featurizer feeds the model."""

from __future__ import annotations

import torch

from engine.features.per_example import AnswerBatch

Encoded = tuple[list[int], int]  # token ids, index of the first answer token


def encode(tokenizer, prompt: str, answer: str, max_length: int) -> Encoded | str:
    """Prompt + answer ids, the prompt cut from the left to fit; a reason string if impossible."""
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not answer_ids:
        return "empty answer"
    if len(answer_ids) >= max_length:
        return f"answer longer than max_length ({len(answer_ids)} tokens)"
    prompt_ids = tokenizer(prompt)["input_ids"][-(max_length - len(answer_ids)):]
    if not prompt_ids:
        return "empty prompt"
    return prompt_ids + answer_ids, len(prompt_ids)


def encode_text(tokenizer, text: str, max_length: int) -> Encoded | str:
    """A whole text as the 'answer' after its first token: for a causal LM loss over the text."""
    ids = tokenizer(text)["input_ids"][:max_length]
    if len(ids) < 2:
        return "text shorter than two tokens"
    return ids, 1


def collate(examples: list[Encoded], pad_id: int) -> AnswerBatch:
    width = max(len(ids) for ids, _ in examples)
    answers = max(len(ids) - start for ids, start in examples)
    b = len(examples)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    answer_pos = torch.zeros((b, answers), dtype=torch.long)
    answer_ids = torch.zeros((b, answers), dtype=torch.long)
    answer_valid = torch.zeros((b, answers), dtype=torch.long)
    for i, (ids, start) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        n = len(ids) - start
        answer_pos[i, :n] = torch.arange(start - 1, len(ids) - 1)
        answer_ids[i, :n] = torch.tensor(ids[start:])
        answer_valid[i, :n] = 1
    return AnswerBatch(input_ids, attention_mask, answer_pos, answer_ids, answer_valid)
