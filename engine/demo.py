"""`sift demo` (`make demo`): the built-in corpora through sift on the embedded Ray.

Today: corpora -> ingest (validation, quarantine) -> embeddings of a stratified sample (faiss
k-means and near-duplicates over them) -> GOT-D and baselines toward a held-out fortunes topic
-> projected LoRA gradients of labelled tweets. Later stages (train, serve) extend this run.
"""

from __future__ import annotations

import time

import numpy as np
import polars as pl

from engine import runtime
from engine.config import DemoConfig, EmbedConfig, GradsConfig, IngestConfig, SelectPoolConfig
from engine.data import corpora
from engine.data.ingest import ingest, read_examples, show
from engine.features import summary
from engine.features.embed import embed
from engine.features.grads import featurize_grads
from engine.index import kmeans, near_duplicates
from engine.report import table
from engine.select.pool import select_pool


def run(cfg: DemoConfig) -> None:
    started = time.perf_counter()
    info = runtime.start(cfg.runtime)
    print(f"Ray {info.mode} at {info.address}: {info.cpus:g} CPUs, {info.gpus:g} GPUs")

    inputs = [str(corpora.path(name)) for name in cfg.corpora]
    show(ingest(IngestConfig(inputs=inputs, out=cfg.out / "ingest", runtime=cfg.runtime)))
    examples = read_examples(cfg.out / "ingest")
    _corpora_table(examples)

    target = _target(examples, cfg)
    sample = _stratified(examples.join(target, on="id", how="anti"), cfg.sample_rows, cfg.seed)
    sample.write_parquet(cfg.out / "sample.parquet")
    store, stats = embed(EmbedConfig(data=cfg.out / "sample.parquet", out=cfg.out / "embeddings",
                                     runtime=cfg.runtime))
    summary.show(store, stats)
    _clusters_table(store, cfg.seed)
    if target.height:
        _selection(cfg, sample, target)

    tweets = examples.filter(pl.col("task") == "tweets")
    if tweets.height:
        tweets.sample(min(cfg.grad_rows, tweets.height), seed=cfg.seed).write_parquet(cfg.out / "tweets.parquet")
        store, stats = featurize_grads(GradsConfig(data=cfg.out / "tweets.parquet", out=cfg.out / "grads",
                                                   model=cfg.grad_model, runtime=cfg.runtime))
        summary.show(store, stats)
        _grads_table(store)
    print(f"demo finished in {time.perf_counter() - started:.1f} s; outputs in {cfg.out}")


def _target(examples: pl.DataFrame, cfg: DemoConfig) -> pl.DataFrame:
    """The demo's target: quotes of one fortunes topic, held out of the pool."""
    topic = examples.filter((pl.col("task") == "fortunes") & (pl.col("label") == cfg.target_topic))
    target = topic.sample(min(cfg.target_rows, topic.height // 2), seed=cfg.seed)
    target.write_parquet(cfg.out / "target.parquet")
    return target


def _selection(cfg: DemoConfig, sample: pl.DataFrame, target: pl.DataFrame) -> None:
    """GOT-D and its baselines on the same pool and target: how many picks are on-topic?"""
    on_topic = set(sample.filter((pl.col("task") == "fortunes") & (pl.col("label") == cfg.target_topic))["id"])
    base = dict(pool=str(cfg.out / "embeddings"), target=str(cfg.out / "target.parquet"),
                budget=cfg.select_budget, runtime=cfg.runtime, seed=cfg.seed)
    rows = []
    for method in ("gotd", "knn", "dsir", "random"):
        # reuse what the GOT-D run embedded; DSIR reads the texts instead
        inputs = {"pool": str(cfg.out / "sample.parquet")} if method == "dsir" else \
            {} if method == "gotd" else {"target": str(cfg.out / "select-gotd" / "target" / "embeddings")}
        out = cfg.out / f"select-{method}"
        report = select_pool(SelectPoolConfig(**{**base, **inputs, "method": method, "out": out}))
        chosen = pl.read_parquet(out / "selected.parquet")["id"]
        rows.append((method, report["budget"], int(chosen.is_in(on_topic).sum()),
                     round(chosen.is_in(on_topic).mean(), 3), report["seconds"]["scoring"]))
    table(f"select-pool: {cfg.select_budget} of {sample.height:,} rows toward {target.height} held-out "
          f"'{cfg.target_topic}' fortunes ({len(on_topic)} on-topic rows in the pool)",
          ["method", "selected", "on-topic", "precision", "scoring s"], rows)


def _corpora_table(examples: pl.DataFrame) -> None:
    per_task = examples.group_by("task").agg(
        rows=pl.len(),
        labels=pl.col("label").n_unique(),
        top_label=pl.col("label").mode().first(),
        median_chars=pl.col("text").str.len_chars().median().cast(pl.Int64),
    ).sort("task")
    table("Built-in corpora after ingest", ["corpus", "rows", "labels", "a most common label", "median chars"],
          per_task.rows())


def _stratified(examples: pl.DataFrame, rows: int, seed: int) -> pl.DataFrame:
    tasks = examples["task"].unique().sort().to_list()
    per_task = max(1, rows // max(len(tasks), 1))
    parts = [examples.filter(pl.col("task") == t) for t in tasks]
    return pl.concat([p.sample(min(per_task, p.height), seed=seed) for p in parts])


def _clusters_table(store, seed: int) -> None:
    """k-means over the embeddings, one cluster per corpus: do clusters recover the corpora?"""
    rows, vectors = store.rows(), np.asarray(store.vectors())
    tasks = rows["task"].to_list()
    k = len(set(tasks))
    _, assignment = kmeans(vectors, k, seed=seed, spherical=True)
    frame = pl.DataFrame({"cluster": assignment, "task": tasks})
    summary_rows = []
    for cluster, group in frame.group_by("cluster", maintain_order=True):
        counts = group["task"].value_counts().sort("count", descending=True)
        summary_rows.append((int(cluster[0]), group.height, counts["task"][0], round(counts["count"][0] / group.height, 2)))
    duplicates = int((near_duplicates(vectors, threshold=0.95) >= 0).sum())
    table(f"faiss k-means (k={k}) over MiniLM embeddings; {duplicates} near-duplicates at cosine >= 0.95",
          ["cluster", "rows", "main corpus", "share"], sorted(summary_rows))


def _grads_table(store) -> None:
    rows, vectors = store.rows(), np.asarray(store.vectors())
    per_label = rows.with_columns(norm=pl.Series(np.linalg.norm(vectors, axis=1))).group_by("label").agg(
        rows=pl.len(), mean_f=pl.col("f").mean(), mean_norm=pl.col("norm").mean()).sort("label")
    table("Anchor outputs f* and projected gradient norms per label", ["label", "rows", "mean f*", "mean |P^T g|"],
          per_label.rows())
