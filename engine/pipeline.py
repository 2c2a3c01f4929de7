"""`sift run pipeline.yaml` and `sift demo`: a list of steps, each a registered stage with that
command's own config, run in order through the executor.

Steps name each other's outputs: a path setting whose value is an earlier step's name (or starts
with `name/`) means that step's output, and a step writes to OUT/<name> unless its config says
otherwise. Fingerprints chain through the outputs themselves (an input that is a finished
stage's output contributes its marker's fingerprint), so changing a setting reruns that step and
the steps that read it, and a step left out with `--only` passes on what it left on disk.
The end: one summary table, the ensemble's table, OUT/report.html with the steps' plots.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine import executor, runtime, storage
from engine.config import PipelineConfig, describe, read_yaml, set_dotted
from engine.errors import SiftError
from engine.report import table

DEMO = str(Path(__file__).resolve().parent.parent / "configs" / "pipeline.yaml")


def load(path: str, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """A pipeline file with `--set` overrides: `out`, `only` and `runtime.*` set the pipeline;
    `STEP.key=value` sets a key of that step's config (e.g. `train.epochs=2`)."""
    data = read_yaml(Path(path))
    names = [step.get("name") or step.get("stage") for step in data.get("steps") or [] if isinstance(step, dict)]
    for key, value in (overrides or {}).items():
        head, _, rest = key.partition(".")
        if head in names and rest:
            set_dotted(data["steps"][names.index(head)].setdefault("config", {}), rest, value)
        else:
            set_dotted(data, key, value)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise SiftError(f"config error in {path}: {describe(exc, PipelineConfig)}") from None


def run(cfg: PipelineConfig, force: bool = False) -> list[executor.Outcome]:
    from engine.stages import STAGES

    started = time.perf_counter()
    steps = _resolve(cfg, STAGES)  # every step's config checked before Ray starts: errors in a second
    unknown = sorted(set(cfg.only or []) - {name for name, _, _ in steps})
    if unknown:
        raise SiftError(f"--only names no step of this pipeline: {', '.join(unknown)}")
    info = runtime.start(cfg.runtime)
    print(f"Ray {info.mode} at {info.address}: {info.cpus:g} CPUs, {info.gpus:g} GPUs; outputs in {cfg.out}")
    outcomes: list[tuple[str, executor.Outcome | None]] = []
    for name, stage, stage_cfg in steps:
        if cfg.only and name not in cfg.only:
            outcomes.append((name, None))
            continue
        outcome = executor.run(stage, stage_cfg, force=force)
        print(f"[{name}] {outcome.status}: {outcome.result.line()}", flush=True)
        outcomes.append((name, outcome))
    total = time.perf_counter() - started
    rows = [(name, o.status if o else "not run", f"{o.seconds:.1f}" if o else "", o.result.line() if o else "")
            for name, o in outcomes]
    table(f"Pipeline summary ({total:.0f} s)", ["step", "status", "seconds", "result"], rows)
    for name, o in outcomes:
        if o is not None and o.stage == "train":
            from engine.stages.train import show_ensemble

            show_ensemble(o.result)
    report = _html(cfg, steps, rows, total)
    print(f"report: {report}")
    return [o for _, o in outcomes if o is not None]


def _resolve(cfg: PipelineConfig, stages) -> list[tuple[str, Any, Any]]:
    """Each step as (name, stage, its validated config), earlier steps' names resolved to their outputs."""
    outputs: dict[str, str] = {}
    resolved = []
    for step in cfg.steps:
        name = step.name or step.stage
        if step.stage not in stages:
            raise SiftError(f"pipeline step {name!r}: unknown stage {step.stage!r} (stages: {', '.join(stages)})")
        if name in outputs:
            raise SiftError(f"pipeline step name {name!r} is used twice; give one of them a `name`")
        stage = stages[step.stage]
        config = dict(step.config)
        for field in (*stage.inputs, *stage.worker_inputs):
            if field in config:
                value = config[field]
                config[field] = [_output_of(v, outputs) for v in value] if isinstance(value, list) \
                    else _output_of(value, outputs)
        if stage.output:
            config.setdefault(stage.output, storage.join(cfg.out, name))
            outputs[name] = config[stage.output]
        if "runtime" in stage.config.model_fields:
            config.setdefault("runtime", cfg.runtime.model_dump())
        try:
            resolved.append((name, stage, stage.config.model_validate(config)))
        except ValidationError as exc:
            raise SiftError(f"config error in pipeline step {name!r}: {describe(exc, stage.config)}") from None
    return resolved


def _output_of(value: Any, outputs: dict[str, str]) -> Any:
    if not isinstance(value, str):
        return value
    head, sep, rest = value.partition("/")
    if head in outputs:
        return storage.join(outputs[head], rest) if sep else outputs[head]
    return value


def _html(cfg: PipelineConfig, steps, rows, seconds: float) -> str:
    """OUT/report.html: the summary table and every plot the steps wrote at the top of their output."""
    import base64
    import html

    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    images = ""
    for name, stage, stage_cfg in steps:
        out = getattr(stage_cfg, stage.output) if stage.output else None
        if out is None or not storage.exists(out):
            continue
        for png in sorted(f for f in storage.list_files(out, recursive=False) if f.endswith(".png")):
            data = base64.b64encode(storage.read_bytes(png)).decode()
            images += f"<h2>{html.escape(name)}: {html.escape(png.rsplit('/', 1)[-1])}</h2>" \
                      f"<img src='data:image/png;base64,{data}' style='max-width:100%'>"
    page = (f"<html><head><meta charset='utf-8'><title>sift pipeline</title></head><body style='font-family:sans-serif'>"
            f"<h1>sift pipeline ({seconds:.0f} s)</h1><table border='1' cellpadding='4' style='border-collapse:collapse'>"
            f"<tr><th>step</th><th>status</th><th>seconds</th><th>result</th></tr>{cells}</table>{images}</body></html>")
    path = storage.join(cfg.out, "report.html")
    storage.write_text(path, page)
    return path
