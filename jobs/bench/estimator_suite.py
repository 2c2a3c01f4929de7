"""The estimator on the real suite: noisy-label check and calibration against real fine-tunes.
Prints one JSON object.

    python jobs/bench/estimator_suite.py                              # SmolLM2-135M, meta anchor, LoRA on its top 4 layers
    python jobs/bench/estimator_suite.py --anchor fresh
    python jobs/bench/estimator_suite.py --model tiny-llama --layers ""
    python jobs/bench/estimator_suite.py --anchor meta --meta-epochs 1 --per-task 100 --target-rows 100 \
        --calibrate-subsets 8 --seeds 1 --out /tmp/bench       # issue 14's figures (split: see below)

Steps (all through the `sift` commands): suite with 4 noisy groups of wordnet-animal-plant (2 with
shuffled labels) -> [--anchor meta: train-lora on every task, or --anchor-adapter DIR] -> projected
gradients at the anchor -> select-tasks for the target -> estimate --calibrate (called in-process;
`sift estimate --calibrate --set seeds=K` is the same).
The noisy-label check passes when both clean groups rank above both shuffled ones. The targets
(issue 14): mean r^2 at the smallest update <= 0.01 and below the error without the gradient
term; Spearman >= 0.9 over >= 8 real fine-tunes, beside the constant predictor's relative error;
relative error <= 5%.

How the real fine-tunes are judged (issue 14): one fine-tune's target loss moves by ~0.02-0.04
between batch orders and between its last evaluation points, as much as the subsets differ, so
on 20 target rows and one seed the real ranking is mostly noise. `--target-rows N` gives the
target N validation rows (its training rows stay 80% of --per-task), `--seeds K` fine-tunes each
subset K times (the real loss is their mean; the seeds' own Spearman is the ceiling), and
`protocols` in the output judges the same fine-tunes and estimates on the first 20 rows or all,
one seed or all, the last evaluation point or the mean of the last two (calibrate's rows.parquet).
Every step's output in --out is reused by a rerun (finished fine-tunes included), so a long
calibration can be split: `--until select`, then `--calibrate-subsets 4`, then 8.

The calibration holds each estimate to the update radius the real fine-tunes measured (|w| <=
the median |u| = |P^T (theta - theta*)| of the other fine-tunes; engine/select/tasks/calibrate.py)
and reports the converged fit (no radius, what sift did before) beside it against the same
fine-tunes. `--radius R` gives select-tasks (and --approximation-only) fit.radius = R, e.g. a
calibration's `measured_radius`; without it they use the converged fit.

    python jobs/bench/estimator_suite.py --approximation-only --anchor fresh   # no Ray, minutes

only measures the first-order approximation error in-process, at a fresh anchor, side by side:
theta* + P w lifted onto the factors with a gradient (the store's parameters.json, what sift does),
onto every LoRA factor (what sift did before issue 14), and no update term at all.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import polars as pl

from engine.cli import main as sift

TASKS = "[tweet-polarity, wordnet-animal-plant, wordnet-person-location, wordnet-food-artifact, fortunes-law-politics]"


def run(*args: str) -> None:
    code = sift(list(args))
    if code != 0:
        raise SystemExit(f"sift {' '.join(args)} failed with {code}")


def approximation_only(args) -> dict:
    """Mean r_i^2 on the target's rows at a fresh anchor: lifting onto the live factors, onto every
    factor (the pre-issue-14 lift), and without the gradient term; w fitted on the target's rows."""
    import tempfile

    import torch

    from engine.config import GradsConfig, LoraSpec
    from engine.data import suite
    from engine.features.grads import GradFeaturizer
    from engine.features.projection import Projector
    from engine.models.anchor import Anchor
    from engine.select.tasks.estimator import fit_subsets, fit_within

    store = Path(tempfile.mkdtemp())
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    cfg = GradsConfig(model=args.model, out=str(store), dim=400, max_length=args.max_length,
                      lora=LoraSpec(layers=layers))
    (store / "config.json").write_text(cfg.model_dump_json())
    frame = suite.build(per_task=args.per_task, tasks=[args.target])
    t = time.perf_counter()
    featurized = GradFeaturizer(cfg, threads=torch.get_num_threads())(frame)
    featurize_s = time.perf_counter() - t
    G = torch.tensor(featurized.vectors, dtype=torch.float64)
    f = torch.tensor(featurized.rows["f"].to_numpy(), dtype=torch.float64)
    every_row = torch.ones(1, len(f), dtype=torch.bool)
    w = (fit_within(G, f, every_row, args.radius, lam=args.lam) if args.radius else fit_subsets(G, f, every_row, lam=args.lam)).w[0]
    anchor = Anchor(store)
    encoded = anchor.encode(frame.filter(pl.col("id").is_in(featurized.rows["id"].to_list())))
    every = Projector({n: p.numel() for n, p in anchor.lora.items()}, cfg.dim, cfg.seed)
    rows = []
    for scale in args.scales:
        result = {"scale": scale}
        for lift in ("live factors (sift now)", "every factor (before)"):
            if lift.startswith("live"):
                size = anchor.load(w * scale)
            else:
                anchor.reset()
                lifted = every.lift((w * scale).float())
                with torch.no_grad():
                    for name, delta in lifted.items():
                        anchor.lora[name].add_(delta.view_as(anchor.lora[name]))
                size = float(sum(v.norm() ** 2 for v in lifted.values()) ** 0.5)
            f_real = anchor.scores(encoded).double()
            denominator = torch.maximum(f_real.abs(), f.abs()).clamp_min(1e-12)
            result[lift] = {"update_norm": round(size, 3),
                            "mean_r2": float((((f + scale * (G @ w) - f_real) / denominator) ** 2).mean()),
                            "mean_r2_without_gradient": float((((f - f_real) / denominator) ** 2).mean())}
        rows.append(result)
    anchor.reset()
    return {"model": args.model, "lora_layers": args.layers or "all", "anchor": "fresh", "target": args.target,
            "rows": len(encoded), "lam": args.lam, "radius": args.radius, "lifted_factors": len(anchor.params),
            "lora_factors": len(anchor.lora), "featurize_s": round(featurize_s, 1), "approximation": rows}


