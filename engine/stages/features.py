"""What the two featurize stages share: their result, its table, their flags."""

from __future__ import annotations

from engine.stages import Result


class FeaturesResult(Result):
    out: str
    kind: str
    rows: int  # rows handed in
    kept: int
    quarantined: int
    dim: int
    shards: int
    shards_done_before: int
    rows_now: int
    seconds_now: float
    reasons: dict[str, int]

    @classmethod
    def of(cls, store, stats, **extra):
        quarantined = store.quarantine().height
        kept = len(store.vectors())
        if kept + quarantined != store.spec.rows:
            raise AssertionError(f"feature store lost rows: {kept} + {quarantined} != {store.spec.rows}")
        return cls(out=str(store.root), kind=store.spec.kind, rows=store.spec.rows, kept=kept,
                   quarantined=quarantined, dim=store.spec.dim, shards=store.spec.num_shards,
                   shards_done_before=stats.shards_done_before, rows_now=stats.rows,
                   seconds_now=round(stats.seconds, 2), reasons=stats.reasons, **extra)

    def line(self) -> str:
        return f"{self.kept:,} rows x {self.dim} dims ({self.rows_now:,} featurized now)"


def show(result: FeaturesResult) -> None:
    from engine.report import table

    rate = result.rows_now / result.seconds_now if result.seconds_now else 0.0
    table(f"Feature store {result.out} ({result.kind})", None, [
        ("rows in", f"{result.rows:,}"),
        ("kept", f"{result.kept:,}"),
        ("quarantined", f"{result.quarantined:,}"),
        ("vectors", f"{result.kept:,} x {result.dim}"),
        ("shards", f"{result.shards} ({result.shards_done_before} done before, "
                   f"{result.shards - result.shards_done_before} now)"),
        ("this run", f"{result.rows_now:,} rows in {result.seconds_now:.1f} s = {rate:,.1f} ex/s"),
    ])
    if result.reasons:
        table("Quarantine reasons (this run)", ["reason", "rows"], sorted(result.reasons.items()))


def featurize_arguments(p) -> None:
    p.add_argument("--data", help="an ingest folder or a parquet file of examples")
    p.add_argument("--out", help="the feature store (folder or URI; resumed if present)")
    p.add_argument("--model", help="a model folder or a built-in name")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--max-length", dest="max_length", type=int)
    p.add_argument("--actors", type=int, help="actor pool size (default: sized from Ray's resources)")
