"""`sift estimate --calibrate`: the estimator checked against the model it approximates.

(a) Approximation error: for w fitted on a subset and update sizes c, load theta* + P(c w) into
    the anchor model (the store's projected factors only) and compare the real outputs f_i with
    the first-order f*_i + c g_i . w: r_i = |f*_i + c g_i.w - f_i| / max(|f_i|, |f*_i|), with and
    without the gradient term.
(b) Real fine-tunes: random subsets are fine-tuned for real as parallel Ray Tune trials: LoRA from
    the anchor, on exactly the training rows the estimator fitted, with the cross-entropy of the
    store's objective (answer: the answer tokens, the loss of every sift fine-tune; labels: the
    gold label among its task's labels, the ensemble adapters' loss). Each records the target loss every
    `eval_every` steps (calibration.json and the right panel of calibration.png show the curves,
    so a run whose fine-tunes do not lower the target loss is seen at once). The loss compared with
    the estimate is the estimator's own: softplus(-f) of the gold answer (or label) on the target's
    validation rows; accuracy and macro-F1 are the argmax over the task's labels, for the
    estimate and the fine-tunes alike. With `seeds` > 1 each subset is fine-tuned once per batch
    order and its real loss is their mean: one fine-tune's target loss moves by about as much
    between seeds as the subsets differ (issue 14), and the estimate stands for the subset, not
    for one batch order; `seed_spearman` (one seed's ranking against another's) says how much
    ranking the real fine-tunes themselves carry. rows.parquet keeps every target row's f, for
    each estimate and each fine-tune at each curve point; finished fine-tunes are kept under
    OUT/fine-tunes/ and reused by a rerun.
(c) A constant predictor ("every subset = the anchor's loss") beside the estimator: a relative
    error it reaches too says little, and is called out.
(d) The update radius. A fine-tune of a fixed budget (steps x lr) gets only so far; the
    converged fit (|w| unbounded) promised about twice the improvement the real fine-tunes
    delivered and left the first-order regime (issue 14). Each fine-tune's update is recorded in
    the estimator's coordinates, u = P^T (theta - theta*) (`Anchor.displacement`), with the
    first-order model evaluated at it, and its progress radius r_k (`_progress_radii`: the |w|
    at which the fit gets as far on the subset's training rows as u does). Unless `fit.radius`
    is set, every estimate is held to |w| <= `measured_radius`, the median r_k: one setting for
    all subsets, so the ranking owes nothing to any subset's own fine-tune. It gets the loss
    level, not the order: in three calibrations (issue 14, SmolLM2 suite) it ranked the real
    fine-tunes at Spearman 0.81, 0.17 and 0.14 (no better than a constant at the level), while
    the fit held to the real updates' size, |w| <= median |u| (`ranking_radius`), ranked them at
    0.90, 0.90 and 0.93 and passed select-tasks' noisy-label check. select-tasks ranks subsets, so
    `ranking_radius` is the value the summary gives for `select-tasks --set fit.radius=...`. In `variants`, side
    by side against the same fine-tunes: the converged fit (what sift did before), the fit held
    to the real updates' size (median |u|), and each estimate held to the median r of the *other*
    fine-tunes (leave-one-out: the relative error with no in-sample setting at all).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl
import torch

from engine import runtime, storage
from engine.config import CalibrateConfig
from engine.data.ingest import examples_path
from engine.errors import SiftError
from engine.features import objective
from engine.models.anchor import Anchor
from engine.select.tasks import subsets
from engine.select.tasks.estimator import Fitting, fit_within, linearised_scores
from engine.select.tasks.tune import FailedTrial, experiment_name, finished


@dataclass
class Approximation:
    scale: float
    update_norm: float  # |P c w| in parameter space
    mean_r2: float
    mean_r2_without_gradient: float
    rows: int


@dataclass
class FineTune:
    """One real fine-tune (one subset, one seed): the target quality at its end and its
    target-loss curve. The curve starts after the first `eval_every` steps: at step 0 every
    fine-tune is the anchor, whose target loss the calibration reads off the store once."""

    seed: int  # of the batch order (the LoRA starts from the anchor: nothing else is random)
    loss: float  # softplus(-f) of the gold answer, target validation rows
    accuracy: float
    macro_f1: float
    curve_steps: list[int]
    curve_target_loss: list[float]
    curve_scores: list[list[float]]  # f of every target validation row at each curve point (rows.parquet)
    train_loss: list[float]  # every optimizer step's cross-entropy
    train_rows: int
    seconds: float
    update: list[float]  # u = P^T (theta - theta*): the real update in the estimator's coordinates
    update_norm: float  # |theta - theta*| over every LoRA factor


@dataclass
class Variant:
    """The same real fine-tunes against the estimator fitted another way (side by side)."""

    name: str
    estimated_loss: list[float]
    update_norm: list[float]  # |w|
    mean_squared_relative_error: float
    spearman: float | None


@dataclass
class Calibration:
    target: list[str]
    subsets: list[list[str]]
    estimated_loss: list[float]
    estimated_accuracy: list[float]
    estimated_macro_f1: list[float]
    real_loss: list[float]
    real_accuracy: list[float]
    real_macro_f1: list[float]
    mean_squared_relative_error: float
    spearman: float | None
    anchor_loss: float  # the constant predictor: every subset = the anchor's target loss
    constant_mean_squared_relative_error: float
    constant_as_good: bool  # the constant's relative error is at most the estimator's
    real_loss_spread: float  # max - min of the real losses: how much the subsets differ at all
    # Each subset is fine-tuned `seeds` times (batch orders); its real loss is their mean. The
    # seeds' Spearman (first two seeds over the subsets) is how well one real fine-tune ranks
    # another of the same subsets: the ceiling for any estimate judged against one seed.
    seeds: int
    real_loss_by_seed: list[list[float]]
    seed_spearman: float | None
    fine_tunes_lowering_target_loss: int  # fine-tunes whose last target loss is below the anchor's
    # The update sizes side by side: |w| of each estimate, |u| = |P^T (theta - theta*)| and
    # |theta - theta*| of the real fine-tunes, and the first-order model evaluated at the real
    # update u (f*_val + G_val . u): how well first order can do at the size of a real fine-tune.
    # Per subset: estimated_update_norm, linearised_real_loss (the mean over its fine-tunes); per
    # fine-tune (subset by subset, `fine_tune_subset` its subset's index): the rest.
    estimated_update_norm: list[float]
    fine_tune_subset: list[int]
    real_update_norm: list[float]
    real_projected_update_norm: list[float]
    linearised_real_loss: list[float]
    real_updates: list[list[float]]  # u of every real fine-tune, for offline analysis
    progress_radius: list[float]  # r_k of every real fine-tune (`_progress_radii`)
    radius: str  # how the estimates' |w| was held: "measured: R", "configured: R" or "none"
    measured_radius: float  # median r_k: the loss level of fine-tunes of this budget
    ranking_radius: float  # median |u|: fit.radius for select-tasks, which ranks subsets
    variants: list[Variant]
    curves: list[dict]
    approximation: list[Approximation]
    lifted_factors: int
    estimate_seconds: float
    label_rows_seconds: float
    real_fine_tune_seconds: float  # the fine-tunes' own seconds, summed (one CPU each)
    time_ratio: float
    warnings: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    failed_fine_tunes: list[dict] = field(default_factory=list)  # after their retries; left out of every figure


def approximation_error(cfg: CalibrateConfig, anchor: Anchor, g: torch.Tensor, f_star: torch.Tensor,
                        encoded: list, w: torch.Tensor) -> list[Approximation]:
    """Mean r_i^2 at each update scale, with and without the gradient term; the anchor is reset after."""
    out = []
    for scale in cfg.scales:
        norm = anchor.load(w * scale)
        f_real = anchor.scores(encoded).double()
        linear = f_star + scale * (g @ w.double())
        denominator = torch.maximum(f_real.abs(), f_star.abs()).clamp_min(1e-12)
        r = (linear - f_real).abs() / denominator
        r0 = (f_star - f_real).abs() / denominator
        out.append(Approximation(scale, norm, float((r ** 2).mean()), float((r0 ** 2).mean()), len(encoded)))
    anchor.reset()
    return out


def fine_tune(trial: dict) -> None:
    """Ray Tune trial: LoRA fine-tune from the anchor on one subset's rows; report a FineTune."""
    from ray import tune

    trial = {**trial, **trial["trial"]}  # the grid-searched part, flattened (never mutate Tune's config)
    torch.set_num_threads(1)
    torch.manual_seed(trial["seed"])
    anchor = Anchor(Path(trial["grads"]), threads=1)
    examples = pl.read_parquet(trial["examples"])
    train = anchor.encode(examples.filter(pl.col("id").is_in(trial["train_ids"])))
    rows = pl.DataFrame({"id": trial["eval_ids"]}).join(examples, on="id", how="left", maintain_order="left")
    evaluation = anchor.encode(rows)  # in the store's order, as the estimate's rows (rows.parquet pairs them)
    if len(evaluation) != rows.height:
        raise SiftError("target rows no longer encode; was the store built with another tokenizer?")
    module = anchor.featurizer.score
    optimizer = torch.optim.AdamW(anchor.trainable(), lr=trial["lr"], weight_decay=0.0)
    rng = np.random.default_rng(trial["seed"])

    started = time.perf_counter()
    steps, scores, losses = [0], [], []
    while steps[-1] < trial["steps"]:
        k = min(trial["eval_every"], trial["steps"] - steps[-1])
        losses += objective.train_steps(module, optimizer, train, k, trial["batch_size"], anchor.pad, rng,
                                        anchor.objective)
        steps.append(steps[-1] + k)
        scores.append(anchor.scores(evaluation).double())
    curve = [float(torch.nn.functional.softplus(-f).mean()) for f in scores]
    accuracy, macro_f1 = subsets.forward_label_metrics(anchor, rows, trial["labels"])
    moved = anchor.displacement()
    result = json.dumps(asdict(FineTune(trial["seed"], curve[-1], accuracy, macro_f1, steps[1:], curve,
                                        [f.tolist() for f in scores], losses, len(train),
                                        time.perf_counter() - started, moved.projected.tolist(), moved.norm)))
    keep = Path(trial["keep"])
    if keep.parent.is_dir():  # on the driver's node: kept at once, so a calibration cut short keeps it
        keep.write_text(result)
    tune.report({"result": result})


