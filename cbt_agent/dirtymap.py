"""Dirty maps: NBD block-status extents turned into cluster runs, the bitmap ZStack's
`bitmapBase64` carries (bit i = cluster i, LSB first), and the bytes they change. Pure."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DirtyExtent:
    """A run of bytes, changed or not, as NBD block status reports it."""

    start: int
    length: int
    dirty: bool

    def to_dict(self) -> dict[str, int]:
        return {"start": self.start, "length": self.length}


def cluster_runs(
    extents: Iterable[DirtyExtent], size: int, granularity: int
) -> list[tuple[int, int]]:
    """Dirty extents as merged, sorted runs of clusters: [(first cluster, end cluster), ...)."""
    clusters = (size + granularity - 1) // granularity
    runs: list[tuple[int, int]] = []
    for e in sorted((e for e in extents if e.dirty and e.length > 0), key=lambda e: e.start):
        first = e.start // granularity
        end = min((e.start + e.length - 1) // granularity + 1, clusters)
        if first >= end:
            continue
        if runs and first <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((first, end))
    return runs


def _set_bits(bits: bytearray, first: int, end: int) -> None:
    while first < end and first & 7:
        bits[first >> 3] |= 1 << (first & 7)
        first += 1
    whole_end = end & ~7
    if first < whole_end:
        bits[first >> 3 : whole_end >> 3] = b"\xff" * ((whole_end - first) >> 3)
        first = whole_end
    while first < end:
        bits[first >> 3] |= 1 << (first & 7)
        first += 1


def bitmap_from_extents(extents: Iterable[DirtyExtent], size: int, granularity: int) -> bytes:
    """Encode dirty extents as a cluster bitmap: bit i set = cluster i changed, LSB first."""
    clusters = (size + granularity - 1) // granularity
    bits = bytearray((clusters + 7) // 8)
    for first, end in cluster_runs(extents, size, granularity):
        _set_bits(bits, first, end)
    return bytes(bits)


def full_bitmap(size: int, granularity: int) -> bytes:
    """Every cluster set: a full copy must read everything (zero extents may be skipped)."""
    clusters = (size + granularity - 1) // granularity
    bits = bytearray((clusters + 7) // 8)
    _set_bits(bits, 0, clusters)
    return bytes(bits)


def bitmap_base64(bits: bytes) -> str:
    return base64.b64encode(bits).decode("ascii")


def changed_bytes(extents: Iterable[DirtyExtent], size: int, granularity: int) -> int:
    """Bytes a client copies: dirty clusters times the granularity, the last one clipped."""
    total = 0
    for first, end in cluster_runs(extents, size, granularity):
        total += min(end * granularity, size) - first * granularity
    return total
