"""Why a boosting round is kept or rejected (issue 14, defect 4). Prints JSON.

    python jobs/bench/boosting.py --bench runs/bench-ensemble --variant ensemble-m3

On a trained ensemble of jobs/bench/ensemble.py (its group adapters and EM weights, no boosting),
one boosting round's residual adapter is fitted twice, with the same ridge (relative alpha 1) of
the residual r = 1 - p_ensemble(gold) of the training rows on two design matrices:

- `centred`: the gradient store's rows (the gradient of the answer score f, the gold answer's
  log-odds over the whole vocabulary), each task's mean row subtracted (sift before this fix);
- `label-odds`: the gradient at the anchor of each row's gold label-set log-odds, z_gold -
  logsumexp(z_other labels), with the store's projection (engine/ensemble/boost.py).

For each, at |P w| as fitted and as capped (the group adapters' median move from the anchor): how
well the first-order prediction X w of the change of each training row's gold label-set log-odds
matches the change the saved adapter really makes (Pearson r, least-squares slope), and what
adding it in label-logit space with step nu does to the training rows' mean residual and NLL and
to the validation NLL, at the nu of the validation line search and on a grid.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import torch

from engine.ensemble import boost, evaluate, manifest as manifest_io
from engine.ensemble.model import EnsembleModel
from engine.features.store import FeatureStore
from engine.models.anchor import Anchor
from engine.train.ensemble import _moves, _residuals, _stepped


def mean_over_tasks(manifest, scores, metric) -> float:
    return float(np.mean([metric(manifest, task, s) for task, s in scores.items()]))


def nll(manifest, task, s) -> float:
    return s.nll(manifest, task)


def residual(manifest, task, s) -> float:
    return float(1 - s.combined(manifest, task)[np.arange(len(s.gold)), s.gold].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", type=Path, default=Path("runs/bench-ensemble"))
    parser.add_argument("--variant", default="ensemble-m3")
    parser.add_argument("--alpha", type=float, default=1.0, help="ridge strength relative to the mean eigenvalue")
    parser.add_argument("--max-step", type=float, default=8.0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    bench = args.bench.resolve()
    grads, folder = bench / "grads", bench / args.variant
    work = bench / "boosting-diagnosis"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    for name in ("ensemble.json", "adapters"):
        (shutil.copytree if name == "adapters" else shutil.copy)(folder / name, work / name)
    loaded = manifest_io.load(work)
    groups = [a for a in loaded.adapters if a.kind in ("group", "anchor")]
    start = loaded.model_copy(update={"adapters": groups, "tasks": {
        t: e.model_copy(update={"boost": []}) for t, e in loaded.tasks.items()}})
    start = manifest_io.load(manifest_io.write(start, work))
    frame = pl.read_parquet(bench / "suite" / "examples.parquet").with_columns(pl.col("split").fill_null("train"))
    frame = frame.filter(pl.col("task").is_in(list(start.tasks)))
    train, validation = (frame.filter(pl.col("split") == s) for s in ("train", "validation"))
    ensemble = EnsembleModel.load(start)
    train_scores, val_scores = evaluate.score_rows(ensemble, train), evaluate.score_rows(ensemble, validation)
    r = torch.as_tensor(_residuals(start, train_scores, train))
    anchor = Anchor(grads)
    cap = float(np.median(_moves(anchor, [work / "adapters" / a.name for a in groups if a.kind == "group"])))

    store = FeatureStore(grads)  # sift's design before the fix: the store's rows of the training rows
    at = pl.DataFrame({"id": train["id"]}).join(store.rows().select("id").with_row_index("row"), on="id",
                                                 how="left", maintain_order="left")["row"].to_numpy()
    centred = torch.as_tensor(np.array(store.vectors())[at], dtype=torch.float64)
    tasks = train["task"].to_numpy()
    for task in np.unique(tasks):
        rows = torch.as_tensor(tasks == task)
        centred[rows] -= centred[rows].mean(0)
    X, odds = boost.design(anchor, ensemble.tokenizer, start, train)

    # Rows of `train` in the order score_rows keeps them (sorted by task, then row order).
    order = np.concatenate([np.flatnonzero(tasks == task) for task in sorted(train_scores)])
    anchor_name = start.anchor
    anchor_odds = np.concatenate([train_scores[t].gold_odds(anchor_name) for t in sorted(train_scores)])
    out = {"variant": args.variant, "train_rows": train.height, "validation_rows": validation.height,
           "train_residual": float(r.mean()), "train_nll": mean_over_tasks(start, train_scores, nll),
           "validation_nll": mean_over_tasks(start, val_scores, nll), "cap": cap,
           "label_odds_check": float(np.abs(odds.numpy()[order] - anchor_odds).max()), "designs": {}}
    for design, M in (("centred", centred), ("label-odds", X)):
        w = boost.residual_w(M, r, boost.relative_alpha(M, args.alpha))
        predicted = (M @ w).numpy()
        # What the ridge asks of the margins: r > 0 on every row; a design centred per task can
        # only ask for changes that average 0 over each task's rows.
        record = {"fit_mean_predicted_change": float(predicted.mean()),
                  "fit_pearson_with_residual": float(np.corrcoef(predicted, r.numpy())[0, 1]), "norms": {}}
        for label, limit in (("fitted", float("inf")), ("capped", cap)):
            name = f"boost-{design}-{label}"
            fitted, saved = boost.save_adapter(anchor, w, work / "adapters" / name, limit)
            entry = manifest_io.AdapterEntry(name=name, path=f"adapters/{name}", kind="boost",
                                             tasks=list(start.tasks), rank=start.adapters[0].rank)
            held = start.model_copy(update={"adapters": [*start.adapters, entry]})
            ensemble.update(manifest_io.load(manifest_io.write(held, work)))
            for scores, rows in ((train_scores, train), (val_scores, validation)):
                for task, s in evaluate.score_rows(ensemble, rows, models=[name]).items():
                    scores[task].logprobs[name] = s.logprobs[name]
            actual = np.concatenate([train_scores[t].gold_odds(name) for t in sorted(train_scores)]) - anchor_odds
            expected = predicted[order] * (saved / fitted)
            nu, val_nll = boost.line_search(lambda v: mean_over_tasks(_stepped(held, name, v), val_scores, nll),
                                            args.max_step)
            grid = {}
            for v in sorted({0.25, 0.5, 1.0, 2.0, 4.0, 8.0, round(nu, 3)}):
                stepped = _stepped(held, name, v)
                grid[str(v)] = {"train_residual": mean_over_tasks(stepped, train_scores, residual),
                                "train_nll": mean_over_tasks(stepped, train_scores, nll),
                                "validation_nll": mean_over_tasks(stepped, val_scores, nll)}
            record["norms"][label] = {
                "norm": saved, "fitted_norm": fitted,
                "first_order_pearson": float(np.corrcoef(expected, actual)[0, 1]),
                "first_order_slope": float(expected @ actual / (expected @ expected)),
                "mean_predicted_change": float(expected.mean()), "mean_actual_change": float(actual.mean()),
                "line_search_step": nu, "line_search_validation_nll": val_nll, "by_step": grid}
            ensemble.update(start)
        out["designs"][design] = record
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
