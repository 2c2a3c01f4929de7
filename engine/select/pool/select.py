"""`sift select-pool`: score every candidate of a pool for a target, pick the budget, report.

Outputs in OUT (a local folder or a URI; written through `engine.storage`): scores.parquet (every
scored candidate: id, score, rank, selected; rank 1 is chosen first), selected.parquet (the chosen
rows with all their columns), quarantine.parquet (rows lost upstream, with the stage and reason),
report.json and report.png; OUT/pool and OUT/target hold what was derived from text inputs. The
counts add up: rows_in = quarantined + selected + not_selected.

Driver memory: rows, vectors and texts pass through a shard or a parquet batch at a time. What
the driver holds whole is one score per candidate (float64, 8 bytes) and, while ranking, its
sort order and rank (two int64s): about 25 bytes per candidate at the peak; with the domain test,
the row numbers of the kept sources' rows (int64, 8 bytes each) too. The target's vectors are
held whole (4·dim bytes per target row): the Sinkhorn solve and every c-transform use all of them.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from engine import runtime, storage
from engine.config import SelectPoolConfig
from engine.errors import SiftError
from engine.paths import cache_dir
from engine.report import table
from engine.select.pool import baselines, inputs
from engine.select.pool.gotd import gotd_scores
from engine.select.pool.inputs import Candidates, check_same_encoder, resolve

RUN_ROWS = 1 << 18  # rows per sorted run of scores.parquet's merge
RUN_GROUP_ROWS = 8192  # parquet row group of a run: the unit a merge step reads
MERGE_ROWS = 1 << 19  # ranks per merge step: the most rows of scores.parquet in memory at once
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
    out = storage.absolute(cfg.out)
    if not storage.is_remote(out):
        os.makedirs(out, exist_ok=True)  # scores.parquet is streamed into it
    runtime.start(cfg.runtime)
    need = NEEDS[cfg.method]
    pool = resolve(cfg.pool, "pool", cfg, need)
    target = resolve(cfg.target, "target", cfg, need)
    check_same_encoder(pool, target)
    scored = pool.count()
    if scored == 0:
        raise SiftError(f"the pool is empty: none of its {pool.rows_in} rows survived ingest and featurization "
                        f"(see {storage.join(out, 'quarantine.parquet')})")
    storage.write_parquet(pool.quarantine, storage.join(out, "quarantine.parquet"))
    k = budget_rows(cfg.budget, scored)
    prepared = time.perf_counter()
    scores, details = _scores(cfg, pool, target)
    scoring_done = time.perf_counter()
    ranking = _write_scores(pool, scores, k, out)
    _write_selected(pool, ranking.chosen, out)

    report = {
        "method": cfg.method,
        "variant": cfg.variant,
        "budget": k,
        "counts": {
            "rows_in": pool.rows_in,
            "quarantined": pool.quarantine.height,
            "scored": scored,
            "selected": k,
            "not_selected": scored - k,
            "target_rows": target.count(),
        },
        "details": details,
        "warnings": _warnings(details),
        "derived": {"pool": pool.derived, "target": target.derived},
        "seconds": {"inputs": round(prepared - started, 3), "scoring": round(scoring_done - prepared, 3),
                    "total": round(time.perf_counter() - started, 3)},
        "selected_by_task": _ranked(ranking.selected_by_task),
        "pool_by_task": _ranked(ranking.pool_by_task),
        "config": cfg.model_dump(mode="json"),
    }
    counts = report["counts"]
    if counts["rows_in"] != counts["quarantined"] + counts["scored"]:
        raise AssertionError(f"select-pool lost rows: {counts}")
    storage.write_json(storage.join(out, "report.json"), report)
    _plot(scores, ranking.selected, report, storage.join(out, "report.png"))
    for line in report["warnings"]:
        print(f"sift: warning: {line}", file=sys.stderr)
    return report


@dataclass
class Ranking:
    """What the pass that writes scores.parquet learns on the way."""

    selected: np.ndarray  # bool per candidate, in pool order
    chosen: pl.DataFrame  # the selected candidates' rows with rank and score, best first
    pool_by_task: Counter  # candidates per source (task column; "(all)" without one)
    selected_by_task: Counter


def rank_of(scores: np.ndarray) -> np.ndarray:
    """Rank per candidate, 1 = best: by score, ties in pool order (a stable sort of -scores, the
    same order as np.lexsort((arange, -scores)) without its N-row index)."""
    np.negative(scores, out=scores)  # in place and back (exact): no second N-row array of scores
    order = np.argsort(scores, kind="stable")
    np.negative(scores, out=scores)
    rank = np.empty(len(scores), dtype=np.int64)
    for start in range(0, len(order), MERGE_ROWS):  # rank[order] = 1..N, without an N-row arange
        chunk = order[start:start + MERGE_ROWS]
        rank[chunk] = np.arange(start + 1, start + 1 + len(chunk))
    return rank


def _write_scores(pool: Candidates, scores: np.ndarray, k: int, out: str) -> Ranking:
    """scores.parquet (id, task, score, rank, selected; best first), written without the pool's
    rows ever in memory at once: the rows are read in pool order, a batch at a time, and written
    sorted by rank into runs of RUN_ROWS rows (local scratch files); the runs are then merged
    MERGE_ROWS ranks at a time (each run sorted by rank, so parquet statistics skip what a merge
    step does not need) into scores.parquet, streamed to OUT (a multipart upload on S3)."""
    with tempfile.TemporaryDirectory(dir=cache_dir("work"), prefix="select-pool-runs-") as scratch:
        return _write_sorted_runs(pool, scores, k, out, Path(scratch))


def _write_sorted_runs(pool: Candidates, scores: np.ndarray, k: int, out: str, runs: Path) -> Ranking:
    rank = rank_of(scores)
    selected = rank <= k
    pool_by, selected_by = Counter(), Counter()
    chosen, pending, written, offset = [], [], [], 0

    def flush() -> None:
        if pending:
            run = runs / f"{len(written):05d}.parquet"
            pl.concat(pending).sort("rank").write_parquet(run, row_group_size=RUN_GROUP_ROWS)
            written.append(run)
            pending.clear()

    for rows in pool.row_batches():
        part = slice(offset, offset + rows.height)
        offset += rows.height
        keep = [c for c in ("id", "task") if c in rows.columns]
        scored = rows.select(keep).with_columns(score=pl.Series(scores[part]), rank=pl.Series(rank[part]),
                                                selected=pl.Series(selected[part]))
        pool_by.update(_by_task(scored))
        selected_by.update(_by_task(scored.filter(pl.col("selected"))))
        chosen.append(_detached(rows.filter(pl.Series(selected[part])).select(
            "id", pl.Series("rank", rank[part][selected[part]]), pl.Series("score", scores[part][selected[part]]),
            *[c for c in rows.columns if c != "id"])))
        pending.append(scored)
        if sum(p.height for p in pending) >= RUN_ROWS:
            flush()
    flush()
    if offset != len(scores):
        raise AssertionError(f"select-pool scored {len(scores)} candidates but read {offset} rows")
    del rank
    fs, path = storage.filesystem(storage.join(out, "scores.parquet"))
    writer = None
    for start in range(1, len(scores) + 1, MERGE_ROWS):
        step = pl.scan_parquet(written).filter(pl.col("rank").is_between(start, start + MERGE_ROWS - 1))
        table = step.sort("rank").collect().to_arrow()
        writer = writer or pq.ParquetWriter(path, table.schema, filesystem=fs)
        writer.write_table(table)
    writer.close()
    return Ranking(selected, pl.concat(chosen).sort("rank"), pool_by, selected_by)


def _detached(frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` in buffers of its own. Rows filtered or joined out of a batch keep the batch's whole
    string data alive (polars' string views point into it), so the few chosen rows kept from every
    batch held every batch's texts: the pool's texts over the whole pass (issue 13: DSIR's heap
    x1.45 from 1M to 4M). A round trip through Arrow copies just the rows' own strings."""
    return pl.from_arrow(frame.to_arrow())