def calibrate(cfg: CalibrateConfig) -> dict:
    """calibration.json, calibration.png and rows.parquet under cfg.out; each subset fine-tuned
    `cfg.seeds` times (batch orders cfg.seed, cfg.seed + 1, ...); returns the Calibration as a dict."""
    if cfg.out is None or cfg.data is None or cfg.grads is None or not cfg.target:
        raise SiftError("estimate --calibrate needs --data, --grads, --target and --out")
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = subsets.load(cfg.grads, cfg.data, seed=cfg.seed, dtype=torch.float64)
    candidates = [t for t in data.tasks if t not in cfg.target]
    chosen = subsets.random_subsets(len(candidates), cfg.subsets, cfg.ratio, cfg.seed)
    data_path = examples_path(cfg.data)
    examples = storage.read_parquet(data_path)
    evaluation = torch.isin(data.task, torch.tensor([data.tasks.index(t) for t in cfg.target])) & ~data.train
    rows = subsets.target_rows(data, examples, cfg.target)
    labels = subsets.label_sets(examples, cfg.target)
    fitting = subsets.fitting(cfg.grads, cfg.lam, cfg.fit)

    anchor = Anchor(cfg.grads)
    started = time.perf_counter()
    label_rows = subsets.label_rows(anchor, rows, labels)
    label_rows_s = time.perf_counter() - started
    first = np.flatnonzero(evaluation.numpy())[:cfg.eval_rows]  # the first rows of `rows`, in the same order
    encoded = anchor.encode(rows.head(cfg.eval_rows))
    if len(encoded) != len(first):  # stored rows were encodable when featurized
        raise AssertionError("stored rows no longer encode; was the store built with another tokenizer?")

    masks = subsets.fit_masks(data, cfg.target, chosen, candidates)
    train_ids = [[i for i, m in zip(data.ids, row.tolist()) if m] for row in masks]
    runs, failed, real_s = _real_fine_tunes(cfg, train_ids, rows["id"].to_list(), labels,
                                            storage.absolute(data_path), out)
    kept = [i for i, r in enumerate(runs) if r]  # a subset whose every fine-tune failed has no loss to compare
    if not kept:
        raise SiftError(f"every real fine-tune failed: {failed[0].error}")
    runs, chosen = [runs[i] for i in kept], chosen[kept]
    tunes = [r for per_subset in runs for r in per_subset]  # every fine-tune, subset by subset
    subset_of = torch.tensor([k for k, per_subset in enumerate(runs) for _ in per_subset])
    real = np.array([np.mean([r.loss for r in per_subset]) for per_subset in runs])
    U = torch.tensor([r.update for r in tunes], dtype=data.G.dtype)
    progress = _progress_radii(data, cfg.target, chosen[subset_of.numpy()], candidates, fitting.lam, U)
    measured = float(progress.median())
    if cfg.fit.radius is not None:
        fittings, radius = [fitting] * len(runs), f"configured: {cfg.fit.radius:g}"
    elif fitting.method != "logistic" or fitting.update_norm is not None or measured <= 0:
        fittings, radius = [fitting] * len(runs), "none"  # measured <= 0: no fine-tune made first-order progress
    else:
        fittings, radius = [replace(fitting, radius=measured)] * len(runs), f"measured: {measured:g}"

    started = time.perf_counter()
    W = torch.cat([subsets.fit_weights(data, cfg.target, chosen[k:k + 1], candidates, fittings[k])
                   for k in range(len(runs))])
    est = linearised_scores(W, data.G[evaluation], data.f[evaluation], label_rows)
    estimate_s = time.perf_counter() - started
    approximation = approximation_error(cfg, anchor, data.G[first], data.f[first], encoded, W[0])
    linearised = torch.nn.functional.softplus(-(data.f[evaluation] + U @ data.G[evaluation].T)).mean(1)
    linearised_real = [float(linearised[subset_of == k].mean()) for k in range(len(runs))]
    anchor_loss = float(torch.nn.functional.softplus(-data.f[evaluation]).mean())
    relative = _relative_error(real, est.loss.numpy())
    constant = _relative_error(real, np.full_like(real, anchor_loss))
    logistic = Fitting(fitting.lam)
    ranking = float(U.norm(dim=1).median())
    others = [float(progress[subset_of != k].median()) if len(runs) > 1 else measured for k in range(len(runs))]
    variants = [
        _variant("converged (no radius)", data, cfg.target, chosen, candidates, logistic, real),
        _variant("held to the real updates' size: |w| <= median |u|", data, cfg.target, chosen, candidates,
                 replace(logistic, radius=ranking), real),
        _variant("measured radius, leave-one-out: |w| <= the other subsets' fine-tunes' median r", data, cfg.target,
                 chosen, candidates, [replace(logistic, radius=r) for r in others], real)]
    by_seed = [[r.loss for r in per_subset] for per_subset in runs]
    paired = [losses[:2] for losses in by_seed if len(losses) >= 2]
    seed_spearman = _spearman(*np.array(paired).T) if paired else None

    lowering = sum(r.curve_target_loss[-1] < anchor_loss for r in tunes)
    warnings = []
    if failed:
        warnings.append(f"{len(failed)} of {len(failed) + len(tunes)} real fine-tunes failed after "
                        f"{cfg.runtime.max_failures} retries and are left out: {failed[0].error}")
    if lowering == 0:
        warnings.append(f"none of the {len(tunes)} real fine-tunes lowered the target loss: try another lr or "
                        "more steps")
    elif lowering < len(tunes):  # a subset of harmful tasks raises it: expected, but worth seeing
        warnings.append(f"{len(tunes) - lowering} of {len(tunes)} real fine-tunes raised the target loss (their "
                        "subsets hurt the target, or the lr is too high: see the curves)")
    if constant <= relative:
        warnings.append(f"a constant (the anchor's loss {anchor_loss:.4f}) reaches a relative error of "
                        f"{constant:.4f}, at most the estimator's {relative:.4f}")
    report = Calibration(
        target=cfg.target, subsets=[[c for c, on in zip(candidates, row) if on] for row in chosen],
        estimated_loss=est.loss.tolist(), estimated_accuracy=est.accuracy.tolist(),
        estimated_macro_f1=est.macro_f1.tolist(), real_loss=real.tolist(),
        real_accuracy=[float(np.mean([r.accuracy for r in per_subset])) for per_subset in runs],
        real_macro_f1=[float(np.mean([r.macro_f1 for r in per_subset])) for per_subset in runs],
        mean_squared_relative_error=relative, spearman=_spearman(est.loss.numpy(), real),
        anchor_loss=anchor_loss, constant_mean_squared_relative_error=constant, constant_as_good=constant <= relative,
        real_loss_spread=float(real.max() - real.min()), seeds=cfg.seeds, real_loss_by_seed=by_seed,
        seed_spearman=seed_spearman, fine_tunes_lowering_target_loss=lowering,
        estimated_update_norm=W.norm(dim=1).tolist(), fine_tune_subset=subset_of.tolist(),
        real_update_norm=[r.update_norm for r in tunes], real_projected_update_norm=U.norm(dim=1).tolist(),
        linearised_real_loss=linearised_real, real_updates=[r.update for r in tunes],
        progress_radius=progress.tolist(), radius=radius, measured_radius=measured, ranking_radius=ranking,
        variants=variants,
        curves=[{"subset": int(k), "seed": r.seed, "steps": [0, *r.curve_steps],
                 "target_loss": [anchor_loss, *r.curve_target_loss], "train_loss": r.train_loss,
                 "train_rows": r.train_rows, "seconds": round(r.seconds, 1)} for k, r in zip(subset_of, tunes)],
        approximation=approximation, lifted_factors=len(anchor.params),
        estimate_seconds=round(estimate_s, 3), label_rows_seconds=round(label_rows_s, 2),
        real_fine_tune_seconds=round(real_s, 1), time_ratio=round(real_s / max(estimate_s, 1e-9), 1),
        warnings=warnings, config=cfg.model_dump(mode="json"),
        failed_fine_tunes=[asdict(f) for f in failed],
    )
    _row_scores(rows["id"], data.f[evaluation], data.f[evaluation] + W @ data.G[evaluation].T, subset_of,
                tunes).write_parquet(out / "rows.parquet")
    result = asdict(report)
    (out / "calibration.json").write_text(json.dumps(result, indent=2))
    _plot(report, out / "calibration.png")
    return result


