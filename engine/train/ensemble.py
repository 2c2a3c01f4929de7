"""`sift train`: the adapter ensemble of a grouping (docs/ALGORITHMS.md section 3, steps 5-7).

One LoRA (QLoRA with --qlora: the same code on a 4-bit base) per group, each a `train-lora` run
with Ray Train, as many groups at once as the cluster's CPUs allow for their workers. Every
adapter starts from the gradient store's anchor LoRA (same spec and seed), so a boosting adapter
theta_init + P w lives in the same space. Then, per task, mixture weights over all adapters are
fitted on the validation rows; optional boosting rounds add residual adapters while the
validation NLL improves. Outputs: adapters/<name>/ (PEFT safetensors), ensemble.json, report.json.
A rerun skips the groups already trained.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from engine import runtime
from engine.config import EnsembleTrainConfig, GradsConfig, LoraTrainConfig
from engine.data.ingest import examples_path
from engine.ensemble import boost, evaluate, flops, manifest as manifest_io, weights as mixture_weights
from engine.ensemble.model import EnsembleModel
from engine.errors import SiftError
from engine.models.anchor import Anchor
from engine.train.lora import train_lora


@ray.remote(num_cpus=0)  # a driver of one Ray Train run; its workers hold the CPUs
def _train_group(config: dict) -> dict:
    return train_lora(LoraTrainConfig.model_validate(config))


def _plan(cfg: EnsembleTrainConfig) -> tuple[list[list[str]], Path, Path]:
    """The groups, data and gradient store, from groups.json and/or the config."""
    partition, data, grads = cfg.partition, cfg.data, cfg.grads
    if cfg.groups is not None:
        file = Path(cfg.groups) / "groups.json"
        if not file.is_file():
            raise SiftError(f"{cfg.groups}: no groups.json (the output of `sift group`)")
        report = json.loads(file.read_text())
        partition = partition or report["groups"]
        data, grads = data or Path(report["data"]), grads or Path(report["grads"])
    if not partition or data is None or grads is None:
        raise SiftError("train needs --groups DIR (or a partition with data and grads) and --out")
    return partition, Path(data).resolve(), Path(grads).resolve()


def _check(partition: list[list[str]], frame: pl.DataFrame) -> None:
    grouped = [t for g in partition for t in g]
    if any(not g for g in partition):
        raise SiftError("a group holds no task")
    repeated = sorted({t for t in grouped if grouped.count(t) > 1})
    if repeated:
        raise SiftError(f"task(s) {repeated} are in more than one group")
    present = set(frame["task"].drop_nulls())
    unknown = sorted(set(grouped) - present)
    if unknown:
        raise SiftError(f"task(s) {unknown} of the groups are not in the data")
    ungrouped = sorted(present - set(grouped))
    if ungrouped:
        raise SiftError(f"task(s) {ungrouped} are in no group")
    train = frame.filter(pl.col("split") == "train")
    for k, group in enumerate(partition):
        if not train.filter(pl.col("task").is_in(group)).height:
            raise SiftError(f"group {k} ({', '.join(group)}) has no training rows")
    validation = frame.filter(pl.col("split") == "validation")
    for task in grouped:
        rows = validation.filter(pl.col("task") == task)
        if not rows.height:
            raise SiftError(f"task {task!r} has no validation rows: the ensemble's weights are fitted on them")
        if frame.filter(pl.col("task") == task)["label"].n_unique() < 2:
            raise SiftError(f"task {task!r} has fewer than two labels: nothing to classify")


def train_ensemble(cfg: EnsembleTrainConfig) -> dict:
    if cfg.out is None:
        raise SiftError("train needs --out DIR")
    started = time.perf_counter()
    partition, data, grads = _plan(cfg)
    anchor_file = grads / "config.json"
    if not anchor_file.is_file():
        raise SiftError(f"{grads}: no config.json; rebuild the gradient store with `sift featurize grads`")
    anchor_cfg = GradsConfig.model_validate_json(anchor_file.read_text())
    frame = pl.read_parquet(examples_path(data)).with_columns(pl.col("split").fill_null("train"))
    _check(partition, frame)
    out = Path(cfg.out).resolve()
    info = runtime.start(cfg.runtime)

    names = [f"group-{k}" for k in range(len(partition))]
    trained = _train_groups(cfg, anchor_cfg, data, partition, names, out, int(info.cpus))
    labels = {t: sorted(frame.filter(pl.col("task") == t)["label"].drop_nulls().unique().to_list())
              for g in partition for t in g}
    rank = _rank(out / "adapters" / names[0])
    entries = [manifest_io.AdapterEntry(name=n, path=f"adapters/{n}", kind="group", tasks=g, rank=rank)
               for n, g in zip(names, partition)]
    own = {t: n for n, g in zip(names, partition) for t in g}
    manifest = manifest_io.Manifest(
        base_model=anchor_cfg.model, quantize=cfg.quantize, prompt=anchor_cfg.prompt, answer=anchor_cfg.answer,
        max_length=anchor_cfg.max_length, max_lora_rank=rank, adapters=entries,
        tasks={t: manifest_io.TaskEntry(labels=labels[t], weights={own[t]: 1.0}) for t in own})
    manifest_io.write(manifest, out)

    validation = frame.filter(pl.col("split") == "validation")
    ensemble = EnsembleModel.load(manifest_io.load(out))
    scores = evaluate.score_rows(ensemble, validation)
    manifest = _fit_weights(manifest, scores)
    boosting = []
    if cfg.boost:
        manifest, boosting = _boost(cfg, ensemble, manifest, anchor_cfg, grads, frame, scores, out)
    manifest = manifest_io.load(manifest_io.write(manifest, out))
    ensemble.update(manifest)
    results = {"validation": evaluate.report(ensemble, scores)}
    test = frame.filter((pl.col("split") == "test") & pl.col("task").is_in(list(own)))
    if test.height:
        results["test"] = evaluate.report(ensemble, evaluate.score_rows(ensemble, test))
    stage_flops = _flops(ensemble, frame, grads, partition, trained, cfg.groups and Path(cfg.groups),
                         [b for b in boosting if b["accepted"]])
    final = manifest.model_copy(update={
        "metrics": {split: r["average"] for split, r in results.items()}, "flops": stage_flops})
    manifest_io.write(final, out)
    report = {"groups": dict(zip(names, partition)), "training": {n: t["best"] for n, t in zip(names, trained)},
              "weights": {t: e.weights for t, e in final.tasks.items()}, "boosting": boosting,
              **results, "flops": stage_flops, "seconds": round(time.perf_counter() - started, 3),
              "config": cfg.model_dump(mode="json")}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _train_groups(cfg: EnsembleTrainConfig, anchor_cfg: GradsConfig, data: Path, partition: list[list[str]],
                  names: list[str], out: Path, cpus: int) -> list[dict]:
    """Every group's train-lora run, as many at once as there are CPUs for their workers."""
    configs = [LoraTrainConfig(
        data=data, out=out / "runs" / name, model=anchor_cfg.model, adapter=anchor_cfg.adapter, tasks=group,
        lora=anchor_cfg.lora,
        quantize=cfg.quantize, prompt=anchor_cfg.prompt, answer=anchor_cfg.answer, max_length=anchor_cfg.max_length,
        epochs=cfg.epochs, steps_per_epoch=cfg.steps_per_epoch, batch_size=cfg.batch_size, lr=cfg.lr,
        workers=cfg.workers, gpus_per_worker=cfg.gpus_per_worker, trust_remote_code=anchor_cfg.trust_remote_code, seed=cfg.seed, runtime=cfg.runtime,
    ).model_dump(mode="json") for name, group in zip(names, partition)]
    slots = max(1, cpus // cfg.workers)  # on GPUs Ray queues the worker groups until GPUs free up
    # The run's driver stays on this node: the adapters it reports are copied from local disk.
    here = _train_group.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False))
    pending, running, results = list(enumerate(configs)), {}, {}
    while pending or running:
        while pending and len(running) < slots:
            k, config = pending.pop(0)
            running[here.remote(config)] = k
        done, _ = ray.wait(list(running), num_returns=1)
        for ref in done:
            try:
                results[running.pop(ref)] = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, SiftError) else None
                raise SiftError(str(cause) if cause else f"training a group failed: {str(exc).splitlines()[0]}") from None
    for name, k in zip(names, range(len(configs))):
        target = out / "adapters" / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(results[k]["adapter"], target)
    return [results[k] for k in range(len(configs))]


