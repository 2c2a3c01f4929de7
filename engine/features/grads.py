"""`sift featurize grads`: per-example projected LoRA gradients and anchor outputs f* into a store.

The anchor is the base model with a freshly initialised, seeded LoRA (or a given adapter
folder). For every example: f* (the answer score at the anchor) and P^T grad f, with P the
seeded block-wise Rademacher projection. See engine/features/per_example.py for how the
per-example gradients come out of one batched backward.

Only the LoRA factors whose gradient can be non-zero at the anchor are projected (and later
lifted): at a fresh LoRA every lora_B is zero, so the gradient w.r.t. lora_A (B^T dy x^T) is
exactly zero, and moving A by P w would add a second-order Delta B Delta A change the linear
model cannot see. The store records which factors those are (parameters.json), and every later
stage that lifts a solution (the Anchor: forward scoring, calibration, boosting) checks it has
the same ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from engine import executor, storage
from engine.config import GradsConfig
from engine.data.ingest import examples_path
from engine.data.schema import label_sets
from engine.errors import SiftError
from engine.features import answers, objective, runner
from engine.features.per_example import METHODS, AnswerBatch, AnswerScore
from engine.features.projection import Projector
from engine.features.store import FeatureStore, StoreSpec
from engine.models import builtin, load, lora

PARAMETERS = "parameters.json"
LABELS = "labels.json"  # objective=labels: each task's label set, the classes f is read over
PARTNERS = {".lora_A.": ".lora_B.", ".lora_B.": ".lora_A."}


def anchor_model(cfg: GradsConfig):
    """The model whose LoRA gradients are taken: eval mode, only adapter weights trainable.
    (Any config with model, adapter, lora, quantize and trust_remote_code will do.)"""
    path = builtin.resolve(cfg.model)
    base = load.load_causal_lm(path, quantize=cfg.quantize, trust_remote_code=cfg.trust_remote_code)
    if cfg.adapter is not None:
        model = lora.load_adapter(base, cfg.adapter, trainable=True)
    else:
        model = lora.add_lora(base, cfg.lora)
    for param in model.parameters():
        param.requires_grad_(False)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
    return load.load_tokenizer(path, cfg.trust_remote_code), model.eval()


def live_factors(model) -> list[str]:
    """The trainable LoRA factors whose gradient can be non-zero here: those whose partner factor
    (lora_B for a lora_A and vice versa) holds a non-zero entry. The gradient of y = B A x is
    B^T dy x^T for A and dy (A x)^T for B, so a zero partner makes it exactly zero."""
    params = dict(model.named_parameters())
    live = []
    for name, param in params.items():
        if not param.requires_grad:
            continue
        key = next((k for k in PARTNERS if k in name), None)
        if key is None:
            raise SiftError(f"trainable parameter {name} is not a LoRA factor (lora_A / lora_B)")
        partner = params[name.replace(key, PARTNERS[key])]
        if bool((partner != 0).any()):
            live.append(name)
    if not live:
        raise SiftError("every LoRA factor is zero at the anchor: no gradient to take")
    return live


@dataclass
class Factors:
    """What parameters.json records: the projected factors and their sizes, the factors held at
    the anchor, and the norm of the anchor's whole adapter (the scale of the norm rescaling)."""

    projected: dict[str, int]  # name -> numel, in projection order
    fixed: list[str]
    anchor_norm: float

    @classmethod
    def read(cls, store: str | Path) -> "Factors":
        path = storage.join(store, PARAMETERS)
        if not storage.is_file(path):
            raise SiftError(f"{store}: no {PARAMETERS} (which LoRA factors were projected); rebuild the store "
                            "with this version of `sift featurize grads`")
        return cls(**storage.read_json(path))

    def record(self, store: str | Path) -> None:
        """Write the record, or check that an existing one names the same projected factors."""
        path = storage.join(store, PARAMETERS)
        if storage.is_file(path):
            recorded = Factors.read(store).projected
            if list(recorded) != list(self.projected):
                raise SiftError(f"{path}: the store projected {len(recorded)} LoRA factors, this anchor has "
                                f"{len(self.projected)} with a gradient; rebuild the store with `sift featurize grads`")
            return
        storage.write_json(path, asdict(self))  # atomic: concurrent actors write the same record


def encode_row(tokenizer, cfg, row: dict) -> answers.Encoded | str:
    """A row's prompt + answer ids from cfg.prompt / cfg.answer / cfg.max_length, or a reason."""
    if row.get("label") is None and "{label}" in cfg.answer:
        return "missing label (gradient features need an answer)"
    fields = {"text": row["text"], "task": row.get("task") or "", "label": row.get("label") or ""}
    return answers.encode(tokenizer, cfg.prompt.format(**fields), cfg.answer.format(**fields), cfg.max_length)


@dataclass
class LabelTokens:
    """For the labels objective: each task's labels (sorted: the ensemble's class order) and the
    first token of each label's answer (cfg.answer), which the label-set probability is read from."""

    labels: dict[str, list[str]]
    tokens: dict[str, list[int]]

    @classmethod
    def of(cls, tokenizer, answer: str, labels: dict[str, list[str]]) -> "LabelTokens":
        """Tasks with one label get no tokens (their rows are quarantined); labels that start with
        the same token cannot be told apart: an error naming the task."""
        from engine.ensemble.labels import label_token_ids

        tokens = {}
        for task, names in labels.items():
            if len(names) < 2:
                continue
            try:
                tokens[task] = label_token_ids(tokenizer, answer, names)
            except SiftError as exc:
                raise SiftError(f"task {task!r}: {exc}") from None
        return cls(labels, tokens)

    def encode(self, tokenizer, cfg, row: dict) -> objective.Choice | str:
        """A row's prompt as the ensemble builds it (cut from the left to max_length - 1) and its
        task's label tokens, the gold one first; or a reason."""
        from engine.ensemble.labels import prompt_ids

        task, label = row.get("task") or "", row.get("label")
        if label is None:
            return "missing label (gradient features need an answer)"
        if task not in self.tokens:
            return f"task {task!r} has fewer than two labels (objective=labels scores the gold one among them)"
        names = self.labels[task]
        if label not in names:
            return f"label {label!r} is not among task {task!r}'s labels"
        if not row["text"]:
            return "empty text"
        ids, gold = self.tokens[task], names.index(label)
        return prompt_ids(tokenizer, cfg, row["text"], task), [ids[gold], *ids[:gold], *ids[gold + 1:]]