def _relative_error(real: np.ndarray, estimated: np.ndarray) -> float:
    """mean((real - estimated)^2 / real^2): the paper's estimation error."""
    return float(np.mean((real - estimated) ** 2 / real ** 2))


def _spearman(estimated: np.ndarray, real: np.ndarray) -> float | None:
    from scipy.stats import spearmanr

    return float(spearmanr(estimated, real).statistic) if len(real) > 2 else None


def _row_scores(ids: pl.Series, anchor: torch.Tensor, estimated: torch.Tensor, subset_of: torch.Tensor,
                tunes: list[FineTune]) -> pl.DataFrame:
    """f of every target validation row: the anchor's (source "anchor"), each subset's estimate
    (f* + g . w; "estimate") and each fine-tune's at each curve point ("fine-tune"), for offline
    analysis (e.g. the figures on fewer rows, one seed, or the mean over the last points)."""
    n, ids = len(ids), ids.to_numpy()

    def part(source: str, subset: int | None, seed: int | None, step: int | None, f) -> pl.DataFrame:
        return pl.DataFrame({"source": source, "subset": subset, "seed": seed, "step": step, "id": ids,
                             "f": np.asarray(f, dtype=np.float64)},
                            schema_overrides={"subset": pl.Int64, "seed": pl.Int64, "step": pl.Int64})

    return pl.concat([part("anchor", None, None, 0, anchor.numpy()),
                      *[part("estimate", k, None, None, estimated[k].numpy()) for k in range(len(estimated))],
                      *[part("fine-tune", k, tune.seed, step, scores) for k, tune in zip(subset_of.tolist(), tunes)
                        for step, scores in zip(tune.curve_steps, tune.curve_scores)]])


