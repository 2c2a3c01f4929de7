"""`sift ingest`: user files -> examples.parquet + quarantine.parquet (every row kept or quarantined)."""

from __future__ import annotations

from dataclasses import asdict

from engine.config import IngestConfig
from engine.stages import Result, Stage, split


class IngestResult(Result):
    out: str
    rows_in: int
    rows_out: int
    rows_quarantined: int
    reasons: dict[str, int]
    sources: list[dict]
    tasks: dict[str, int]

    def line(self) -> str:
        return f"{self.rows_in:,} rows in, {self.rows_out:,} kept, {self.rows_quarantined:,} quarantined"


def run(cfg: IngestConfig) -> IngestResult:
    from engine.data import corpora
    from engine.data.ingest import ingest

    inputs = [*cfg.inputs, *(str(corpora.path(name)) for name in cfg.corpora)]
    summary = asdict(ingest(cfg.model_copy(update={"inputs": inputs, "corpora": []})))
    return IngestResult(**{k: summary[k] for k in IngestResult.model_fields})


def show(result: IngestResult) -> None:
    from engine.report import table

    table(f"Ingest -> {result.out}", ["source", "rows in", "kept", "quarantined"], [
        *[(s["path"], s["rows_in"], s["rows_out"], s["rows_quarantined"]) for s in result.sources],
        ("total", result.rows_in, result.rows_out, result.rows_quarantined),
    ])
    if result.reasons:
        table("Quarantine reasons", ["reason", "rows"], result.reasons.items())
    table("Kept rows per task", ["task", "rows"], result.tasks.items())


def arguments(p) -> None:
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="jsonl/csv/tsv/parquet files, folders, globs, URIs")
    p.add_argument("--out", help="output folder or URI")
    p.add_argument("--text-column", dest="columns.text")
    p.add_argument("--id-column", dest="columns.id")
    p.add_argument("--task-column", dest="columns.task")
    p.add_argument("--label-column", dest="columns.label")
    p.add_argument("--encoding")
    p.add_argument("--max-chars", dest="max_chars", type=int, help="longer texts are quarantined")
    p.add_argument("--max-line-bytes", dest="max_line_bytes", type=int,
                   help="longer lines are quarantined unread (default 4 MiB)")
    p.add_argument("--labels", type=split, help="comma-separated allowed labels")
    p.add_argument("--corpora", type=split, help="built-in corpora to ingest too: tweets, chatterbot, fortunes, wordnet")


STAGE = Stage("ingest", "validate input files into examples.parquet + quarantine.parquet", IngestConfig,
              IngestResult, run, show, arguments, inputs=("inputs",))
