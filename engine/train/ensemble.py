"""`sift train`: the adapter ensemble of a grouping (docs/ALGORITHMS.md section 3, steps 5-7).

One LoRA (QLoRA with --qlora: the same code on a 4-bit base) per group, each a `train-lora` run
with Ray Train, as many groups at once as the cluster's CPUs allow for their workers. Every
adapter starts from the gradient store's anchor LoRA (same spec and seed), so a boosting adapter
theta_init + P w lives in the same space. By default the adapters minimise the cross-entropy of
the gold label among each task's labels (`objective: labels`, engine/features/objective.py): the
class probability the ensemble is scored by; plain CE on the answer tokens spent the demo's few
CPU steps on the answer format and left adapters worse than the base model (issue 14, defect
6). Then, per task, mixture weights over the group
adapters are fitted on the validation rows; optional boosting rounds (engine/ensemble/boost.py)
add residual adapters in label-logit space, each kept only if it lowers both the training
residual and the validation NLL. Outputs: adapters/<name>/ (PEFT safetensors), ensemble.json,
report.json, predictions-test.parquet (the ensemble's label for every test row). A rerun skips
the groups already trained.
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

from engine import runtime, storage
from engine.config import EnsembleTrainConfig, GradsConfig, LoraTrainConfig
from engine.data.ingest import examples_path
from engine.data.schema import label_sets
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
    frame = storage.read_parquet(examples_path(data)).with_columns(pl.col("split").fill_null("train"))
    _check(partition, frame)
    out = Path(cfg.out).resolve()
    info = runtime.start(cfg.runtime)

    all_names = [f"group-{k}" for k in range(len(partition))]
    trained, failed = _train_groups(cfg, anchor_cfg, data, partition, all_names, out, int(info.cpus))
    sets = label_sets(frame)
    labels = {t: sets.get(t, []) for g in partition for t in g}
    # A group whose training failed (after its retries) has no adapter; its tasks stay in the
    # ensemble, served by the other groups' adapters with weights fitted like every task's.
    names = [n for n in all_names if n in trained]
    groups = {n: g for n, g in zip(all_names, partition)}
    rank = _rank(out / "adapters" / names[0])
    entries = [manifest_io.AdapterEntry(name=n, path=f"adapters/{n}", kind="group", tasks=groups[n], rank=rank)
               for n in names]
    anchor = None
    if cfg.boost and anchor_cfg.adapter is not None:  # boosting adapters are measured against it
        anchor = "anchor"
        shutil.rmtree(out / "adapters" / anchor, ignore_errors=True)
        shutil.copytree(anchor_cfg.adapter, out / "adapters" / anchor)
        entries.append(manifest_io.AdapterEntry(name=anchor, path=f"adapters/{anchor}", kind="anchor",
                                                tasks=sorted(labels), rank=_rank(out / "adapters" / anchor)))
    own = {t: n for n in names for t in groups[n]}
    initial = {t: {own[t]: 1.0} if t in own else {n: 1.0 / len(names) for n in names} for t in labels}
    manifest = manifest_io.Manifest(
        base_model=anchor_cfg.model, quantize=cfg.quantize, prompt=anchor_cfg.prompt, answer=anchor_cfg.answer,
        max_length=anchor_cfg.max_length, max_lora_rank=max(e.rank for e in entries), adapters=entries,
        anchor=anchor, tasks={t: manifest_io.TaskEntry(labels=labels[t], weights=w) for t, w in initial.items()})
    manifest_io.write(manifest, out)

    validation = frame.filter((pl.col("split") == "validation") & pl.col("task").is_in(list(labels)))
    ensemble = EnsembleModel.load(manifest_io.load(out))
    scores = evaluate.score_rows(ensemble, validation)
    manifest = _fit_weights(manifest, scores)
    boosting = []
    if cfg.boost:
        manifest, boosting = _boost(cfg, ensemble, manifest, grads, frame, scores, out)
    manifest = manifest_io.load(manifest_io.write(manifest, out))
    ensemble.update(manifest)
    results = {"validation": evaluate.report(ensemble, scores)}
    test = frame.filter((pl.col("split") == "test") & pl.col("task").is_in(list(labels)))
    if test.height:
        test_scores = evaluate.score_rows(ensemble, test)
        results["test"] = evaluate.report(ensemble, test_scores)
        evaluate.predictions(ensemble, test, test_scores).write_parquet(out / "predictions-test.parquet")
    stage_flops = _flops(ensemble, frame, grads, [groups[n] for n in names], [trained[n] for n in names],
                         cfg.groups and Path(cfg.groups), boosting)
    final = manifest.model_copy(update={
        "metrics": {split: r["average"] for split, r in results.items()}, "flops": stage_flops})
    manifest_io.write(final, out)
    report = {"groups": {n: groups[n] for n in names}, "training": {n: trained[n]["best"] for n in names},
              "failed_groups": {n: {"tasks": groups[n], "error": e} for n, e in failed.items()},
              "weights": {t: e.weights for t, e in final.tasks.items()}, "boosting": boosting,
              **results, "flops": stage_flops, "seconds": round(time.perf_counter() - started, 3),
              "config": cfg.model_dump(mode="json")}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _train_groups(cfg: EnsembleTrainConfig, anchor_cfg: GradsConfig, data: Path, partition: list[list[str]],
                  names: list[str], out: Path, cpus: int) -> tuple[dict[str, dict], dict[str, str]]:
    """Every group's train-lora run, as many at once as there are CPUs for their workers: the
    reports of the groups trained, by name, and the error of each group whose training failed
    (Ray Train retried it `runtime.max_failures` times first). One failed group does not stop
    the others; all of them failing is an error."""
    configs = [LoraTrainConfig(
        data=data, out=out / "runs" / name, model=anchor_cfg.model, adapter=anchor_cfg.adapter, tasks=group,
        lora=anchor_cfg.lora,
        quantize=cfg.quantize, objective=cfg.objective, prompt=anchor_cfg.prompt, answer=anchor_cfg.answer,
        max_length=anchor_cfg.max_length,
        epochs=cfg.epochs, steps_per_epoch=cfg.steps_per_epoch, batch_size=cfg.batch_size, lr=cfg.lr,
        workers=cfg.workers, gpus_per_worker=cfg.gpus_per_worker, trust_remote_code=anchor_cfg.trust_remote_code, seed=cfg.seed, runtime=cfg.runtime,
    ).model_dump(mode="json") for name, group in zip(names, partition)]
    slots = max(1, cpus // cfg.workers)  # on GPUs Ray queues the worker groups until GPUs free up
    # Each run's driver task must stay on this node (its Ray Train workers, which hold the CPUs
    # and GPUs, still go anywhere). It reads and writes this node's disk only:
    # - its run folder, `out/runs/<group>`: train.json, by which a rerun skips a finished group,
    #   and the best adapter, copied below. For an OUT on object storage, `out` is the executor's
    #   local work folder, uploaded by this process after the stage: written from another node,
    #   the run would be lost (and every group retrained on a rerun);
    # - its inputs: `data` (and `grads`) are local paths here, the executor's cached copies of
    #   URIs on this node (groups.json records such paths too), and train_lora reads the rows.
    # Unpinned, it would need its rows passed in and its folder passed back through the object
    # store; it holds no CPU or GPU (num_cpus=0), so the pin costs the cluster no capacity.
    here = _train_group.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False))
    pending, running, results, failed = list(zip(names, configs)), {}, {}, {}
    while pending or running:
        while pending and len(running) < slots:
            name, config = pending.pop(0)
            running[here.remote(config)] = name
        done, _ = ray.wait(list(running), num_returns=1)
        for ref in done:
            name = running.pop(ref)
            try:
                results[name] = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the task's error, or its node lost
                cause = getattr(exc, "cause", None)
                failed[name] = str(cause) if isinstance(cause, SiftError) else str(exc).strip().splitlines()[0][:300]
    if not results:
        raise SiftError("training failed for every group: " + "; ".join(f"{n}: {e}" for n, e in failed.items()))
    for name in results:
        target = out / "adapters" / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(results[name]["adapter"], target)
    return results, failed


def _rank(adapter: Path) -> int:
    return int(json.loads((adapter / "adapter_config.json").read_text())["r"])


def _fit_weights(manifest: manifest_io.Manifest, scores: dict[str, evaluate.TaskScores]) -> manifest_io.Manifest:
    """Per task, EM mixture weights over the group adapters on the validation rows."""
    names = [a.name for a in manifest.adapters if a.kind == "group"]
    tasks = {}
    for task, entry in manifest.tasks.items():
        w = mixture_weights.fit(np.stack([scores[task].gold_prob(n) for n in names]))
        tasks[task] = entry.model_copy(update={"weights": {n: float(v) for n, v in zip(names, w) if v > 0}})
    return manifest.model_copy(update={"tasks": tasks})


def _validation_nll(manifest: manifest_io.Manifest, scores: dict[str, evaluate.TaskScores]) -> float:
    """The mean over tasks of the ensemble's NLL (every task counts once)."""
    return float(np.mean([scores[task].nll(manifest, task) for task in manifest.tasks]))


