"""Terminal output for people: summary tables (rich) that also read well in a CI log."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

import sys

# Off a terminal (CI logs, pipes) rich assumes 80 columns and truncates paths; use a wider page.
console = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 140)


def table(title: str, columns: Sequence[str] | None, rows: Iterable[Sequence[object]]) -> None:
    """Print a table (no header row when `columns` is None: a key/value listing); numeric columns
    right-aligned, integers with thousands separators."""
    rows = [list(r) for r in rows]
    header = columns is not None
    columns = columns or [""] * (len(rows[0]) if rows else 0)
    out = Table(title=title, title_justify="left", show_edge=False, pad_edge=False, show_header=header)
    for i, name in enumerate(columns):
        numeric = bool(rows) and all(isinstance(r[i], (int, float)) for r in rows)
        out.add_column(name, justify="right" if numeric else "left")
    for row in rows:
        out.add_row(*(_fmt(v) for v in row))
    console.print(out)
    console.print()


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() else f"{value:,.2f}"
    return "" if value is None else escape(str(value))
