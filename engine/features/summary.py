"""The table a featurize run ends with."""

from __future__ import annotations

from engine.features.runner import RunStats
from engine.features.store import FeatureStore
from engine.report import table


def show(store: FeatureStore, stats: RunStats) -> None:
    spec = store.spec
    kept = len(store.vectors())
    quarantined = store.quarantine().height
    resumed = f"{stats.shards_done_before} done before, {stats.shards_total - stats.shards_done_before} now"
    table(f"Feature store {store.root} ({spec.kind})", None, [
        ("rows in", spec.rows),
        ("kept", kept),
        ("quarantined", quarantined),
        ("vectors", f"{kept:,} x {spec.dim} {spec.dtype}"),
        ("shards", f"{spec.num_shards} ({resumed})"),
        ("this run", f"{stats.rows:,} rows in {stats.seconds:.1f} s = {stats.rows_per_s:,.1f} ex/s"),
        ("store size", f"{store.size_bytes() / 2**20:,.1f} MiB"),
    ])
    if kept + quarantined != spec.rows:
        raise AssertionError(f"feature store lost rows: {kept} + {quarantined} != {spec.rows}")
    if stats.reasons:
        table("Quarantine reasons (this run)", ["reason", "rows"], sorted(stats.reasons.items()))
