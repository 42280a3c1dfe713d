"""Aligned text tables for a person: one line per item, numbers right-aligned, the last column
left unpadded (it may be long: a reason, a path)."""

from __future__ import annotations

from collections.abc import Sequence

from cbt_agent.units import size as size  # the one formatter, shown in tables

GAP = "  "


def render(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()
) -> list[str]:
    """The lines of a table: `headers`, then `rows` (cells as text, "-" for none); columns
    whose index is in `right` are right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    last = len(headers) - 1

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            if i == last:
                out.append(cell)
            elif i in right:
                out.append(cell.rjust(widths[i]))
            else:
                out.append(cell.ljust(widths[i]))
        return GAP.join(out).rstrip()

    return [line(headers), *(line(r) for r in rows)]
