"""Plain-text tables: the one column-width layout every printed table uses (merge, plan, bench, evaluate)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def table(rows: Sequence[Sequence[str]], right: Iterable[int] = ()) -> str:
    """Rows of cells as lines of columns two spaces apart, each as wide as its widest cell: left-aligned,
    but the columns numbered in `right` right-aligned; trailing spaces cut."""
    right = set(right)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))] if rows else []
    return "\n".join("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows)
