"""`sift estimate --calibrate`: the estimator checked against the model it approximates.

(a) Approximation error: for w fitted on a subset and update sizes c, load theta* + P(c w) into
    the anchor model and compare the real outputs f_i with the first-order f*_i + c g_i . w:
    r_i = |f*_i + c g_i.w - f_i| / max(|f_i|, |f*_i|), with and without the gradient term.
(b) Real fine-tunes: random subsets are fine-tuned for real (LoRA from the anchor, CE on the
    answer tokens, which is softplus(-f) for one-token answers) as parallel Ray Tune trials, and
    their target validation loss is compared with the estimate: relative error, Spearman, time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from engine import runtime
from engine.config import CalibrateConfig
from engine.data.ingest import examples_path
from engine.errors import SiftError
from engine.features import objective
from engine.features.store import FeatureStore
from engine.select.tasks import subsets
from engine.models.anchor import Anchor
from engine.select.tasks.estimator import fit_subsets


def approximation_error(cfg: CalibrateConfig, examples: pl.DataFrame, store_rows: pl.DataFrame,
                        w: torch.Tensor) -> list[dict]:
    anchor = Anchor(cfg.grads)
    target_rows = store_rows.join(examples.select("id", "text", "split"), on="id") \
        .filter(pl.col("task").is_in(cfg.target) & (pl.col("split") == "validation")).head(cfg.eval_rows)
    vectors = FeatureStore(cfg.grads).vectors()[target_rows["row"].to_numpy()]
    encoded = anchor.encode(target_rows)
    if len(encoded) != target_rows.height:  # stored rows were encodable when featurized
        raise AssertionError("stored rows no longer encode; was the store built with another tokenizer?")
    g = torch.tensor(vectors, dtype=torch.float64)
    f_star = torch.tensor(target_rows["f"].to_numpy(), dtype=torch.float64)
    out = []
    for scale in cfg.scales:
        norm = anchor.load(w * scale)
        f_real = anchor.scores(encoded).double()
        linear = f_star + scale * (g @ w.double())
        denominator = torch.maximum(f_real.abs(), f_star.abs()).clamp_min(1e-12)
        r = (linear - f_real).abs() / denominator
        r0 = (f_star - f_real).abs() / denominator
        out.append({"scale": scale, "update_norm": norm, "mean_r2": float((r ** 2).mean()),
                    "mean_r2_without_gradient": float((r0 ** 2).mean()), "rows": len(encoded)})
    anchor.reset()
    return out


def fine_tune(trial: dict) -> None:
    """Ray Tune trial: LoRA fine-tune from the anchor on one subset; report the target loss."""
    from ray import tune

    trial = {**trial, **trial["trial"]}  # the grid-searched part, flattened (never mutate Tune's config)
    torch.set_num_threads(1)
    torch.manual_seed(trial["seed"])
    anchor = Anchor(Path(trial["grads"]), threads=1)
    examples = pl.read_parquet(trial["examples"])
    train = anchor.encode(examples.filter(pl.col("task").is_in(trial["tasks"]) & (pl.col("split") == "train")))
    evaluation = anchor.encode(examples.filter(pl.col("task").is_in(trial["target"])
                                               & (pl.col("split") == "validation")))
    optimizer = torch.optim.AdamW(anchor.trainable(), lr=trial["lr"], weight_decay=0.0)
    started = time.perf_counter()
    objective.train_steps(anchor.featurizer.score, optimizer, train, trial["steps"], trial["batch_size"], anchor.pad,
                          np.random.default_rng(trial["seed"]))
    f = anchor.scores(evaluation)
    tune.report({"loss": float(torch.nn.functional.softplus(-f).mean()), "accuracy": float((f > 0).float().mean()),
                 "train_seconds": time.perf_counter() - started})


def calibrate(cfg: CalibrateConfig) -> dict:
    if cfg.out is None or cfg.data is None or cfg.grads is None or not cfg.target:
        raise SiftError("estimate --calibrate needs --data, --grads, --target and --out")
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = subsets.load(cfg.grads, cfg.data, seed=cfg.seed, dtype=torch.float64)
    candidates = [t for t in data.tasks if t not in cfg.target]
    chosen = subsets.random_subsets(len(candidates), cfg.subsets, cfg.ratio, cfg.seed)
    started = time.perf_counter()
    est = subsets.estimate(data, cfg.target, chosen, candidates, lam=cfg.lam)
    estimate_s = time.perf_counter() - started

    data_path = examples_path(cfg.data)
    examples = pl.read_parquet(data_path)
    store_rows = FeatureStore(cfg.grads).rows().with_row_index("row")
    fit = fit_subsets(data.G, data.f, subsets.fit_masks(data, cfg.target, chosen[:1], candidates), lam=cfg.lam)
    approximation = approximation_error(cfg, examples, store_rows, fit.w[0])

    real, real_s = _real_fine_tunes(cfg, chosen, candidates, data_path.resolve(), out)
    estimated = est.loss
    relative = float(np.mean((real - estimated) ** 2 / real ** 2))
    from scipy.stats import spearmanr

    report = {
        "target": cfg.target, "subsets": [[c for c, on in zip(candidates, row) if on] for row in chosen],
        "estimated_loss": estimated.tolist(), "real_loss": real.tolist(),
        "mean_squared_relative_error": relative,
        "spearman": float(spearmanr(estimated, real).statistic) if len(real) > 2 else None,
        "estimate_seconds": round(estimate_s, 3), "real_fine_tune_seconds": round(real_s, 1),
        "time_ratio": round(real_s / max(estimate_s, 1e-9), 1),
        "approximation": approximation, "config": cfg.model_dump(mode="json"),
    }
    (out / "calibration.json").write_text(json.dumps(report, indent=2))
    _plot(estimated, real, out / "calibration.png")
    return report


def _real_fine_tunes(cfg: CalibrateConfig, chosen: np.ndarray, candidates: list[str], examples: Path,
                     out: Path) -> tuple[np.ndarray, float]:
    from ray import tune

    info = runtime.start(cfg.runtime)
    concurrent = max(1, int(info.cpus))  # one CPU and one torch thread per trial
    trials = [{"tasks": [*cfg.target, *[c for c, on in zip(candidates, row) if on]], "index": i}
              for i, row in enumerate(chosen)]
    fixed = {"grads": str(Path(cfg.grads).resolve()), "examples": str(examples), "target": cfg.target,
             "steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed}
    tuner = tune.Tuner(
        tune.with_resources(fine_tune, {"cpu": 1}),
        param_space={**fixed, "trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name="calibrate", storage_path=str(out / "tune"), verbose=0),
    )
    started = time.perf_counter()
    results = tuner.fit()
    elapsed = time.perf_counter() - started
    losses = np.full(len(trials), np.nan)
    for result in results:
        if result.error:
            raise SiftError(f"a calibration fine-tune failed: {str(result.error).splitlines()[0]}")
        losses[result.config["trial"]["index"]] = result.metrics["loss"]
    return losses, elapsed


def _plot(estimated: np.ndarray, real: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(real, estimated)
    low, high = min(real.min(), estimated.min()), max(real.max(), estimated.max())
    ax.plot([low, high], [low, high], color="#999999", linewidth=0.8)
    ax.set_xlabel("target loss after a real LoRA fine-tune")
    ax.set_ylabel("estimated target loss (first-order)")
    ax.set_title("estimator vs real fine-tuning, one dot per subset")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def show(report: dict) -> None:
    from engine.report import table

    table("Estimator calibration", None, [
        ("subsets fine-tuned for real", len(report["real_loss"])),
        ("mean squared relative error", f"{report['mean_squared_relative_error']:.4f}"),
        ("Spearman (estimate vs real)", "n/a" if report["spearman"] is None else f"{report['spearman']:.3f}"),
        ("time: estimator / real fine-tunes", f"{report['estimate_seconds']:.2f} s / {report['real_fine_tune_seconds']:.1f} s "
                                              f"({report['time_ratio']}x)"),
    ])
    table("First-order approximation error (mean r_i^2)", ["update scale", "|P w|", "with gradient", "without"],
          [(a["scale"], round(a["update_norm"], 4), f"{a['mean_r2']:.2e}", f"{a['mean_r2_without_gradient']:.2e}")
           for a in report["approximation"]])