def _rank(adapter: Path) -> int:
    return int(json.loads((adapter / "adapter_config.json").read_text())["r"])


def _fit_weights(manifest: manifest_io.Manifest, scores: dict[str, evaluate.TaskScores]) -> manifest_io.Manifest:
    """Per task, EM mixture weights over every adapter on the validation rows."""
    names = [a.name for a in manifest.adapters]
    tasks = {}
    for task, entry in manifest.tasks.items():
        w = mixture_weights.fit(np.stack([scores[task].gold_prob(n) for n in names]))
        tasks[task] = entry.model_copy(update={"weights": {n: float(v) for n, v in zip(names, w) if v > 0}})
    return manifest.model_copy(update={"tasks": tasks})


def _validation_nll(manifest: manifest_io.Manifest, scores: dict[str, evaluate.TaskScores]) -> float:
    values = []
    for task, entry in manifest.tasks.items():
        values.append(-np.log(np.clip(scores[task].mixed_gold_prob(entry.weights), 1e-12, None)).mean())
    return float(np.mean(values))


def _boost(cfg: EnsembleTrainConfig, ensemble: EnsembleModel, manifest: manifest_io.Manifest,
           anchor_cfg: GradsConfig, grads: Path, frame: pl.DataFrame, val_scores: dict[str, evaluate.TaskScores],
           out: Path) -> tuple[manifest_io.Manifest, list[dict]]:
    """Residual adapters added while the validation NLL improves: the final manifest (its
    validation scores are filled into `val_scores`; `ensemble` holds its adapters and maybe the
    last, rejected one) and a record of every round tried."""
    tasks = list(manifest.tasks)
    train = frame.filter((pl.col("split") == "train") & pl.col("task").is_in(tasks))
    validation = frame.filter((pl.col("split") == "validation") & pl.col("task").is_in(tasks))
    G, f = boost.gradients_of(grads, train["id"].to_list())
    anchor = Anchor(grads)
    train_scores = evaluate.score_rows(ensemble, train)
    current = _validation_nll(manifest, val_scores)
    rounds = []
    for k in range(1, cfg.boost + 1):
        residual = np.empty(train.height)
        for task, entry in manifest.tasks.items():
            residual[(train["task"] == task).to_numpy()] = 1.0 - train_scores[task].mixed_gold_prob(entry.weights)
        name = f"boost-{k}"
        folder = out / "adapters" / name
        size = boost.save_adapter(anchor, boost.residual_w(G, f, torch.as_tensor(residual), cfg.boost_alpha), folder)
        entry = manifest_io.AdapterEntry(name=name, path=f"adapters/{name}", kind="boost", tasks=tasks,
                                         rank=_rank(folder))
        mixed = {t: e.model_copy(update={"weights": {**{n: v * (1 - cfg.boost_weight) for n, v in e.weights.items()},
                                                     name: cfg.boost_weight}}) for t, e in manifest.tasks.items()}
        candidate = manifest.model_copy(update={"adapters": [*manifest.adapters, entry], "tasks": mixed})
        ensemble.update(manifest_io.load(manifest_io.write(candidate, out)))
        for task, s in evaluate.score_rows(ensemble, validation, adapters=[name]).items():
            val_scores[task].probs[name] = s.probs[name]
        nll = _validation_nll(candidate, val_scores)
        rounds.append({"round": k, "validation_nll": nll, "before": current, "accepted": nll < current,
                       "update_norm": size})
        if nll >= current:
            shutil.rmtree(folder)
            manifest_io.write(manifest, out)
            break
        for task, s in evaluate.score_rows(ensemble, train, adapters=[name]).items():
            train_scores[task].probs[name] = s.probs[name]
        manifest, current = candidate, nll
    return manifest, rounds


