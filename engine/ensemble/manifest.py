"""`ensemble.json`: everything needed to evaluate or serve an adapter ensemble, and its checks.

The manifest is the contract between `sift train` (writes it), `sift evaluate` and `sift serve`
(read it). A task's prediction (engine/ensemble/labels.py, `combine`) is the weighted mixture of
its adapters' class probabilities, then each boosting step added in label-logit space: the
boosting adapter's label log-probabilities minus the anchor's (`anchor`: the adapter every
boosting adapter started from; null: the bare base model, which a fresh LoRA computes exactly),
times the step's size. Loading validates it completely — adapters present, in PEFT safetensors format, of a
rank the server is configured for, weights that name known adapters and sum to one — so a broken
ensemble fails with one line before any model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from engine.config import StrictModel
from engine.errors import SiftError

FILENAME = "ensemble.json"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class AdapterEntry(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    path: str = Field(description="PEFT adapter folder, relative to the manifest's folder or absolute")
    kind: Literal["group", "boost", "task", "all", "anchor"] = "group"
    tasks: list[str] = Field(description="tasks the adapter was trained on (boost: the tasks it corrects)")
    rank: int = Field(ge=1)


class BoostStep(StrictModel):
    """One boosting round's term: step * (the adapter's label log-probabilities - the anchor's)."""

    adapter: str
    step: float = Field(gt=0, description="the step size nu, chosen by line search on validation rows")


class TaskEntry(StrictModel):
    labels: list[str] = Field(min_length=2, description="the verbalized answers; class order")
    weights: dict[str, float] = Field(description="adapter name -> mixture weight (>= 0, sum 1)")
    boost: list[BoostStep] = Field(default_factory=list, description="boosting terms added in label-logit "
                                                                     "space, in the order they were fitted")

    @model_validator(mode="after")
    def _weights(self) -> "TaskEntry":
        if not self.weights:
            raise ValueError("no adapter weights")
        if any(w < 0 for w in self.weights.values()):
            raise ValueError("negative weight")
        if abs(sum(self.weights.values()) - 1.0) > 1e-4:
            raise ValueError(f"weights sum to {sum(self.weights.values()):.4f}, not 1")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("repeated label")
        return self


class Manifest(StrictModel):
    version: Literal[1] = 1
    base_model: str = Field(description="built-in model name or model folder")
    quantize: Literal["none", "nf4"] = "none"
    prompt: str = "{text}\nAnswer:"
    answer: str = " {label}"
    max_length: int = Field(128, ge=2)
    max_lora_rank: int = Field(ge=1, description="servers size their LoRA slots by it")
    adapters: list[AdapterEntry] = Field(min_length=1)
    anchor: str | None = Field(None, description="the adapter boosting adapters are measured against (kind "
                                                 "anchor); null: the bare base model")
    tasks: dict[str, TaskEntry] = Field(min_length=1)
    metrics: dict = Field(default_factory=dict)
    flops: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> "Manifest":
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError("adapter names repeat")
        for task, entry in self.tasks.items():
            unknown = sorted(set(entry.weights) - set(names))
            if unknown:
                raise ValueError(f"task {task!r} weights unknown adapter(s) {unknown}")
            unknown = sorted({b.adapter for b in entry.boost} - set(names))
            if unknown:
                raise ValueError(f"task {task!r} boosts with unknown adapter(s) {unknown}")
        if self.anchor is not None and self.anchor not in names:
            raise ValueError(f"anchor {self.anchor!r} is not an adapter of the manifest")
        for adapter in self.adapters:
            if adapter.rank > self.max_lora_rank:
                raise ValueError(f"adapter {adapter.name!r} has rank {adapter.rank} > max_lora_rank {self.max_lora_rank}")
        return self

    def adapter(self, name: str) -> AdapterEntry:
        for entry in self.adapters:
            if entry.name == name:
                return entry
        raise SiftError(f"unknown adapter {name!r}; the manifest has {', '.join(a.name for a in self.adapters)}")

    def task(self, name: str) -> TaskEntry:
        if name not in self.tasks:
            raise SiftError(f"unknown task {name!r}; the manifest has {', '.join(self.tasks)}")
        return self.tasks[name]

    def renamed(self, names: dict[str, str]) -> "Manifest":
        """The same ensemble with every adapter called names[old]: in the adapter list, the
        tasks' weights and boosting steps, and the anchor."""
        return self.model_copy(update={
            "adapters": [a.model_copy(update={"name": names[a.name]}) for a in self.adapters],
            "anchor": None if self.anchor is None else names[self.anchor],
            "tasks": {t: e.model_copy(update={
                "weights": {names[n]: w for n, w in e.weights.items()},
                "boost": [b.model_copy(update={"adapter": names[b.adapter]}) for b in e.boost]})
                for t, e in self.tasks.items()}})

    def models(self, task: str) -> list[str | None]:
        """Every model whose label log-probabilities the task's prediction needs: the adapters
        with a weight, the boosting adapters and, when it boosts, the anchor (None: the bare base)."""
        entry = self.task(task)
        names: list[str | None] = [n for n, w in entry.weights.items() if w > 0]
        names += [b.adapter for b in entry.boost]
        if entry.boost:
            names.append(self.anchor)
        return list(dict.fromkeys(names))


