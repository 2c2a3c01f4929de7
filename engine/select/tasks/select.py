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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from engine import storage
from engine.config import SelectTasksConfig
from engine.errors import SiftError
from engine.report import table
from engine.select.tasks import subsets

TARGET_ONLY_NA = "the target has no training rows (validation only): there is no target-only fine-tune to compare with"


@dataclass
class Estimate:
    """One training set's target quality: estimated, and with eval=forward also scored by loading
    theta* + P w. A baseline that does not exist for this target has only `not_applicable`."""

    loss: float | None = None
    accuracy: float | None = None  # argmax over the task's labels (docs/ALGORITHMS.md section 2, step 6)
    macro_f1: float | None = None
    forward_loss: float | None = None
    forward_accuracy: float | None = None
    forward_macro_f1: float | None = None
    not_applicable: str | None = None


def _baselines(data: subsets.TaskGradients, targets: list[str], candidates: list[str],
               chosen: list[str]) -> dict[str, list[bool] | None]:
    """The training sets reported side by side, as subsets of the candidates (the targets' own
    training rows are in each): the selection, the target alone, all tasks. A target with
    validation rows only has no "target only" fine-tune: None."""
    return {"selected": [c in chosen for c in candidates],
            "target only": [False] * len(candidates) if subsets.has_training_rows(data, targets) else None,
            "all tasks": [True] * len(candidates)}


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
    fitting = subsets.fitting(cfg.grads, cfg.lam, cfg.fit)
    # Accuracy is the argmax over each target task's labels: the target's validation rows are
    # featurized once more against every label (the anchor model, a few seconds).
    from engine.data.ingest import examples_path
    from engine.models.anchor import Anchor

    anchor = Anchor(cfg.grads)
    examples = storage.read_parquet(examples_path(cfg.data))
    rows, labels = subsets.target_rows(data, examples, cfg.target), subsets.label_sets(examples, cfg.target)
    label_rows = subsets.label_rows(anchor, rows, labels)
    failed_trials = []  # Tune trials that failed after their retries: reported, left out of the fits
    if cfg.search == "tune":
        from engine.select.tasks.tune import tune_subsets

        est, failed_trials = tune_subsets(data, cfg.target, candidates, cfg.subsets, fitting, out, cfg.seed,
                                          cfg.runtime, labels=label_rows)
    else:
        sets = subsets.random_subsets(len(candidates), cfg.subsets, cfg.ratio, cfg.seed)
        est = subsets.estimate(data, cfg.target, sets, candidates, lam=fitting, labels=label_rows)
    ensemble = subsets.random_ensemble(est)
    ridge = subsets.ridge_surrogate(est)
    order = [candidates[j] for j in np.argsort(ensemble, kind="stable")]
    if cfg.search == "forward":
        chosen, trace = subsets.forward_selection(data, cfg.target, candidates, order, lam=fitting)
    elif cfg.keep is not None:  # the reference's rule: the best share by random-ensemble score
        top = set(order[:max(1, round(cfg.keep * len(candidates)))])
        chosen, trace = [c for c in candidates if c in top], []
    else:
        chosen, trace = [c for c, score in zip(candidates, ensemble) if score <= 0], []
    finals = _baselines(data, cfg.target, candidates, chosen)
    applicable = [name for name, s in finals.items() if s is not None]
    final = subsets.estimate(data, cfg.target, np.array([finals[name] for name in applicable]), candidates,
                             lam=fitting, labels=label_rows)
    estimates = {name: Estimate(not_applicable=TARGET_ONLY_NA) for name in finals}
    for k, name in enumerate(applicable):
        estimates[name] = Estimate(float(final.loss[k]), float(final.accuracy[k]), float(final.macro_f1[k]))
    if cfg.eval == "forward":
        _forward(cfg, anchor, data, rows, labels, candidates, finals, estimates, fitting)

    tasks = pl.DataFrame({"task": candidates, "ensemble_score": ensemble, "ridge_coef": ridge,
                          "selected": [c in chosen for c in candidates]}).sort("ensemble_score")
    tasks.write_parquet(out / "tasks.parquet")
    pl.DataFrame({"tasks": [[c for c, on in zip(candidates, row) if on] for row in est.subsets],
                  "loss": est.loss, "accuracy": est.accuracy, "macro_f1": est.macro_f1}).write_parquet(out / "subsets.parquet")
    report = {
        "target": cfg.target, "search": cfg.search, "selected": chosen,
        "estimates": {name: asdict(e) for name, e in estimates.items()}, "units": cfg.units, "clusters": mix,
        "forward_trace": trace, "subsets": cfg.subsets, "failed_trials": [asdict(t) for t in failed_trials],
        "seconds": round(time.perf_counter() - started, 3),
        "config": cfg.model_dump(mode="json"),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    _plot(tasks, out / "report.png", cfg.target)
    return report


def _forward(cfg: SelectTasksConfig, anchor, data: subsets.TaskGradients, rows: pl.DataFrame,
             labels: dict[str, list[str]], candidates: list[str], finals: dict[str, list[bool] | None],
             estimates: dict[str, Estimate], fitting) -> None:
    """Score the final choices for real: theta* + P w loaded into the anchor model (the store's
    projected factors only), on the same target rows as the estimate."""
    import torch

    evaluation = anchor.encode(rows)
    applicable = [name for name, s in finals.items() if s is not None]
    W = subsets.fit_weights(data, cfg.target, np.array([finals[name] for name in applicable]), candidates, fitting)
    for w, name in zip(W, applicable):
        anchor.load(w)
        f = anchor.scores(evaluation)
        estimates[name].forward_loss = float(torch.nn.functional.softplus(-f).mean())
        estimates[name].forward_accuracy, estimates[name].forward_macro_f1 = \
            subsets.forward_label_metrics(anchor, rows, labels)
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
    estimates = {name: Estimate(**v) for name, v in report["estimates"].items()}
    forward = any(e.forward_loss is not None for e in estimates.values())
    missing = any(e.not_applicable for e in estimates.values())

    def cells(e: Estimate) -> list[str]:
        values = [(e.loss, ".4f"), (e.accuracy, ".3f"), (e.macro_f1, ".3f"),
                  *([(e.forward_loss, ".4f"), (e.forward_accuracy, ".3f"), (e.forward_macro_f1, ".3f")]
                    if forward else [])]
        return [format(v, spec) if v is not None else "n/a" for v, spec in values] + \
            ([e.not_applicable or ""] if missing else [])

    table("Estimated target quality", ["training set", "loss", "accuracy", "macro-F1",
                                       *(["forward loss", "forward accuracy", "forward macro-F1"] if forward else []),
                                       *(["not applicable because"] if missing else [])],
          [(name, *cells(e)) for name, e in estimates.items()])
