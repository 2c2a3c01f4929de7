"""`sift select-pool`: score every candidate of a pool for a target and select the budget (GOT-D)."""

from __future__ import annotations

from engine.config import SelectPoolConfig
from engine.stages import Result, Stage


class SelectPoolResult(Result):
    out: str
    method: str
    selected: int
    scored: int
    quarantined: int
    selected_by_source: dict[str, int]
    converged: bool | None = None  # GOT-D's Sinkhorn; None for the other methods
    iterations: int | None = None
    marginal_error: float | None = None  # L1, both marginals of the plan

    def line(self) -> str:
        sources = ", ".join(f"{name} {n}" for name, n in sorted(self.selected_by_source.items(), key=lambda kv: -kv[1])
                            if n)
        solve = "" if self.converged is None else (
            f"; Sinkhorn {'converged' if self.converged else 'NOT converged'} in {self.iterations} iterations "
            f"(L1 error {self.marginal_error:.1g})")
        return f"{self.selected:,} of {self.scored:,} selected by {self.method} ({sources}){solve}"


def run(cfg: SelectPoolConfig) -> SelectPoolResult:
    from engine.select.pool.select import select_pool

    report = select_pool(cfg)
    return SelectPoolResult(out=str(cfg.out), method=cfg.method, selected=report["counts"]["selected"],
                            scored=report["counts"]["scored"], quarantined=report["counts"]["quarantined"],
                            selected_by_source=report["selected_by_task"],
                            converged=report["details"].get("converged"), iterations=report["details"].get("iterations"),
                            marginal_error=report["details"].get("marginal_error"))


def show(result: SelectPoolResult) -> None:
    from engine import storage
    from engine.select.pool.select import show as show_report

    show_report(storage.read_json(storage.join(result.out, "report.json")), result.out)


def arguments(p) -> None:
    p.add_argument("--pool", help="texts, an ingest folder, an embedding store, or parquet with embeddings")
    p.add_argument("--target", help="the same kinds of input as --pool")
    p.add_argument("--budget", type=float, help="rows to select, or a fraction below 1")
    p.add_argument("--out")
    p.add_argument("--method", choices=["gotd", "knn", "dsir", "grad-cosine", "random"])
    p.add_argument("--variant", choices=["clean", "contrast"])


# native_storage: pool, target and OUT are read and written where they lie (texts, stores and
# outputs on s3:// included), and what select-pool derives from texts stays under OUT with its
# own done markers (engine.select.pool.inputs), so a rerun after another setting changed skips it.
STAGE = Stage("select-pool", "choose the candidates of a pool closest to a target (GOT-D)", SelectPoolConfig,
              SelectPoolResult, run, show, arguments, inputs=("pool", "target", "pool_grads", "target_grads"),
              native_storage=True)
