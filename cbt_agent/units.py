"""Sizes for people: one formatter for messages, tables and the history."""

from __future__ import annotations


def size(n: int | None) -> str:
    """Bytes for a person: "0 B", "64 KiB", "1.5 MiB"; "-" for unknown."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{n} B"
            return f"{value:.1f} {unit}".replace(".0 ", " ")
        value /= 1024
    raise AssertionError("unreachable")