def _progress_radii(data, targets: list[str], chosen: np.ndarray, candidates: list[str], lam: float,
                    U: torch.Tensor, bisections: int = 24) -> torch.Tensor:
    """Per real fine-tune k, the radius r_k at which the estimator's fit of its subset gets as far
    on the subset's training rows, to first order, as the real update u_k does:
    L_S(w_{r_k}) = L_S(u_k), with L_S(w) = mean_{i in S} softplus(-(f*_i + g_i . w)).

    Why not |u_k| itself: the fit's w is the most efficient update of its size for the training
    loss, AdamW's is not (on the suite cos(w, u) ~ 0.36, and held to |w| = |u| the estimates
    promised ~0.08 more target-loss improvement than the fine-tunes delivered). Matched on
    training progress, an estimate stands for a fine-tune that got as far on its own rows.
    r_k <= |u_k| (u_k lies in that ball); found by bisection on [0, |u_k|]."""
    masks = subsets.fit_masks(data, targets, chosen, candidates)
    M = masks.to(data.G.dtype)

    def training_loss(W: torch.Tensor) -> torch.Tensor:
        return (M * torch.nn.functional.softplus(-(data.f + W @ data.G.T))).sum(1) / M.sum(1)

    goal = training_loss(U)
    lo, hi = torch.zeros(len(U), dtype=U.dtype), U.norm(dim=1)
    for _ in range(bisections):
        mid = (lo + hi) / 2
        ahead = training_loss(fit_within(data.G, data.f, masks, mid.clamp_min(1e-12), lam).w) <= goal
        lo, hi = torch.where(ahead, lo, mid), torch.where(ahead, mid, hi)
    return hi