def _write_selected(pool: Candidates, chosen: pl.DataFrame, out: str) -> None:
    """selected.parquet: the chosen rows, best first, with every column of the pool's examples
    (texts) or of its feature store's rows; the examples stream past the chosen ids a batch at
    a time (the driver holds the budget's rows, never the pool's)."""
    if pool.examples is None:
        full = chosen
    else:
        keys = chosen.select("id", "rank", "score")
        parts = [_detached(batch.join(keys, on="id", how="inner")) for batch in
                 storage.iter_parquet_batches(pool.examples, batch_rows=inputs.ROW_BATCH)]
        others = [c for c in parts[0].columns if c not in keys.columns]
        full = pl.concat(parts).select(*keys.columns, *others).sort("rank")
    storage.write_parquet(full, storage.join(out, "selected.parquet"))


def _ranked(counts: Counter) -> dict[str, int]:
    """Most first, ties by name."""
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


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


def _scores(cfg: SelectPoolConfig, pool: Candidates, target: Candidates) -> tuple[np.ndarray, dict]:
    if cfg.method == "random":
        return baselines.random_scores(pool.count(), cfg.seed), {}
    if cfg.method == "dsir":
        _nonempty(target.count())
        return baselines.dsir_scores(pool.text_batches, target.text_batches(), pool.count(), cfg.dsir_buckets,
                                     cfg.seed), {}
    target_vectors = np.asarray(target.store.vectors())
    _nonempty(len(target_vectors))
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


