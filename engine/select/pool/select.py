"""`sift select-pool`: score every candidate of a pool for a target, pick the budget, report.

Outputs in OUT: scores.parquet (every scored candidate: id, score, rank, selected; rank 1 is
chosen first), selected.parquet (the chosen rows with all their columns), quarantine.parquet
(rows lost upstream, with the stage and reason), report.json and report.png. The counts add up:
rows_in = quarantined + selected + not_selected.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

from engine import runtime
from engine.config import SelectPoolConfig
from engine.errors import SiftError
from engine.report import table
from engine.select.pool import baselines
from engine.select.pool.gotd import gotd_scores
from engine.select.pool.inputs import Candidates, check_same_encoder, resolve

NEEDS = {"gotd": "embeddings", "knn": "embeddings", "grad-cosine": "grads", "dsir": "texts", "random": "any"}


def budget_rows(budget: float | None, pool_size: int) -> int:
    if budget is None:
        raise SiftError("select-pool needs --budget (rows, or a fraction of the pool below 1)")
    if budget < 1:
        return max(1, round(budget * pool_size))
    if budget != int(budget):
        raise SiftError(f"--budget {budget} must be a whole number of rows, or a fraction below 1")
    if budget > pool_size:
        raise SiftError(f"--budget {int(budget)} is larger than the pool ({pool_size} candidates after quarantine); "
                        "use a smaller budget or a fraction such as 0.1")
    return int(budget)


def select_pool(cfg: SelectPoolConfig) -> dict:
    if cfg.out is None:
        raise SiftError("select-pool needs --out DIR")
    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    runtime.start(cfg.runtime)
    need = NEEDS[cfg.method]
    pool = resolve(cfg.pool, "pool", cfg, need)
    target = resolve(cfg.target, "target", cfg, need)
    check_same_encoder(pool, target)
    candidates = pool.rows()
    if candidates.height == 0:
        raise SiftError(f"the pool is empty: none of its {pool.rows_in} rows survived ingest and featurization "
                        f"(see {out / 'quarantine.parquet'})")
    pool.quarantine.write_parquet(out / "quarantine.parquet")
    k = budget_rows(cfg.budget, candidates.height)
    prepared = time.perf_counter()
    scores, details = _scores(cfg, pool, target, candidates)
    scored = time.perf_counter()

    order = np.lexsort((np.arange(len(scores)), -scores))  # best first; ties keep pool order
    rank = np.empty(len(scores), dtype=np.int64)
    rank[order] = np.arange(1, len(scores) + 1)
    keep = [c for c in ("id", "task") if c in candidates.columns]
    result = candidates.select(keep).with_columns(
        score=pl.Series(scores), rank=pl.Series(rank), selected=pl.Series(rank <= k)).sort("rank")
    result.write_parquet(out / "scores.parquet")
    chosen = result.filter(pl.col("selected")).select("id", "rank", "score")
    full = pl.read_parquet(pool.examples) if pool.examples is not None else candidates
    chosen.join(full, on="id", how="left").sort("rank").write_parquet(out / "selected.parquet")

    report = {
        "method": cfg.method,
        "variant": cfg.variant,
        "budget": k,
        "counts": {
            "rows_in": pool.rows_in,
            "quarantined": pool.quarantine.height,
            "scored": candidates.height,
            "selected": k,
            "not_selected": candidates.height - k,
            "target_rows": target.rows().height,
        },
        "details": details,
        "warnings": _warnings(details),
        "seconds": {"inputs": round(prepared - started, 3), "scoring": round(scored - prepared, 3),
                    "total": round(time.perf_counter() - started, 3)},
        "selected_by_task": _by_task(result.filter(pl.col("selected"))),
        "pool_by_task": _by_task(result),
        "config": cfg.model_dump(mode="json"),
    }
    counts = report["counts"]
    if counts["rows_in"] != counts["quarantined"] + counts["scored"]:
        raise AssertionError(f"select-pool lost rows: {counts}")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    _plot(result, report, out / "report.png")
    for line in report["warnings"]:
        print(f"sift: warning: {line}", file=sys.stderr)
    return report


def _warnings(details: dict) -> list[str]:
    """One line per solve that stopped short of its threshold: its ranking may be unreliable.

    Printed by select_pool itself, so every caller (the command, the pipeline) shows it.
    """
    lines = []
    if details.get("converged") is False:
        lines.append(f"Sinkhorn did not converge: L1 marginal error {details['marginal_error']:.3g} > "
                     f"{details['threshold']:g} after {details['iterations']} iterations at "
                     f"epsilon={details['eps']:g}; the ranking may be unreliable (raise max_iter or epsilon)")
    unconverged = details.get("domains", {}).get("unconverged")
    if unconverged:
        lines.append(f"the domain test's Sinkhorn did not converge for {', '.join(unconverged)} (threshold "
                     f"{details['threshold']:g}); their OT costs may be off (raise max_iter or epsilon)")
    return lines


def _scores(cfg: SelectPoolConfig, pool: Candidates, target: Candidates, candidates: pl.DataFrame):
    if cfg.method == "random":
        return baselines.random_scores(candidates.height, cfg.seed), {}
    if cfg.method == "dsir":
        texts = target.texts()["text"].to_list()
        _nonempty(texts)
        return baselines.dsir_scores(pool.texts()["text"].to_list(), texts, cfg.dsir_buckets, cfg.seed), {}
    target_vectors = np.asarray(target.store.vectors())
    _nonempty(target_vectors)
    if target_vectors.shape[1] != pool.store.spec.dim:
        raise SiftError(f"pool features are {pool.store.spec.dim}-d but target features are "
                        f"{target_vectors.shape[1]}-d; compute both with the same model and settings")
    if cfg.method == "knn":
        scores = baselines.knn_scores(pool.store.vectors(), target_vectors, cfg.knn_k)
        return (scores if cfg.variant == "clean" else -scores), {"k": cfg.knn_k}
    if cfg.method == "grad-cosine":
        scores = baselines.grad_cosine_scores(pool.store.vectors(), target_vectors)
        return (scores if cfg.variant == "clean" else -scores), {}
    return gotd_scores(pool.store, target_vectors, cfg)


def _nonempty(target) -> None:
    if len(target) == 0:
        raise SiftError("the target is empty: no target row survived ingest and featurization")


def _by_task(frame: pl.DataFrame) -> dict[str, int]:
    if "task" not in frame.columns:
        return {"(all)": frame.height}
    counted = frame.group_by(pl.col("task").fill_null("(none)")).len().sort("len", descending=True)
    return dict(counted.rows())


def _plot(result: pl.DataFrame, report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    finite = result.filter(pl.col("score").is_finite())  # -inf: dropped by the domain test
    scores = finite["score"].to_numpy()
    selected = finite["selected"].to_numpy()
    bins = np.histogram_bin_edges(scores, bins=60)
    left.hist(scores[~selected], bins=bins, color="#bbbbbb", label="not selected")
    left.hist(scores[selected], bins=bins, color="#d62728", label="selected")
    left.set_title(f"{report['method']} scores (higher = chosen first)")
    left.set_xlabel("score")
    left.legend()
    pool_by, chosen_by = report["pool_by_task"], report["selected_by_task"]
    names = list(pool_by)
    x = np.arange(len(names))
    right.bar(x - 0.2, [pool_by[n] / max(sum(pool_by.values()), 1) for n in names], 0.4, label="pool", color="#bbbbbb")
    right.bar(x + 0.2, [chosen_by.get(n, 0) / max(report["budget"], 1) for n in names], 0.4, label="selected",
              color="#d62728")
    right.set_xticks(x, names, rotation=30, ha="right")
    right.set_ylabel("share")
    right.set_title("share by source")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def show(report: dict, out: Path) -> None:
    counts, details = report["counts"], report["details"]
    rows = [("method", f"{report['method']} ({report['variant']})"), *counts.items()]
    if "converged" in details:
        rows += [("OT support", f"{details['support']}: {details['support_size']:,} pool x {details['target_size']:,} target"),
                 ("Sinkhorn", f"{details['iterations']} iterations, L1 marginal error {details['marginal_error']:.2g} "
                              f"(threshold {details['threshold']:g}): "
                              f"{'converged' if details['converged'] else 'NOT converged'}")]
    rows += [("seconds", f"{report['seconds']['total']:.1f} (scoring {report['seconds']['scoring']:.1f})"),
             ("outputs", f"{out}/scores.parquet, selected.parquet, report.json, report.png")]
    table(f"select-pool -> {out}", None, rows)
    table("Selected by source", ["source", "pool", "selected"],
          [(name, n, report["selected_by_task"].get(name, 0)) for name, n in report["pool_by_task"].items()])