def _variant(name: str, data, targets: list[str], chosen: np.ndarray, candidates: list[str],
             fitting: Fitting | list[Fitting], real: np.ndarray) -> Variant:
    """The estimates of `chosen` under another fit (one for all, or one per subset) against `real`."""
    fittings = fitting if isinstance(fitting, list) else [fitting] * len(chosen)
    W = torch.cat([subsets.fit_weights(data, targets, chosen[k:k + 1], candidates, fittings[k])
                   for k in range(len(chosen))])
    evaluation = torch.isin(data.task, torch.tensor([data.tasks.index(t) for t in targets])) & ~data.train
    loss = torch.nn.functional.softplus(-(data.f[evaluation] + W @ data.G[evaluation].T)).mean(1).numpy()
    return Variant(name, loss.tolist(), W.norm(dim=1).tolist(), _relative_error(real, loss), _spearman(loss, real))


def _real_fine_tunes(cfg: CalibrateConfig, train_ids: list[list[str]], eval_ids: list[str],
                     labels: dict[str, list[str]], examples: Path, out: Path
                     ) -> tuple[list[list[FineTune]], list[FailedTrial], float]:
    """Every subset's real fine-tunes (one per seed) as Ray Tune trials, retried up to
    `runtime.max_failures` times after a lost worker or node: per subset in subset order, its
    finished fine-tunes in seed order (fewer where one still failed); the failed ones; the
    fine-tunes' own seconds, summed (one CPU each).

    Each finished fine-tune is kept in OUT/fine-tunes/, named by everything it depends on (its
    rows, seed, budget, store and target rows), and a rerun reuses it: a calibration can grow
    (more subsets: random_subsets' first subsets do not change; more seeds) in several runs."""
    from ray import tune

    fixed = {"grads": str(Path(cfg.grads).resolve()), "examples": str(examples), "eval_ids": eval_ids,
             "labels": labels, "steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size,
             "eval_every": cfg.eval_every}
    kept = out / "fine-tunes"
    kept.mkdir(exist_ok=True)
    trials = [{"train_ids": ids, "index": i, "seed": cfg.seed + s,
               "keep": str(kept / f"{experiment_name('fine-tune', fixed, ids, cfg.seed + s)}.json")}
              for i, ids in enumerate(train_ids) for s in range(cfg.seeds)]
    runs: list[list[FineTune]] = [[] for _ in train_ids]
    missing = []
    for trial in trials:
        if Path(trial["keep"]).is_file():
            runs[trial["index"]].append(FineTune(**json.loads(Path(trial["keep"]).read_text())))
        else:
            missing.append(trial)
    failed: list[FailedTrial] = []
    if missing:
        info = runtime.start(cfg.runtime)
        tuner = tune.Tuner(
            tune.with_resources(fine_tune, {"cpu": 1}),
            param_space={**fixed, "trial": tune.grid_search(missing)},
            tune_config=tune.TuneConfig(max_concurrent_trials=max(1, int(info.cpus))),  # one torch thread each
            run_config=tune.RunConfig(name=experiment_name("calibrate", fixed, missing), verbose=0,
                                      **runtime.run_storage(cfg.runtime, out, "tune").run_config_kwargs(),
                                      failure_config=tune.FailureConfig(max_failures=cfg.runtime.max_failures)),
        )
        done, failed = finished(tuner.fit(), "calibration fine-tune")
        for result in done:  # kept here too: a trial on another node could not write into OUT
            trial = result.config["trial"]
            Path(trial["keep"]).write_text(result.metrics["result"])
            runs[trial["index"]].append(FineTune(**json.loads(result.metrics["result"])))
    runs = [sorted(per_subset, key=lambda r: r.seed) for per_subset in runs]
    return runs, failed, sum(r.seconds for per_subset in runs for r in per_subset)