def _residuals(manifest: manifest_io.Manifest, scores: dict[str, evaluate.TaskScores], rows: pl.DataFrame) -> np.ndarray:
    """r = 1 - p_ensemble(gold) of every row, in the order of `rows`."""
    residual = np.empty(rows.height)
    for task in manifest.tasks:
        s = scores[task]
        residual[(rows["task"] == task).to_numpy()] = 1.0 - s.combined(manifest, task)[np.arange(len(s.gold)), s.gold]
    return residual


def _stepped(manifest: manifest_io.Manifest, name: str, nu: float) -> manifest_io.Manifest:
    """`manifest` with boosting adapter `name` added to every task with step nu (none: nu = 0)."""
    if nu <= 0:
        return manifest
    step = manifest_io.BoostStep(adapter=name, step=nu)
    return manifest.model_copy(update={"tasks": {t: e.model_copy(update={"boost": [*e.boost, step]})
                                                 for t, e in manifest.tasks.items()}})


def _moves(anchor: Anchor, folders: list[Path]) -> list[float]:
    """How far each adapter (a PEFT folder) moved from the anchor's LoRA weights: |theta - theta*|."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    start = get_peft_model_state_dict(anchor.featurizer.score.model)
    moves = []
    for folder in folders:
        weights = load_file(str(folder / "adapter_model.safetensors"))
        moves.append(float(sum((weights[k].float() - v.float()).norm() ** 2 for k, v in start.items()) ** 0.5))
    return moves


def _odds_change(scores: dict[str, evaluate.TaskScores], rows: pl.DataFrame, name: str, anchor: str | None
                 ) -> np.ndarray:
    """How far adapter `name` moves every row's gold label-set log-odds from the anchor's, in
    the order of `rows`."""
    change = np.empty(rows.height)
    for task, s in scores.items():
        change[(rows["task"] == task).to_numpy()] = s.gold_odds(name) - s.gold_odds(anchor)
    return change


def _boost(cfg: EnsembleTrainConfig, ensemble: EnsembleModel, manifest: manifest_io.Manifest, grads: Path,
           frame: pl.DataFrame, val_scores: dict[str, evaluate.TaskScores], out: Path
           ) -> tuple[manifest_io.Manifest, list[dict]]:
    """Boosting rounds while each lowers the training residual and the validation NLL: the final
    manifest (the new adapters' validation scores are added to `val_scores`; `ensemble` may still
    hold the last, rejected adapter) and a record of every round tried, with its first-order
    check: the change of the training rows' gold label-set log-odds the ridge predicted (X w at
    the saved norm) beside the change the saved adapter makes."""
    tasks = list(manifest.tasks)
    train = frame.filter((pl.col("split") == "train") & pl.col("task").is_in(tasks))
    validation = frame.filter((pl.col("split") == "validation") & pl.col("task").is_in(tasks))
    anchor = Anchor(grads)
    X, _ = boost.design(anchor, ensemble.tokenizer, manifest, train)
    alpha = boost.relative_alpha(X, cfg.boost_alpha)
    moves = _moves(anchor, [out / "adapters" / a.name for a in manifest.adapters if a.kind == "group"])
    max_norm = cfg.boost_max_norm * float(np.median(moves))
    train_scores = evaluate.score_rows(ensemble, train)
    residual = _residuals(manifest, train_scores, train)
    current = _validation_nll(manifest, val_scores)
    rounds = []
    for k in range(1, cfg.boost + 1):
        name = f"boost-{k}"
        folder = out / "adapters" / name
        w = boost.residual_w(X, torch.as_tensor(residual), alpha)
        fitted, size = boost.save_adapter(anchor, w, folder, max_norm)
        entry = manifest_io.AdapterEntry(name=name, path=f"adapters/{name}", kind="boost", tasks=tasks,
                                         rank=_rank(folder))
        held = manifest.model_copy(update={"adapters": [*manifest.adapters, entry]})
        ensemble.update(manifest_io.load(manifest_io.write(held, out)))
        for scores, rows in ((val_scores, validation), (train_scores, train)):
            for task, s in evaluate.score_rows(ensemble, rows, models=[name]).items():
                scores[task].logprobs[name] = s.logprobs[name]
        predicted = (X @ w).numpy() * (size / fitted)
        actual = _odds_change(train_scores, train, name, manifest.anchor)
        nu, nll = boost.line_search(lambda v: _validation_nll(_stepped(held, name, v), val_scores), cfg.boost_max_step)
        candidate = _stepped(held, name, nu)
        after = _residuals(candidate, train_scores, train)
        record = {"round": k, "step": nu, "validation_nll": nll, "before": current,
                  "train_residual_before": float(residual.mean()), "train_residual": float(after.mean()),
                  "update_norm": size, "fitted_norm": fitted, "max_norm": max_norm,
                  "predicted_odds_change": float(predicted.mean()), "odds_change": float(actual.mean()),
                  "first_order_pearson": float(np.corrcoef(predicted, actual)[0, 1]),
                  "accepted": bool(nu > 0 and after.mean() < residual.mean())}
        rounds.append(record)
        if not record["accepted"]:
            shutil.rmtree(folder)
            manifest_io.write(manifest, out)
            break
        manifest, current, residual = candidate, nll, after
    return manifest, rounds


def _flops(ensemble: EnsembleModel, frame: pl.DataFrame, grads: Path, partition: list[list[str]],
           trained: list[dict], groups_dir: Path | None, boosting: list[dict]) -> dict[str, float]:
    """FLOPs per stage (engine/ensemble/flops.py has the formulas) and `pipeline`, their sum with
    inference over the test rows. The store's gradient pass counts only where a grouping (its
    estimator) used it; one adapter trained on a given partition needs none, and boosting takes
    its own gradients (of the label-set log-odds) over the training rows."""
    from engine.features.store import FeatureStore

    manifest = ensemble.manifest
    # Base weights only; a 4-bit Params4bit stores two weights per element.
    params = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)
                 for n, p in ensemble.model.get_base_model().named_parameters() if "lora_" not in n)
    sample = frame["text"].head(500).to_list()
    tokens = float(np.mean([len(ensemble.tokenizer(t)["input_ids"]) for t in sample])) + 2  # prompt + answer
    forward, train_pass = flops.forward(params, tokens), flops.train(params, tokens)
    tasks = list(manifest.tasks)
    train = frame.filter((pl.col("split") == "train") & pl.col("task").is_in(tasks))
    validation = frame.filter((pl.col("split") == "validation") & pl.col("task").is_in(tasks))
    test_rows = frame.filter((pl.col("split") == "test") & pl.col("task").is_in(tasks)).height
    examples, evaluated = 0, 0
    for group, run in zip(partition, trained):
        c = run["config"]
        rows = train.filter(pl.col("task").is_in(group)).height
        steps = c["steps_per_epoch"] or max(1, rows // (c["batch_size"] * run["workers"]))
        examples += len(run["history"]) * steps * c["batch_size"] * run["workers"]
        # every epoch: the validation loss and the label-set accuracy, a forward pass each
        evaluated += len(run["history"]) * 2 * validation.filter(pl.col("task").is_in(group)).height
    estimator = 0.0
    if groups_dir is not None:
        info = json.loads((groups_dir / "groups.json").read_text())["estimator"]
        estimator = flops.estimator_fits(info["affinity_fits"] + info["search_fits"], info["rows"], info["dim"])
    store = FeatureStore(grads)
    gradient_pass = train_pass * store.rows().height if groups_dir is not None else 0.0
    # Weights: every group adapter over the validation rows (one adapter needs no weights).
    groups = sum(a.kind == "group" for a in manifest.adapters)
    weight_fit = forward * validation.height * groups if groups > 1 else 0.0
    # Boosting: once, the anchor over the validation rows, the training rows under every group
    # adapter and the anchor, and the label-set gradients of the training rows; per round tried,
    # the ridge and the new adapter over the validation and training rows.
    boosting_flops = 0.0
    if boosting:
        boosting_flops = forward * (validation.height + train.height * (groups + 1)) + train_pass * train.height
        for record in boosting:
            boosting_flops += flops.ridge(train.height, store.spec.dim) + forward * (validation.height + train.height)
    per_query = float(np.mean([len(manifest.models(t)) for t in tasks]))
    stages = {"gradient_pass": gradient_pass, "estimator": estimator, "training": train_pass * examples +
              forward * evaluated, "weight_fit": weight_fit, "boosting": boosting_flops,
              "inference_per_query": forward * per_query, "adapters_per_query": per_query,
              "test_queries": float(test_rows)}
    stages["pipeline"] = (gradient_pass + estimator + stages["training"] + weight_fit + boosting_flops
                          + stages["inference_per_query"] * test_rows)
    return stages