def _nonempty(target_rows: int) -> None:
    if target_rows == 0:
        raise SiftError("the target is empty: no target row survived ingest and featurization")


def _by_task(frame: pl.DataFrame) -> dict[str, int]:
    if "task" not in frame.columns:
        return {"(all)": frame.height} if frame.height else {}
    return dict(frame.group_by(pl.col("task").fill_null("(none)")).len().iter_rows())


def _plot(scores: np.ndarray, selected: np.ndarray, report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bins, counts = _histograms(scores, selected, 60)
    left.stairs(counts[0], bins, fill=True, color="#bbbbbb", label="not selected")
    left.stairs(counts[1], bins, fill=True, color="#d62728", label="selected")
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
    with storage.atomic_writer(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def _histograms(scores: np.ndarray, selected: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges over the finite scores (-inf: dropped by the domain test) and the counts of the
    not-selected and selected candidates per bin, a slice at a time (no copies of the scores)."""
    lo, hi = np.inf, -np.inf
    for start in range(0, len(scores), MERGE_ROWS):
        part = scores[start:start + MERGE_ROWS]
        part = part[np.isfinite(part)]
        if len(part):
            lo, hi = min(lo, part.min()), max(hi, part.max())
    edges = np.histogram_bin_edges([], bins=bins, range=(lo, hi) if lo <= hi else None)
    counts = np.zeros((2, bins), dtype=np.int64)
    for start in range(0, len(scores), MERGE_ROWS):
        part, chosen = scores[start:start + MERGE_ROWS], selected[start:start + MERGE_ROWS]
        finite = np.isfinite(part)
        counts[0] += np.histogram(part[finite & ~chosen], bins=edges)[0]
        counts[1] += np.histogram(part[finite & chosen], bins=edges)[0]
    return edges, counts


def show(report: dict, out: str) -> None:
    counts, details = report["counts"], report["details"]
    rows = [("method", f"{report['method']} ({report['variant']})"), *counts.items()]
    if "converged" in details:
        rows += [("OT support", f"{details['support']}: {details['support_size']:,} pool x {details['target_size']:,} target"),
                 ("Sinkhorn", f"{details['iterations']} iterations, L1 marginal error {details['marginal_error']:.2g} "
                              f"(threshold {details['threshold']:g}): "
                              f"{'converged' if details['converged'] else 'NOT converged'}")]
    rows += [(f"{role} from texts", ", ".join(f"{stage} {status}" for stage, status in stages.items()))
             for role, stages in report.get("derived", {}).items() if stages]
    rows += [("seconds", f"{report['seconds']['total']:.1f} (scoring {report['seconds']['scoring']:.1f})"),
             ("outputs", f"{out}/scores.parquet, selected.parquet, report.json, report.png")]
    table(f"select-pool -> {out}", None, rows)
    table("Selected by source", ["source", "pool", "selected"],
          [(name, n, report["selected_by_task"].get(name, 0)) for name, n in report["pool_by_task"].items()])
