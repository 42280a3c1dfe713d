"""Dirty maps: NBD block-status extents turned into cluster runs, the bitmap ZStack's
`bitmapBase64` carries (bit i = cluster i, LSB first), and the bytes they change. Pure."""

from __future__ import annotations

import base64
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
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


@dataclass(frozen=True, slots=True)
class DirtyMap:
    """A change set as NBD block status reported it: the dirty runs, merged and sorted, as
    [start, end) byte offsets in two arrays. 16 bytes a run and no object per run: a 1 TiB
    disk's 100,000 scattered runs take 1.6 MB."""

    starts: array[int]
    ends: array[int]

    @classmethod
    def from_runs(cls, runs: Iterable[Sequence[int]]) -> DirtyMap:
        """From sorted, non-overlapping (start, length) runs."""
        starts: array[int] = array("q")
        ends: array[int] = array("q")
        for start, length in runs:
            starts.append(start)
            ends.append(start + length)
        return cls(starts, ends)

    def __len__(self) -> int:
        return len(self.starts)

    def extents(self) -> list[DirtyExtent]:
        return [DirtyExtent(s, e - s, True) for s, e in zip(self.starts, self.ends, strict=True)]

    def bitmap(self, size: int, granularity: int) -> bytes:
        """The cluster bitmap (as `bitmap_from_extents`): bit i set = cluster i changed."""
        g = granularity
        clusters = (size + g - 1) // g
        bits = bytearray((clusters + 7) // 8)
        # one pass, no call for a run within one byte: ~0.5 µs a run (100,000 runs ~50 ms)
        for start, end in zip(self.starts, self.ends, strict=True):
            first = start // g
            last = (end - 1) // g  # inclusive
            if last >= clusters:
                last = clusters - 1
            if first == last:
                bits[first >> 3] |= 1 << (first & 7)
            elif first > last:
                continue
            elif first >> 3 == last >> 3:
                bits[first >> 3] |= ((2 << (last - first)) - 1) << (first & 7)
            else:
                _set_bits(bits, first, last + 1)
        return bytes(bits)

    def page(self, start: int, end: int, limit: int) -> tuple[list[tuple[int, int]], int, bool]:
        """The runs in [start, end), clipped to it, at most `limit`: (runs, where the next page
        starts, whether [start, end) is covered). A full page stops at the end of its last run
        (runs are never split across pages) and is not the last unless that run reaches `end`:
        the same answer as a walk of NBD block status (`nbd.changed_areas`)."""
        first = bisect_right(self.ends, start)  # the first run ending after `start`
        stop = min(bisect_left(self.starts, end), first + limit)
        runs = [
            (s, e - s) for s, e in zip(self.starts[first:stop], self.ends[first:stop], strict=True)
        ]
        if not runs:
            return runs, end, True
        s0, n0 = runs[0]
        if s0 < start:
            runs[0] = (start, s0 + n0 - start)
        s1, n1 = runs[-1]
        if s1 + n1 > end:
            runs[-1] = (s1, end - s1)
        last_end = runs[-1][0] + runs[-1][1]
        if len(runs) >= limit and last_end < end:
            return runs, last_end, False
        return runs, end, True


def bitmap_changed_bytes(bits: bytes, size: int, granularity: int) -> int:
    """Bytes a client copies for a cluster bitmap (as `changed_bytes` of its extents): set
    clusters times the granularity, the last cluster clipped to the disk's size."""
    total = int.from_bytes(bits, "little").bit_count() * granularity
    clusters = (size + granularity - 1) // granularity
    last = clusters - 1
    if clusters and bits[last >> 3] >> (last & 7) & 1:
        total -= clusters * granularity - size
    return total
