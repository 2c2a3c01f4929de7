"""`sift select-tasks`: which training tasks to fine-tune on for a target, estimated, not trained.

Random subsets of the candidate tasks are all fitted at once by the first-order estimator; each
task's random-ensemble score is the mean estimated target loss of the subsets holding it minus
that of the subsets without it (negative: it helps). `random` keeps the tasks that help;
`forward` adds tasks in that order while the estimate does not get worse; `tune` has Ray Tune
propose and evaluate the subsets (resumable), then keeps the helpful tasks as `random` does. Outputs: tasks.parquet,
subsets.parquet, report.json, report.png.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import polars as pl

from engine.config import SelectTasksConfig
from engine.errors import SiftError
from engine.report import table
from engine.select.tasks import subsets


def select_tasks(cfg: SelectTasksConfig) -> dict:
    if cfg.out is None or cfg.data is None or cfg.grads is None or not cfg.target:
        raise SiftError("select-tasks needs --data, --grads, --target and --out")
    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = subsets.load(cfg.grads, cfg.data, top_up=cfg.top_up, seed=cfg.seed)
    missing = [t for t in cfg.target if t not in data.tasks]
    if missing:
        raise SiftError(f"target task(s) {missing} not in the gradient store (tasks: {', '.join(data.tasks)})")
    mix = None
    if cfg.units == "clusters":
        data, mix = subsets.cluster_units(data, cfg.target, cfg.clusters, cfg.seed)
    candidates = [t for t in data.tasks if t not in cfg.target]
    if not candidates:
        raise SiftError("no candidate tasks besides the target")
    if cfg.search == "tune":
        from engine.select.tasks.tune import tune_subsets

        est = tune_subsets(data, cfg.target, candidates, cfg.subsets, cfg.lam, out / "tune", cfg.seed, cfg.runtime)
    else:
        sets = subsets.random_subsets(len(candidates), cfg.subsets, cfg.ratio, cfg.seed)
        est = subsets.estimate(data, cfg.target, sets, candidates, lam=cfg.lam)
    ensemble = subsets.random_ensemble(est)
    ridge = subsets.ridge_surrogate(est)
    order = [candidates[j] for j in np.argsort(ensemble, kind="stable")]
    if cfg.search == "forward":
        chosen, trace = subsets.forward_selection(data, cfg.target, candidates, order, lam=cfg.lam)
    else:
        chosen, trace = [c for c, score in zip(candidates, ensemble) if score <= 0], []
    finals = np.array([[c in chosen for c in candidates], [False] * len(candidates), [True] * len(candidates)])
    final = subsets.estimate(data, cfg.target, finals, candidates, lam=cfg.lam)

    estimates = {name: {"loss": float(final.loss[i]), "accuracy": float(final.accuracy[i])}
                 for i, name in enumerate(["selected", "target only", "all tasks"])}
    if cfg.eval == "forward":
        _forward(cfg, data, candidates, finals, estimates)

    tasks = pl.DataFrame({"task": candidates, "ensemble_score": ensemble, "ridge_coef": ridge,
                          "selected": [c in chosen for c in candidates]}).sort("ensemble_score")
    tasks.write_parquet(out / "tasks.parquet")
    pl.DataFrame({"tasks": [[c for c, on in zip(candidates, row) if on] for row in est.subsets],
                  "loss": est.loss, "accuracy": est.accuracy}).write_parquet(out / "subsets.parquet")
    report = {
        "target": cfg.target, "search": cfg.search, "selected": chosen,
        "estimates": estimates, "units": cfg.units, "clusters": mix,
        "forward_trace": trace, "subsets": cfg.subsets, "seconds": round(time.perf_counter() - started, 3),
        "config": cfg.model_dump(mode="json"),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    _plot(tasks, out / "report.png", cfg.target)
    return report


def _forward(cfg: SelectTasksConfig, data: subsets.TaskGradients, candidates: list[str], finals: np.ndarray,
             estimates: dict) -> None:
    """Score the final choices for real: theta* + P w loaded into the anchor model."""
    import torch

    from engine.data.ingest import examples_path
    from engine.models.anchor import Anchor
    from engine.select.tasks.estimator import fit_subsets

    anchor = Anchor(cfg.grads)
    examples = pl.read_parquet(examples_path(cfg.data))
    evaluation = anchor.encode(examples.filter(pl.col("task").is_in(cfg.target) & (pl.col("split") == "validation")))
    fit = fit_subsets(data.G, data.f, subsets.fit_masks(data, cfg.target, finals, candidates), lam=cfg.lam)
    for w, name in zip(fit.w, estimates):
        anchor.load(w)
        f = anchor.scores(evaluation)
        estimates[name]["forward_loss"] = float(torch.nn.functional.softplus(-f).mean())
        estimates[name]["forward_accuracy"] = float((f > 0).float().mean())
    anchor.reset()


def _plot(tasks: pl.DataFrame, path: Path, target: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * tasks.height + 1.5))
    colors = ["#2ca02c" if s else "#bbbbbb" for s in tasks["selected"]]
    ax.barh(tasks["task"].to_list(), tasks["ensemble_score"].to_numpy(), color=colors)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("estimated change of target loss when the task is in the fit (negative helps)")
    ax.set_title(f"select-tasks for {', '.join(target)} (green: selected)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def show(report: dict, tasks_file: Path) -> None:
    tasks = pl.read_parquet(tasks_file)
    table(f"Tasks for target {', '.join(report['target'])} ({report['search']} search, {report['subsets']} subsets)",
          ["task", "ensemble score", "ridge coef", "selected"],
          [(t, f"{e:+.4f}", f"{r:+.4f}", s) for t, e, r, s in tasks.rows()])
    forward = all("forward_loss" in v for v in report["estimates"].values())
    table("Estimated target quality", ["training set", "loss", "p(gold) > 1/2",
                                       *(["forward loss", "forward p(gold) > 1/2"] if forward else [])],
          [(name, f"{v['loss']:.4f}", f"{v['accuracy']:.3f}",
            *([f"{v['forward_loss']:.4f}", f"{v['forward_accuracy']:.3f}"] if forward else []))
           for name, v in report["estimates"].items()])
