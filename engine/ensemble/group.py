"""`sift group`: the tasks of a gradient store split into m groups, one adapter each later.

The affinity and the first partitions come from engine/ensemble/grouping.py (and, without a given
m, the choice of m: every m's refined partition by the estimator's objective, the fewest groups
within one standard error of the best, each m reported); Ray Tune then runs one local search per
starting partition (SDP, spectral, and `restarts` random ones) in parallel, and the best refined
partition by the estimator's objective wins. Every candidate is reported before and after its
search by both measures, which must broadly agree (the affinity is the objective's pairwise
first-order model): the within-group affinity (density, higher is better) and the objective
(mean estimated validation loss, lower is better), with its estimated per-task loss and
accuracy. Outputs: groups.json, affinity.parquet, affinity.png (the affinity heatmap in group
order, the group map).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from engine import runtime, storage
from engine.config import GradsConfig, GroupConfig
from engine.errors import SiftError
from engine.report import table
from engine.ensemble import grouping
from engine.select.tasks import subsets
from engine.select.tasks.tune import FailedTrial, experiment_name, finished, restorable_tuner

EXPERIMENT = "group-search"


@dataclass
class Candidate:
    """One start's partition, before and after its local search, by both measures."""

    start: str  # sdp, spectral, random-k
    start_affinity: float  # within-group density sum(T_cc)/|c|, averaged over groups: higher is better
    affinity: float
    start_objective: float  # mean estimated validation loss over tasks: lower is better
    objective: float
    steps: int
    fits: int
    labels: list[int]
    groups: list[list[str]]
    per_task: dict[str, dict[str, float]]  # task -> estimated loss and accuracy under its group's fit


def _refine(config: dict, shared: subsets.SharedGradients, starts: dict[str, list[int]], lam: float,
            rounds: int) -> None:
    import torch
    from ray import tune

    torch.set_num_threads(1)
    scorer = grouping.GroupScorer(shared.load(), lam)
    labels, trace = scorer.local_search(np.array(starts[config["start"]]), rounds)
    loss, accuracy = scorer.per_task(labels)
    tune.report({"objective": trace[-1], "start_objective": trace[0], "steps": len(trace) - 1, "fits": scorer.fits,
                 "labels": json.dumps(labels.tolist()), "loss": json.dumps(loss.tolist()),
                 "accuracy": json.dumps(accuracy.tolist())})


def group_tasks(cfg: GroupConfig) -> dict:
    if cfg.out is None or cfg.data is None or cfg.grads is None:
        raise SiftError("group needs --data, --grads and --out")
    started = time.perf_counter()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = subsets.load(cfg.grads, cfg.data, top_up=cfg.top_up, seed=cfg.seed)
    n = len(data.tasks)
    if n < 2:
        raise SiftError(f"the gradient store holds {n} task(s); grouping needs at least 2")
    if cfg.groups is not None and cfg.groups > n:
        raise SiftError(f"--groups {cfg.groups} is more than the {n} tasks in the store")
    aff = grouping.affinity(data, cfg.subsets, cfg.ratio, cfg.lam, cfg.seed)
    scorer = grouping.GroupScorer(data, cfg.lam)
    choice = None if cfg.groups else grouping.choose_m(scorer, aff.T, cfg.max_groups, cfg.method, cfg.seed, cfg.rounds)
    m = cfg.groups or choice.m
    rng = np.random.default_rng(cfg.seed)
    starts = {method: grouping.cluster(aff.T, m, method, cfg.seed).tolist()
              for method in (["sdp", "spectral"] if cfg.method == "sdp" else ["spectral"])}
    for k in range(cfg.restarts):
        starts[f"random-{k}"] = (rng.permutation(n) % m).tolist()

    candidates, failed = _search(cfg, data, aff, starts, out)
    best = min(candidates, key=lambda c: (c.objective, c.steps, c.start))  # ties: the start already there
    report = {
        "tasks": data.tasks, "m": m, "m_choice": asdict(choice) if choice else None, "groups": best.groups,
        "chosen": best.start,
        "affinity": best.affinity, "objective": best.objective,
        "candidates": [asdict(c) for c in candidates], "failed_starts": [asdict(f) for f in failed], "data": str(Path(cfg.data).resolve()), "grads": str(Path(cfg.grads).resolve()),
        "estimator": {"affinity_fits": cfg.subsets + n, "search_fits": scorer.fits + sum(c.fits for c in candidates),
                      "rows": int(data.G.shape[0]), "dim": int(data.G.shape[1])},
        "seconds": round(time.perf_counter() - started, 3), "config": cfg.model_dump(mode="json"),
        "warnings": _warnings(cfg),
    }
    (out / "groups.json").write_text(json.dumps(report, indent=2))
    pl.DataFrame({"task": data.tasks, **{t: aff.T[:, i] for i, t in enumerate(data.tasks)}}) \
        .write_parquet(out / "affinity.parquet")
    _plot(aff, best.labels, out / "affinity.png")
    return report


def _warnings(cfg: GroupConfig) -> list[str]:
    """A store of the answer tokens' log-odds over the vocabulary estimates mostly each task's
    answer format, not the label-set loss `sift train` fits: on the ensemble benchmark it made
    every pooling look costly (m = 6 of 8 tasks, against m = 3 on a label-set store)."""
    config = storage.join(cfg.grads, "config.json")
    if not storage.is_file(config) or GradsConfig.model_validate_json(storage.read_text(config)).objective == "labels":
        return []
    return ["the gradient store's f is the answer tokens' log-odds over the vocabulary (objective=answer); "
            "`sift train` fits the label-set loss: for classification tasks group on a store featurized with "
            "--set objective=labels"]