def _flops(ensemble: EnsembleModel, frame: pl.DataFrame, grads: Path, partition: list[list[str]],
           trained: list[dict], groups_dir: Path | None, boosting: list[dict]) -> dict[str, float]:
    """FLOPs per stage (engine/ensemble/flops.py has the formulas)."""
    from engine.features.store import FeatureStore

    # Base weights only; a 4-bit Params4bit stores two weights per element.
    params = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)
                 for n, p in ensemble.model.get_base_model().named_parameters() if "lora_" not in n)
    sample = frame["text"].head(500).to_list()
    tokens = float(np.mean([len(ensemble.tokenizer(t)["input_ids"]) for t in sample])) + 2  # prompt + answer
    train = frame.filter(pl.col("split") == "train")
    examples = 0
    for group, run in zip(partition, trained):
        c = run["config"]
        rows = train.filter(pl.col("task").is_in(group)).height
        steps = c["steps_per_epoch"] or max(1, rows // (c["batch_size"] * run["workers"]))
        examples += len(run["history"]) * steps * c["batch_size"] * run["workers"]
    estimator = 0.0
    if groups_dir is not None:
        info = json.loads((groups_dir / "groups.json").read_text())["estimator"]
        estimator = flops.estimator_fits(info["affinity_fits"] + info["search_fits"], info["rows"], info["dim"])
    rounds = len(boosting)
    weighted = np.mean([sum(1 for w in e.weights.values() if w > 0) for e in ensemble.manifest.tasks.values()])
    store = FeatureStore(grads)
    return {"gradient_pass": flops.train(params, tokens) * store.rows().height,
            "estimator": estimator,
            "training": flops.train(params, tokens) * examples,
            "boosting": rounds * (flops.forward(params, tokens) * frame.height + flops.ridge(train.height, store.spec.dim)),
            "inference_per_query": flops.forward(params, tokens) * float(weighted),
            "adapters_per_query": float(weighted)}