class LoadedManifest(Manifest):
    """A manifest whose adapter paths were checked and made absolute."""

    folder: Path


def load(path: str | Path) -> LoadedManifest:
    """Read and check a manifest file (or the folder holding ensemble.json)."""
    file = Path(path)
    if file.is_dir():
        file = file / FILENAME
    if not file.is_file():
        raise SiftError(f"ensemble manifest not found: {file}")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise SiftError(f"{file} is not valid JSON (line {exc.lineno})") from None
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SiftError(f"{file}: invalid manifest: {where + ': ' if where else ''}{first['msg']}") from None
    folder = file.parent.resolve()
    adapters = []
    for entry in manifest.adapters:
        adapter_dir = (folder / entry.path).resolve()
        _check_adapter(adapter_dir, entry, manifest.max_lora_rank)
        adapters.append(entry.model_copy(update={"path": str(adapter_dir)}))
    return LoadedManifest(**{**manifest.model_dump(), "adapters": adapters}, folder=folder)


def _check_adapter(folder: Path, entry: AdapterEntry, max_rank: int) -> None:
    config_file = folder / "adapter_config.json"
    if not config_file.is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise SiftError(f"adapter {entry.name!r}: {folder} is not a PEFT adapter folder "
                        "(needs adapter_config.json and adapter_model.safetensors)")
    rank = json.loads(config_file.read_text()).get("r")
    if rank != entry.rank:
        raise SiftError(f"adapter {entry.name!r}: {folder} has rank {rank}, the manifest says {entry.rank}")
    if rank > max_rank:
        raise SiftError(f"adapter {entry.name!r} has rank {rank} > max_lora_rank {max_rank}")


def write(manifest: Manifest, folder: str | Path) -> Path:
    """Write ensemble.json into `folder`. Adapters inside the folder are written with paths
    relative to it (a loaded manifest holds absolute ones), so the folder can be moved, uploaded
    to object storage or downloaded elsewhere and still load."""
    file = Path(folder) / FILENAME
    file.parent.mkdir(parents=True, exist_ok=True)
    root = file.parent.resolve()
    adapters = [a.model_copy(update={"path": str(Path(a.path).resolve().relative_to(root))})
                if Path(a.path).is_absolute() and Path(a.path).resolve().is_relative_to(root) else a
                for a in manifest.adapters]
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest.model_copy(update={"adapters": adapters}).model_dump(
        mode="json", exclude={"folder"}), indent=2))
    tmp.replace(file)
    return file