def build_suite(out: Path, per_task: int, target: str, target_rows: int | None) -> None:
    """`sift suite` with 4 noisy groups (2 shuffled); with `target_rows`, the target keeps its
    training rows (80% of per_task) and gets `target_rows` validation rows, drawn from the same
    corpus in the same way: the rows every estimate and every real fine-tune are scored on."""
    if target_rows is None:
        run("suite", "--out", str(out), "--per-task", str(per_task), "--set", f"tasks={TASKS}",
            "--noisy-groups", "4", "--noisy-shuffled", "2")
        return
    from engine.data import suite

    train = per_task - round(0.2 * per_task)
    others = [t for t in TASKS.strip("[]").split(", ") if t != target]
    frame = pl.concat([suite.build(per_task, tasks=others, noisy_groups=4, noisy_shuffled=2),
                       suite.build(train + target_rows, validation=target_rows / (train + target_rows),
                                   tasks=[target])])
    out.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(out / "suite.parquet")
    run("ingest", str(out / "suite.parquet"), "--out", str(out))


def protocol(calibration: Path, first_rows: int) -> list[dict]:
    """The same fine-tunes and estimates judged under each protocol, from calibrate's rows.parquet:
    the real loss of a subset on the first `first_rows` target rows or all of them, from its
    first seed or the mean over its seeds, at the last curve point or the mean of the last two."""
    import numpy as np
    from scipy.stats import spearmanr

    rows = pl.read_parquet(calibration / "rows.parquet").with_columns(loss=(-pl.col("f")).exp().log1p())
    ids = rows.filter(pl.col("source") == "anchor")["id"]
    steps = sorted(rows.filter(pl.col("source") == "fine-tune")["step"].unique())
    seeds = sorted(rows.filter(pl.col("source") == "fine-tune")["seed"].unique())
    out = []
    for n in (first_rows, len(ids)):
        scored = rows.filter(pl.col("id").is_in(ids.head(n).to_list()))
        anchor = scored.filter(pl.col("source") == "anchor")["loss"].mean()
        estimated = scored.filter(pl.col("source") == "estimate").group_by("subset").agg(pl.col("loss").mean()) \
            .sort("subset")["loss"].to_numpy()
        judged = [("first seed", seeds[:1])] + ([(f"mean of {len(seeds)} seeds", seeds)] if len(seeds) > 1 else [])
        for which, chosen_seeds in judged:
            for point, chosen_steps in ((f"step {steps[-1]}", steps[-1:]),
                                        (f"mean of steps {steps[-2]}, {steps[-1]}", steps[-2:])):
                tuned = scored.filter((pl.col("source") == "fine-tune") & pl.col("seed").is_in(chosen_seeds)
                                      & pl.col("step").is_in(chosen_steps))
                per_seed = tuned.group_by("subset", "seed").agg(pl.col("loss").mean()).sort("subset", "seed")
                real = per_seed.group_by("subset").agg(pl.col("loss").mean()).sort("subset")["loss"].to_numpy()
                by_seed = per_seed.pivot(on="seed", index="subset", values="loss").sort("subset").drop("subset")
                out.append({
                    "target_rows": n, "real_loss": which, "point": point,
                    "spearman": round(float(spearmanr(estimated, real).statistic), 3),
                    "spearman_p": round(float(spearmanr(estimated, real).pvalue), 3),
                    "relative_error": round(float(np.mean((real - estimated) ** 2 / real ** 2)), 4),
                    "constant_relative_error": round(float(np.mean((real - anchor) ** 2 / real ** 2)), 4),
                    "real_spread": round(float(real.max() - real.min()), 4),
                    "seed_spearman": round(float(spearmanr(by_seed[:, 0], by_seed[:, 1]).statistic), 3)
                    if by_seed.width >= 2 else None})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="26,27,28,29", help="LoRA layers (empty: all)")
    parser.add_argument("--per-task", type=int, default=120)
    parser.add_argument("--target", default="wordnet-animal-plant")
    parser.add_argument("--target-rows", type=int, help="the target's validation rows (default: 20%% of --per-task)")
    parser.add_argument("--subsets", type=int, default=200)
    parser.add_argument("--calibrate-subsets", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=1, help="real fine-tunes per subset (batch orders); "
                                                            "the real loss is their mean")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--lam", type=float, default=1e-2)
    parser.add_argument("--radius", type=float, help="select-tasks' fit.radius (e.g. a calibration's "
                                                     "measured_radius); default: the converged fit")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--objective", choices=["answer", "labels"], default="labels",
                        help="the gradient store's f (featurize grads' objective)")
    parser.add_argument("--anchor", choices=["fresh", "meta"], default="meta",
                        help="meta: first train one LoRA on every task (train-lora), take gradients there")
    parser.add_argument("--anchor-adapter", type=Path, help="a meta anchor trained before (skips train-lora)")
    parser.add_argument("--meta-epochs", type=int, default=2)
    parser.add_argument("--scales", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5, 1.0, 2.0],
                        help="--approximation-only: update sizes, multiples of the fitted w")
    parser.add_argument("--approximation-only", action="store_true",
                        help="only the approximation error, in-process, lifts side by side (with --anchor fresh)")
    parser.add_argument("--until", choices=["select", "calibrate"], default="calibrate",
                        help="stop after this step (a later run with the same --out goes on from there)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-estimator"))
    args = parser.parse_args()
    if args.approximation_only:
        print(json.dumps(approximation_only(args), indent=2))
        return
    out = args.out
    timings = {}
    started = time.perf_counter()

    def step(name: str, done: Path, *command) -> None:
        """Run a step unless `done` shows an earlier run in this --out finished it."""
        if done.exists():
            timings[f"{name}_s"] = "reused"
            return
        t = time.perf_counter()
        command[0](*command[1:])
        timings[f"{name}_s"] = round(time.perf_counter() - t, 1)

    step("suite", out / "suite" / "summary.json", build_suite, out / "suite", args.per_task, args.target,
         args.target_rows)
    grads = ["featurize", "grads", "--data", str(out / "suite"), "--out", str(out / "grads"), "--model", args.model,
             "--max-length", str(args.max_length), "--dim", "400", "--set", f"objective={args.objective}"]
    if args.layers:
        grads += ["--layers", args.layers]
    if args.anchor == "meta" and args.anchor_adapter:
        grads += ["--adapter", str(args.anchor_adapter)]
    elif args.anchor == "meta":
        train = ["train-lora", "--data", str(out / "suite"), "--model", args.model, "--out", str(out / "anchor"),
                 "--epochs", str(args.meta_epochs), "--set", f"max_length={args.max_length}",
                 "--set", f"objective={args.objective}"]  # the anchor learns the loss the store's f scores
        if args.layers:
            train += ["--set", f"lora.layers=[{args.layers}]"]
        step("meta_anchor", out / "anchor" / "adapter" / "adapter_model.safetensors", run, *train)
        grads += ["--adapter", str(out / "anchor" / "adapter")]
    t = time.perf_counter()
    run(*grads)  # a finished store for the same request is kept as it is
    timings["grads_s"] = round(time.perf_counter() - t, 1)
    select_out = out / ("select" if args.radius is None else f"select-radius-{args.radius:g}")
    select = ["select-tasks", "--data", str(out / "suite"), "--grads", str(out / "grads"), "--target", args.target,
              "--out", str(select_out), "--subsets", str(args.subsets), "--set", f"lam={args.lam}"]
    step("select_tasks", select_out / "report.json", run,
         *select, *(["--set", f"fit.radius={args.radius}"] if args.radius else []))
    tasks = pl.read_parquet(select_out / "tasks.parquet")
    rank = {t: i for i, t in enumerate(tasks["task"].to_list())}  # sorted: most helpful first
    clean, shuffled = ["noisy-group-0", "noisy-group-1"], ["noisy-group-2", "noisy-group-3"]
    report = json.loads((select_out / "report.json").read_text())
    result = {
        "model": args.model, "lora_layers": args.layers or "all", "target": args.target, "anchor": args.anchor,
        "settings": {"per_task": args.per_task, "target_rows": args.target_rows, "max_length": args.max_length,
                     "lam": args.lam, "steps": args.steps, "lr": args.lr, "fine_tunes": args.calibrate_subsets,
                     "seeds": args.seeds, "select_tasks_radius": args.radius},
        "task_ranking": dict(zip(tasks["task"].to_list(), [round(v, 5) for v in tasks["ensemble_score"]])),
        "noisy_check_passed": max(rank[c] for c in clean) < min(rank[s] for s in shuffled),
        "selected": report["selected"], "estimates": report["estimates"]}
    if args.until == "calibrate":
        from engine.config import CalibrateConfig
        from engine.select.tasks.calibrate import calibrate

        t = time.perf_counter()
        calibrate(CalibrateConfig(data=str(out / "suite"), grads=str(out / "grads"), target=[args.target],
                                  out=str(out / "calibrate"), subsets=args.calibrate_subsets, steps=args.steps,
                                  lam=args.lam, lr=args.lr, eval_every=args.eval_every, seeds=args.seeds))
        timings["calibrate_s"] = round(time.perf_counter() - t, 1)
        calibration = json.loads((out / "calibrate" / "calibration.json").read_text())
        result |= {
            "approximation_at_smallest_update": min(calibration["approximation"], key=lambda a: a["scale"]),
            "calibration": {k: calibration[k] for k in (
                "mean_squared_relative_error", "spearman", "constant_mean_squared_relative_error",
                "constant_as_good", "seed_spearman", "anchor_loss", "real_loss_spread",
                "fine_tunes_lowering_target_loss", "estimate_seconds", "real_fine_tune_seconds", "time_ratio",
                "approximation", "lifted_factors", "radius", "measured_radius", "variants",
                "estimated_update_norm", "real_projected_update_norm", "real_update_norm", "linearised_real_loss",
                "estimated_loss", "real_loss", "real_loss_by_seed", "estimated_accuracy", "real_accuracy",
                "estimated_macro_f1", "real_macro_f1", "warnings")},
            "root_mean_squared_relative_error": {
                "estimator": calibration["mean_squared_relative_error"] ** 0.5,
                "constant": calibration["constant_mean_squared_relative_error"] ** 0.5,
                **{v["name"]: v["mean_squared_relative_error"] ** 0.5 for v in calibration["variants"]}},
            "protocols": protocol(out / "calibrate", first_rows=20),
            "target_losses_along_the_fine_tunes": [c["target_loss"] for c in calibration["curves"]]}
    result["seconds"] = {**timings, "total": round(time.perf_counter() - started, 1)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
