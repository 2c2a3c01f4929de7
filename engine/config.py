"""Typed configs, one per command, read from YAML and overridable from the command line.

Every config forbids unknown keys: a typo in a YAML file or a `--set` flag is an error that
names the key (and the closest valid one), never a silently ignored setting.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from engine.errors import SiftError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RuntimeConfig(StrictModel):
    """Where work runs. No address (and no RAY_ADDRESS) means an embedded local Ray."""

    address: str | None = None
    num_cpus: PositiveInt | None = Field(None, description="embedded Ray only; default: all cores")
    num_gpus: int | None = Field(None, ge=0, description="embedded Ray only; default: detected")


class SchemaConfig(StrictModel):
    """Which input columns hold the example fields; any other column is kept as metadata."""

    text: str = "text"
    id: str = "id"
    task: str = "task"
    label: str = "label"
    split: str = "split"


class IngestConfig(StrictModel):
    inputs: list[str] = Field(default_factory=list, description="files, folders or globs")
    out: Path | None = None
    columns: SchemaConfig = Field(default_factory=SchemaConfig)
    encoding: str = Field("utf-8", description="text encoding of jsonl/csv inputs")
    max_chars: PositiveInt = Field(20_000, description="longer texts are quarantined")
    labels: list[str] | None = Field(None, description="allowed labels; others are quarantined")
    force: bool = Field(False, description="redo even if OUT already holds this ingest")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


class DemoConfig(StrictModel):
    corpora: list[Literal["tweets", "chatterbot", "fortunes", "wordnet"]] = Field(
        default_factory=lambda: ["tweets", "chatterbot", "fortunes", "wordnet"]
    )
    out: Path = Path("runs/demo")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


C = TypeVar("C", bound=StrictModel)


def load_config(cls: type[C], path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Build a `cls` from an optional YAML file, then dotted-key overrides (`runtime.num_cpus`)."""
    data: dict[str, Any] = {}
    where = "command line"
    if path is not None:
        where = str(path)
        data = _read_yaml(Path(path))
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise SiftError(f"config error in {where}: {_describe(exc, cls)}") from None


def parse_set_flags(items: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs; values are parsed as YAML so `3`, `true`, `[a, b]` get their types."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SiftError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SiftError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise SiftError(f"config file {path} is not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SiftError(f"config file {path} must hold a mapping of keys, not a {type(data).__name__}")
    return data


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SiftError(f"config error: cannot set {key!r}: {part!r} is not a section")
    node[leaf] = value


def _describe(exc: ValidationError, cls: type[StrictModel]) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            hint = _closest(cls, err["loc"])
            parts.append(f"unknown key {loc!r}" + (f" (did you mean {hint!r}?)" if hint else ""))
        elif err["type"] == "missing":
            parts.append(f"missing key {loc!r}")
        else:
            parts.append(f"key {loc!r}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


def _closest(cls: type[StrictModel], loc: tuple) -> str | None:
    """The valid key nearest to a misspelt one, following nested sections."""
    model: Any = cls
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    match = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return ".".join([*map(str, loc[:-1]), match[0]]) if match else None