def _plot(report: Calibration, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    estimated, real = np.array(report.estimated_loss), np.array(report.real_loss)
    fig, (ax, curves) = plt.subplots(1, 2, figsize=(11, 5))
    ax.scatter(real, estimated, label="first-order estimate")
    ax.scatter(real, np.full_like(real, report.anchor_loss), marker="x", color="#999999",
               label="constant: the anchor's loss")
    low = min(real.min(), estimated.min(), report.anchor_loss)
    high = max(real.max(), estimated.max(), report.anchor_loss)
    ax.plot([low, high], [low, high], color="#999999", linewidth=0.8)
    ax.set_xlabel(f"target loss after a real LoRA fine-tune (mean over {report.seeds} seed(s))")
    ax.set_ylabel("predicted target loss")
    ax.set_title("one dot per subset")
    ax.legend()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for curve in report.curves:
        colour = colours[curve["subset"] % len(colours)]
        curves.plot(curve["steps"], curve["target_loss"], marker=".", color=colour)
        curves.axhline(report.estimated_loss[curve["subset"]], color=colour, linestyle=":", linewidth=0.8)
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("target validation loss softplus(-f)")
    curves.set_title("real fine-tunes (dotted: each subset's estimate)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def show(report: dict) -> None:
    from engine.report import table

    constant = report["constant_mean_squared_relative_error"]
    table("Estimator calibration", None, [
        ("subsets fine-tuned for real", f"{len(report['real_loss'])} x {report['seeds']} seed(s)"),
        ("fine-tunes that lowered the target loss", f"{report['fine_tunes_lowering_target_loss']} of "
                                                    f"{len(report['curves'])}"),
        ("Spearman of one seed's real losses vs another's", "n/a" if report["seed_spearman"] is None
                                                            else f"{report['seed_spearman']:.3f}"),
        ("mean squared relative error", f"{report['mean_squared_relative_error']:.4f}"
                                        f" (constant predictor: {constant:.4f})"),
        ("Spearman (estimate vs real)", ("n/a" if report["spearman"] is None else f"{report['spearman']:.3f}")
         + " (a constant ranks nothing)"),
        ("spread of the real losses", f"{report['real_loss_spread']:.4f}"),
        ("update radius |w| <= R", f"{report['radius']}; measured {report['measured_radius']:.4f} (loss level)"),
        ("fit.radius for select-tasks", f"{report['ranking_radius']:.4f} (median |u|: ranks subsets)"),
        ("|w| estimated / |u| real (mean)", f"{np.mean(report['estimated_update_norm']):.4f} / "
                                            f"{np.mean(report['real_projected_update_norm']):.4f}"),
        ("first order at the real updates", f"relative error {_relative_error(np.array(report['real_loss']), np.array(report['linearised_real_loss'])):.4f}"),
        *[(f"variant: {v['name']}", f"relative error {v['mean_squared_relative_error']:.4f}, Spearman "
                                    + ("n/a" if v["spearman"] is None else f"{v['spearman']:.3f}"))
          for v in report["variants"]],
        ("accuracy: estimated / real (mean)", f"{np.mean(report['estimated_accuracy']):.3f} / "
                                              f"{np.mean(report['real_accuracy']):.3f}"),
        ("macro-F1: estimated / real (mean)", f"{np.mean(report['estimated_macro_f1']):.3f} / "
                                              f"{np.mean(report['real_macro_f1']):.3f}"),
        ("time: estimator / real fine-tunes", f"{report['estimate_seconds']:.2f} s / {report['real_fine_tune_seconds']:.1f} s "
                                              f"({report['time_ratio']}x)"),
    ])
    table("First-order approximation error (mean r_i^2)", ["update scale", "|P w|", "with gradient", "without"],
          [(a["scale"], round(a["update_norm"], 4), f"{a['mean_r2']:.2e}", f"{a['mean_r2_without_gradient']:.2e}")
           for a in report["approximation"]])
    for warning in report["warnings"]:
        print(f"warning: {warning}")
