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
    """Each answer token is read at the position before it (next-token prediction)."""
    return pad([(ids, list(range(start - 1, len(ids) - 1)), ids[start:]) for ids, start in examples], pad_id)


def pad(rows: list[tuple[list[int], list[int], list[int]]], pad_id: int) -> AnswerBatch:
    """(token ids, positions to read, the answer token read at each) per row -> one padded batch."""
    width = max(len(ids) for ids, _, _ in rows)
    answers = max(len(tokens) for _, _, tokens in rows)
    b = len(rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    answer_pos = torch.zeros((b, answers), dtype=torch.long)
    answer_ids = torch.zeros((b, answers), dtype=torch.long)
    answer_valid = torch.zeros((b, answers), dtype=torch.long)
    for i, (ids, positions, tokens) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        answer_pos[i, : len(tokens)] = torch.tensor(positions)
        answer_ids[i, : len(tokens)] = torch.tensor(tokens)
        answer_valid[i, : len(tokens)] = 1
    return AnswerBatch(input_ids, attention_mask, answer_pos, answer_ids, answer_valid)