def store_labels(cfg: GradsConfig, store: str | Path | None = None) -> dict[str, list[str]]:
    """The label sets a labels-objective store was taken with: its labels.json (written by
    `featurize_grads` before any shard), else those of cfg.data."""
    store = store if store is not None else cfg.out
    if store is not None and storage.is_file(storage.join(store, LABELS)):
        return storage.read_json(storage.join(store, LABELS))
    return label_sets(storage.read_parquet(examples_path(cfg.data), columns=["task", "label"]))


class GradFeaturizer:
    """f and its projected gradient per row. `store`: where the store's records are (default
    cfg.out; `Anchor` passes the store it was opened on)."""

    def __init__(self, cfg: GradsConfig, threads: int, store: str | Path | None = None):
        self.cfg = cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer, model = anchor_model(cfg)
        if cfg.quantize == "none":
            model = model.to(self.device)
        self.score = AnswerScore(model, cfg.objective)
        self.labels = (LabelTokens.of(self.tokenizer, cfg.answer, store_labels(cfg, store))
                       if cfg.objective == "labels" else None)
        self.method = METHODS[cfg.method]
        # Factors with no gradient at the anchor are frozen: they are neither projected nor lifted.
        live = live_factors(model)
        lora_factors = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.factors = Factors(
            projected={n: p.numel() for n, p in lora_factors.items() if n in live},
            fixed=[n for n in lora_factors if n not in live],
            anchor_norm=float(sum(p.detach().float().norm() ** 2 for p in lora_factors.values()) ** 0.5))
        for name, param in model.named_parameters():
            param.requires_grad_(name in live)
        if cfg.out is not None:
            self.factors.record(cfg.out)
        self.projector = Projector(self.factors.projected, cfg.dim, cfg.seed, cfg.projection_cache_mb, self.device)

    def encode(self, row: dict) -> answers.Encoded | objective.Choice | str:
        if self.labels is not None:
            return self.labels.encode(self.tokenizer, self.cfg, row)
        return encode_row(self.tokenizer, self.cfg, row)

    def collate(self, encoded: list) -> AnswerBatch:
        return objective.collate(encoded, self.tokenizer.pad_token_id, self.cfg.objective)

    def __call__(self, frame: pl.DataFrame) -> runner.Featurized:
        n = frame.height
        vectors = np.full((n, self.cfg.dim), np.nan, dtype=np.float32)
        f_values = np.full(n, np.nan, dtype=np.float32)
        encoded, reasons = {}, {}
        for i, row in enumerate(frame.iter_rows(named=True)):
            result = self.encode(row)
            if isinstance(result, str):
                reasons[i] = result
            else:
                encoded[i] = result
        order = sorted(encoded, key=lambda i: len(encoded[i][0]))
        for start in range(0, len(order), self.cfg.batch_size):
            chunk = order[start:start + self.cfg.batch_size]
            batch = self.collate([encoded[i] for i in chunk]).to(self.device)
            f, grads = self.method(self.score, batch)
            vectors[chunk] = self.projector.project(grads).cpu().numpy()
            f_values[chunk] = f.float().cpu().numpy()
        return runner.split_finite(frame, vectors, {"f": f_values}, reasons)


def spec_for(cfg: GradsConfig):
    if cfg.model is None:
        raise SiftError("featurize grads needs --model (a model folder or a built-in name)")
    examples = examples_path(cfg.data)
    rows = storage.parquet_rows(examples)
    spec = StoreSpec(
        kind="grads",
        fingerprint={
            "model": executor.folder_digest(builtin.resolve(cfg.model)),
            "adapter": executor.folder_digest(cfg.adapter),
            "config": executor.settings_digest(
                cfg, exclude={"model", "adapter", "batch_size", "method", "projection_cache_mb", "shard_rows"}),
            "data": executor.data_digest(examples),
            "projected": "LoRA factors with a non-zero partner",  # stores that lifted every factor are stale
        },
        dim=cfg.dim, dtype=cfg.dtype, seed=cfg.seed, rows=rows, shard_rows=cfg.shard_rows,
    )
    return spec, examples


def featurize_grads(cfg: GradsConfig) -> tuple[FeatureStore, runner.RunStats]:
    spec, examples = spec_for(cfg)
    records = {}
    if cfg.objective == "labels":
        # Recorded before any shard, so every actor (and later the Anchor) reads the same classes;
        # checked here first, so a task whose labels cannot be told apart fails before the run.
        labels = label_sets(storage.read_parquet(examples, columns=["task", "label"]))
        try:
            LabelTokens.of(load.load_tokenizer(builtin.resolve(cfg.model), cfg.trust_remote_code), cfg.answer, labels)
        except SiftError as exc:
            raise SiftError(f"{exc}; featurize it with objective=answer") from None
        records[LABELS] = labels
    return runner.run(cfg, spec, GradFeaturizer, examples, progress="grads", records=records)
