"""`sift run pipeline.yaml` and `sift demo`: every stage of sift, one after the other.

ingest -> embed -> select-pool (GOT-D)  and  suite -> grads -> select-tasks -> group -> train ->
serve (a smoke query over HTTP). Each stage writes OUT/<stage>/ and a stage.json holding its
fingerprint: a hash of its own settings and of the fingerprints of the stages it reads. A rerun
skips every stage whose fingerprint matches; changing a setting reruns that stage and those
downstream. The end: one summary table and OUT/report.html (with the stages' PNGs).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl

from engine import runtime
from engine.config import (EmbedConfig, EnsembleTrainConfig, GradsConfig, GroupConfig, IngestConfig, PipelineConfig,
                           SelectPoolConfig, SelectTasksConfig, ServeConfig)
from engine.errors import SiftError
from engine.report import table

UPSTREAM = {"ingest": None, "embed": "ingest", "select-pool": "embed", "suite": None, "grads": "suite",
            "select-tasks": "grads", "group": "grads", "train": "group", "serve": "train"}


def run(cfg: PipelineConfig) -> list[dict]:
    started = time.perf_counter()
    out = Path(cfg.out).resolve()
    info = runtime.start(cfg.runtime)
    print(f"Ray {info.mode} at {info.address}: {info.cpus:g} CPUs, {info.gpus:g} GPUs; outputs in {out}")
    wanted = cfg.stages or list(UPSTREAM)
    fingerprints: dict[str, str] = {}
    results = []
    for stage, action in STAGES.items():
        upstream = UPSTREAM[stage]
        settings = {"stage": stage, "settings": _settings(stage, cfg), "upstream": fingerprints.get(upstream)}
        fingerprints[stage] = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        state = out / stage / "stage.json"
        previous = json.loads(state.read_text()) if state.is_file() else None
        if previous and previous["fingerprint"] == fingerprints[stage]:
            results.append({**previous, "status": "skipped (done)"})
        elif stage not in wanted:
            # Downstream stages depend on what is on disk: the fingerprint of its last run.
            fingerprints[stage] = previous["fingerprint"] if previous else None
            results.append({"stage": stage, "status": "not run", "seconds": 0.0, "result": ""})
            continue
        else:
            t = time.perf_counter()
            result = action(cfg, out)
            record = {"stage": stage, "fingerprint": fingerprints[stage], "seconds": round(time.perf_counter() - t, 1),
                      "result": result}
            state.parent.mkdir(parents=True, exist_ok=True)
            state.write_text(json.dumps(record, indent=2))
            results.append({**record, "status": "ran"})
        print(f"[{stage}] {results[-1]['status']}: {results[-1]['result']}", flush=True)
    total = time.perf_counter() - started
    table(f"Pipeline summary ({total:.0f} s)", ["stage", "status", "seconds", "result"],
          [(r["stage"], r["status"], f"{r['seconds']:.1f}", r["result"]) for r in results])
    _ensemble_table(out)
    report = _html(out, results, total)
    print(f"report: {report}")
    return results


# The settings each stage's output depends on (besides the stages upstream of it).
SETTINGS = {
    "ingest": ("pool", ["inputs", "corpora", "target", "target_topic", "target_rows", "sample_rows"]),
    "embed": ("pool", []),
    "select-pool": ("pool", ["budget", "method"]),
    "suite": ("tasks", ["data", "suite_tasks", "per_task"]),
    "grads": ("tasks", ["model", "lora", "dim", "max_length", "quantize"]),
    "select-tasks": ("tasks", ["target", "subsets"]),
    "group": ("tasks", ["groups"]),
    "train": ("tasks", ["epochs", "boost", "quantize"]),
    "serve": (None, ["serve_backend", "serve_queries"]),
}


def _settings(stage: str, cfg: PipelineConfig) -> dict:
    section, keys = SETTINGS[stage]
    values = (getattr(cfg, section) if section else cfg).model_dump(mode="json")
    return {"seed": cfg.seed, **{k: values[k] for k in keys}}


# --- the pool: unlabeled texts toward a target -------------------------------------------------

def _ingest(cfg: PipelineConfig, out: Path) -> str:
    from engine.data import corpora
    from engine.data.ingest import ingest, read_examples

    inputs = cfg.pool.inputs or [str(corpora.path(name)) for name in cfg.pool.corpora]
    summary = ingest(IngestConfig(inputs=inputs, out=out / "ingest", runtime=cfg.runtime))
    examples = read_examples(out / "ingest")
    target = _target(cfg, examples, out)
    pool = examples.join(target.select("id"), on="id", how="anti") if target is not None else examples
    if cfg.pool.sample_rows:
        pool = _stratified(pool, cfg.pool.sample_rows, cfg.seed)
    pool.write_parquet(out / "ingest" / "pool.parquet")
    return (f"{summary.rows_in:,} rows in, {summary.rows_out:,} kept, {summary.rows_quarantined:,} quarantined; "
            f"pool of {pool.height:,}")


def _target(cfg: PipelineConfig, examples: pl.DataFrame, out: Path) -> pl.DataFrame | None:
    """The built-in target: quotes of one fortunes topic, held out of the pool."""
    if cfg.pool.target is not None:
        return None
    topic = examples.filter((pl.col("task") == "fortunes") & (pl.col("label") == cfg.pool.target_topic))
    if topic.height < 2:
        raise SiftError(f"no fortunes topic {cfg.pool.target_topic!r} in the pool to build the target from; "
                        "set pool.target")
    target = topic.sample(min(cfg.pool.target_rows, topic.height // 2), seed=cfg.seed)
    target.write_parquet(out / "ingest" / "target.parquet")
    return target


def _stratified(examples: pl.DataFrame, rows: int, seed: int) -> pl.DataFrame:
    tasks = examples["task"].fill_null("").unique().sort().to_list()
    per_task = max(1, rows // max(len(tasks), 1))
    parts = [examples.filter(pl.col("task").fill_null("") == t) for t in tasks]
    return pl.concat([p.sample(min(per_task, p.height), seed=seed) for p in parts])


def _embed(cfg: PipelineConfig, out: Path) -> str:
    from engine.features.embed import embed

    import numpy as np

    from engine.index import near_duplicates

    store, stats = embed(EmbedConfig(data=out / "ingest" / "pool.parquet", out=out / "embed", runtime=cfg.runtime))
    duplicates = int((near_duplicates(np.asarray(store.vectors()), threshold=0.95) >= 0).sum())
    return (f"{store.rows().height:,} rows x {store.spec.dim} dims ({stats.rows:,} embedded now); "
            f"{duplicates} near-duplicates at cosine >= 0.95")


def _select_pool(cfg: PipelineConfig, out: Path) -> str:
    from engine.select.pool.select import select_pool

    target = cfg.pool.target or str(out / "ingest" / "target.parquet")
    report = select_pool(SelectPoolConfig(pool=str(out / "embed"), target=target, budget=cfg.pool.budget,
                                          method=cfg.pool.method, out=out / "select-pool", seed=cfg.seed,
                                          runtime=cfg.runtime))
    result = f"{report['budget']} of {report['counts']['scored']:,} selected by {cfg.pool.method}"
    if cfg.pool.target is None:
        chosen = pl.read_parquet(out / "select-pool" / "selected.parquet").join(
            pl.read_parquet(out / "ingest" / "pool.parquet"), on="id")
        on_topic = chosen.filter((pl.col("task") == "fortunes") & (pl.col("label") == cfg.pool.target_topic)).height
        result += f"; {on_topic} on the target topic '{cfg.pool.target_topic}'"
    return result


# --- the tasks: gradients, subset search, groups, the ensemble ------------------------------------

def _suite(cfg: PipelineConfig, out: Path) -> str:
    from engine.data import suite
    from engine.data.ingest import ingest

    if cfg.tasks.data is not None:
        inputs = [str(cfg.tasks.data)]
    else:
        (out / "suite").mkdir(parents=True, exist_ok=True)
        raw = out / "suite" / "suite.parquet"
        suite.build(cfg.tasks.per_task, 0.2, cfg.seed, cfg.tasks.suite_tasks, test=0.2).write_parquet(raw)
        inputs = [str(raw)]
    summary = ingest(IngestConfig(inputs=inputs, out=out / "suite", runtime=cfg.runtime))
    tasks = pl.read_parquet(out / "suite" / "examples.parquet")["task"].n_unique()
    return f"{summary.rows_out:,} labelled rows in {tasks} tasks"


def _grads(cfg: PipelineConfig, out: Path) -> str:
    from engine.features.grads import featurize_grads

    t = cfg.tasks
    store, stats = featurize_grads(GradsConfig(data=out / "suite", out=out / "grads", model=t.model, lora=t.lora,
                                               dim=t.dim, max_length=t.max_length, quantize=t.quantize,
                                               runtime=cfg.runtime))
    return f"{store.rows().height:,} projected gradients of {t.model}, d = {store.spec.dim}"


def _select_tasks(cfg: PipelineConfig, out: Path) -> str:
    from engine.select.tasks.select import select_tasks

    report = select_tasks(SelectTasksConfig(data=out / "suite", grads=out / "grads", target=cfg.tasks.target,
                                            out=out / "select-tasks", subsets=cfg.tasks.subsets, seed=cfg.seed,
                                            runtime=cfg.runtime))
    return f"for {', '.join(cfg.tasks.target)}: {', '.join(report['selected']) or 'no other task'}"


def _group(cfg: PipelineConfig, out: Path) -> str:
    from engine.ensemble.group import group_tasks

    report = group_tasks(GroupConfig(data=out / "suite", grads=out / "grads", out=out / "group",
                                     groups=cfg.tasks.groups, seed=cfg.seed, runtime=cfg.runtime))
    return " | ".join(", ".join(g) for g in report["groups"])


def _train(cfg: PipelineConfig, out: Path) -> str:
    from engine.train.ensemble import train_ensemble

    t = cfg.tasks
    report = train_ensemble(EnsembleTrainConfig(groups=out / "group", out=out / "train", epochs=t.epochs,
                                                boost=t.boost, quantize=t.quantize, seed=cfg.seed, runtime=cfg.runtime))
    split = "test" if "test" in report else "validation"
    avg = report[split]["average"]
    return f"{len(report['groups'])} adapters; {split} accuracy {avg['accuracy']:.3f}, macro-F1 {avg['macro_f1']:.3f}"


def _serve(cfg: PipelineConfig, out: Path) -> str:
    """Start the server, classify some test rows over HTTP, stop it."""
    from ray import serve as ray_serve

    from engine.ensemble import manifest as manifest_io
    from engine.ensemble.evaluate import read_split
    from engine.serve.app import serve
    from engine.serve.client import free_port, post

    loaded = manifest_io.load(out / "train")
    rows, split = read_split(out / "suite", list(loaded.tasks), None)
    rows = rows.sample(min(cfg.serve_queries, rows.height), seed=cfg.seed)
    url = serve(ServeConfig(manifest=out / "train", backend=cfg.serve_backend, port=free_port(),
                            runtime=cfg.runtime), block=False)
    answers, latencies = [], []
    try:
        for row in rows.iter_rows(named=True):
            t = time.perf_counter()
            status, body = post(url, "/v1/classify", {"task": row["task"], "text": row["text"]})
            latencies.append(time.perf_counter() - t)
            if status != 200:
                raise SiftError(f"the served ensemble answered {status}: {body.get('error', body)}")
            answers.append(body)
    finally:
        ray_serve.shutdown()
    (out / "serve").mkdir(parents=True, exist_ok=True)
    (out / "serve" / "answers.json").write_text(json.dumps(answers, indent=2))
    correct = sum(_answer(a) == row["label"] for a, row in zip(answers, rows.iter_rows(named=True)))
    latencies.sort()
    return (f"{len(answers)} {split} rows classified over HTTP ({cfg.serve_backend}): {correct} correct, "
            f"median {1000 * latencies[len(latencies) // 2]:.0f} ms")


def _answer(response: dict) -> str:
    return response["results"][0]["answer"]


STAGES: dict[str, Callable[[PipelineConfig, Path], str]] = {
    "ingest": _ingest, "embed": _embed, "select-pool": _select_pool, "suite": _suite, "grads": _grads,
    "select-tasks": _select_tasks, "group": _group, "train": _train, "serve": _serve,
}


# --- the end: tables and report.html --------------------------------------------------------------

def _ensemble_table(out: Path) -> None:
    from engine.ensemble.evaluate import show

    file = out / "train" / "report.json"
    if file.is_file():
        report = json.loads(file.read_text())
        split = "test" if "test" in report else "validation"
        show({"split": split, **report[split]}, title="Adapter ensemble")


def _html(out: Path, results: list[dict], seconds: float) -> Path:
    import base64
    import html

    rows = "".join(f"<tr><td>{r['stage']}</td><td>{r['status']}</td><td>{r['seconds']:.1f}</td>"
                   f"<td>{html.escape(str(r['result']))}</td></tr>" for r in results)
    images = ""
    for title, png in [("GOT-D scores and selection", out / "select-pool" / "report.png"),
                       ("Tasks that help the target", out / "select-tasks" / "report.png"),
                       ("Task affinity and groups", out / "group" / "affinity.png")]:
        if png.is_file():
            data = base64.b64encode(png.read_bytes()).decode()
            images += f"<h2>{title}</h2><img src='data:image/png;base64,{data}' style='max-width:100%'>"
    page = (f"<html><head><meta charset='utf-8'><title>sift pipeline</title></head><body style='font-family:sans-serif'>"
            f"<h1>sift pipeline ({seconds:.0f} s)</h1><table border='1' cellpadding='4' style='border-collapse:collapse'>"
            f"<tr><th>stage</th><th>status</th><th>seconds</th><th>result</th></tr>{rows}</table>{images}</body></html>")
    path = out / "report.html"
    path.write_text(page)
    return path
