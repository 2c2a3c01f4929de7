"""A multi-task suite built from the built-in corpora: classification tasks of different kinds,
each a prompt with a single-word verbalized answer, balanced, split train/validation by seed.

The estimator and the adapter ensemble are validated on it. `noisy_groups` adds the synthetic
check the issue asks for: one task cut into groups, some with their labels shuffled.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from engine.data import corpora
from engine.errors import SiftError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    corpus: str
    question: str
    answers: dict[str, str]  # corpus label -> verbalized answer word


TASKS = [
    TaskSpec("tweet-sentiment", "tweets", "Is the tweet negative, neutral or positive?",
             {"negative": "negative", "neutral": "neutral", "positive": "positive"}),
    TaskSpec("tweet-polarity", "tweets", "Is the tweet negative or positive?",
             {"negative": "negative", "positive": "positive"}),
    TaskSpec("wordnet-animal-plant", "wordnet", "Does the definition describe an animal or a plant?",
             {"noun.animal": "animal", "noun.plant": "plant"}),
    TaskSpec("wordnet-motion-communication", "wordnet", "Is the verb about motion or speech?",
             {"verb.motion": "motion", "verb.communication": "speech"}),
    TaskSpec("wordnet-food-artifact", "wordnet", "Does the definition describe food or an object?",
             {"noun.food": "food", "noun.artifact": "object"}),
    TaskSpec("wordnet-person-location", "wordnet", "Does the definition describe a person or a place?",
             {"noun.person": "person", "noun.location": "place"}),
    TaskSpec("fortunes-computers-science", "fortunes", "Is the quote about computers or science?",
             {"computers": "computers", "science": "science"}),
    TaskSpec("fortunes-law-politics", "fortunes", "Is the quote about law or politics?",
             {"law": "law", "politics": "politics"}),
    TaskSpec("chatterbot-topic", "chatterbot", "Is the exchange about AI, trivia or psychology?",
             {"ai": "AI", "trivia": "trivia", "psychology": "psychology"}),
]


def build(per_task: int = 400, validation: float = 0.2, seed: int = 0, tasks: list[str] | None = None,
          noisy_groups: int = 0, noisy_shuffled: int = 0, test: float = 0.0) -> pl.DataFrame:
    """The suite in the example schema: text = question + input, label = answer word, split
    (train / validation, and with `test` > 0 a test share that no fit or selection sees)."""
    chosen = [t for t in TASKS if tasks is None or t.name in tasks]
    if tasks is not None and len(chosen) != len(tasks):
        unknown = sorted(set(tasks) - {t.name for t in TASKS})
        raise SiftError(f"unknown suite task(s) {unknown}; known: {', '.join(t.name for t in TASKS)}")
    frames = [_task(spec, per_task, validation, seed, test=test) for spec in chosen]
    if noisy_groups:
        frames.append(_noisy(per_task, validation, seed, noisy_groups, noisy_shuffled))
    return pl.concat(frames)


def _task(spec: TaskSpec, per_task: int, validation: float, seed: int, name: str | None = None,
          test: float = 0.0) -> pl.DataFrame:
    source = corpora.load(spec.corpus).unique("id", keep="first", maintain_order=True)
    per_class = per_task // len(spec.answers)
    parts = []
    for label, answer in spec.answers.items():
        rows = source.filter(pl.col("label") == label)
        if rows.height < 2:
            raise SiftError(f"suite task {spec.name}: too few '{label}' rows in corpus {spec.corpus}")
        parts.append(rows.sample(min(per_class, rows.height), seed=seed).with_columns(label=pl.lit(answer)))
    frame = pl.concat(parts).sample(fraction=1.0, shuffle=True, seed=seed)
    n_val = max(1, round(validation * frame.height))
    n_test = round(test * frame.height)
    task = name or spec.name
    return frame.select(
        pl.format("{}-{}", pl.lit(task), pl.col("id")).alias("id"),
        pl.format("{}\n{}", pl.lit(spec.question), pl.col("text")).alias("text"),
        pl.lit(task).alias("task"),
        pl.col("label"),
        pl.when(pl.int_range(pl.len()) < n_val).then(pl.lit("validation"))
        .when(pl.int_range(pl.len()) < n_val + n_test).then(pl.lit("test"))
        .otherwise(pl.lit("train")).alias("split"),
        pl.lit(None, dtype=pl.String).alias("meta"),
    )


def _noisy(per_task: int, validation: float, seed: int, groups: int, shuffled: int) -> pl.DataFrame:
    """wordnet-animal-plant cut into `groups` tasks; the last `shuffled` get random labels."""
    spec = TaskSpec("noisy-animal-plant", "wordnet", TASKS[2].question, TASKS[2].answers)
    parts = []
    for g in range(groups):
        part = _task(spec, per_task, validation, seed + 1000 + g, name=f"noisy-group-{g}")
        if g >= groups - shuffled:
            labels = part["label"].sample(fraction=1.0, shuffle=True, seed=seed + g)
            answers = list(spec.answers.values())
            flipped = [answers[(answers.index(lab) + i) % 2] for i, lab in enumerate(labels)]
            part = part.with_columns(label=pl.Series(flipped))
        parts.append(part)
    return pl.concat(parts)