def _search(cfg: GroupConfig, data: subsets.TaskGradients, aff: grouping.Affinity, starts: dict[str, list[int]],
            out: Path) -> tuple[list[Candidate], list[FailedTrial]]:
    """Every start's local search as a Ray Tune trial (retried up to `runtime.max_failures` times
    after a lost worker or node): the candidates found, and the starts whose search still failed
    (reported, not candidates)."""
    from ray import tune

    info = runtime.start(cfg.runtime)
    trainable = tune.with_resources(
        tune.with_parameters(_refine, shared=data.shared(), starts=starts, lam=cfg.lam, rounds=cfg.rounds), {"cpu": 1})
    name = experiment_name(EXPERIMENT, starts, cfg.lam, cfg.rounds, data)
    tuner = restorable_tuner(trainable, name, runtime.run_storage(cfg.runtime, out, "tune"), cfg.runtime.max_failures,
                             param_space={"start": tune.grid_search(list(starts))},
                             tune_config=tune.TuneConfig(max_concurrent_trials=max(1, int(info.cpus))))
    done, failed = finished(tuner.fit(), "local search")
    candidates = []
    # Each trial's last result as Tune holds it, not grid.get_dataframe(): that reads the trials'
    # result.json / progress.csv, which are not written when TUNE_DISABLE_AUTO_CALLBACK_LOGGERS is set.
    for result in done:
        row, start = result.metrics, result.config["start"]
        if not row or "labels" not in row:
            raise SiftError(f"the local search from start {start} left no result under {out / 'tune'}; "
                            f"delete that folder and rerun")
        labels = json.loads(row["labels"])
        loss, accuracy = json.loads(row["loss"]), json.loads(row["accuracy"])
        candidates.append(Candidate(
            start=start, start_affinity=grouping.density(aff.T, np.array(starts[start])),
            affinity=grouping.density(aff.T, np.array(labels)), start_objective=float(row["start_objective"]),
            objective=float(row["objective"]), steps=int(row["steps"]), fits=int(row["fits"]), labels=labels,
            groups=[[t for t, g in zip(data.tasks, labels) if g == k] for k in range(max(labels) + 1)],
            per_task={t: {"loss": loss[i], "accuracy": accuracy[i]} for i, t in enumerate(data.tasks)}))
    return sorted(candidates, key=lambda c: c.start), failed


def _plot(aff: grouping.Affinity, labels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(labels, kind="stable")
    T = aff.T[np.ix_(order, order)]
    names = [aff.tasks[i] for i in order]
    fig, ax = plt.subplots(figsize=(0.5 * len(names) + 4, 0.5 * len(names) + 3))
    limit = np.abs(T).max() or 1.0
    image = ax.imshow(T, cmap="RdBu", vmin=-limit, vmax=limit)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), [f"{n} [{labels[i]}]" for n, i in zip(names, order)], fontsize=8)
    bounds = np.flatnonzero(np.diff(np.sort(labels))) + 0.5
    for b in bounds:
        ax.axhline(b, color="black", linewidth=1.5)
        ax.axvline(b, color="black", linewidth=1.5)
    fig.colorbar(image, ax=ax, label="affinity: loss drop from the other's rows vs own")
    ax.set_title("task affinity, ordered by group [group]")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def show(report: dict) -> None:
    choice = report.get("m_choice")  # absent from a groups.json written before the choice was reported
    if choice:
        table(f"Choice of m: {choice['rule']} (m = {choice['m']}); objective = mean estimated validation loss",
              ["m", "objective", "- lowest", "standard error", "est. accuracy", "density (before)", "groups"],
              [(str(c["m"]), f"{c['objective']:.4f}", f"{c['excess']:+.4f}", f"{c['standard_error']:.4f}",
                f"{c['accuracy']:.3f}", f"{c['density']:+.4f}", _short(report["tasks"], c["labels"]))
               for c in choice["counts"]])
    table(f"Groups (m = {report['m']}, chosen start: {report['chosen']}; within-group affinity "
          f"{report['affinity']:+.4f}, objective {report['objective']:.4f})", ["group", "tasks"],
          [(str(k), ", ".join(g)) for k, g in enumerate(report["groups"])])
    table("Candidate partitions before -> after local search: within-group affinity (higher is better), "
          "objective = mean estimated validation loss (lower is better)",
          ["start", "affinity", "objective", "steps", "groups"],
          [(c.start, f"{c.start_affinity:+.4f} -> {c.affinity:+.4f}", f"{c.start_objective:.4f} -> {c.objective:.4f}",
            str(c.steps), _short(report["tasks"], c.labels)) for c in (Candidate(**c) for c in report["candidates"])])
    for warning in report.get("warnings", []):
        print(f"warning: {warning}")


def _short(tasks: list[str], labels: list[int]) -> str:
    """The groups in one line, each task without its source prefix."""
    return " | ".join(",".join(t.split("-", 1)[-1] for t, g in zip(tasks, labels) if g == k)
                      for k in range(max(labels) + 1))
