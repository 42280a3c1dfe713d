"""Which byte ranges a backup copies, in which requests: pure functions on plain data.

Ranges are widened to whole clusters of the tracking granularity (a dirty cluster is copied
whole, clipped at the disk's end), merged, then cut into requests of a few sizes only, so a
small fixed pool of read buffers serves every request.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator

ALLOCATION = "base:allocation"  # the NBD meta context of what is allocated / reads as zero

MAX_REQUEST = 1 << 20  # bytes per NBD request; 256 KiB-1 MiB measured best here


def cluster_runs(
    ranges: Iterable[tuple[int, int]], granularity: int, size: int
) -> list[tuple[int, int]]:
    """(start, length) ranges -> sorted, merged runs of whole clusters, clipped at `size`."""
    if granularity <= 0 or granularity & (granularity - 1):
        raise ValueError(f"granularity {granularity} is not a power of two")
    spans = sorted(
        (start - start % granularity, min(size, -(-(start + length) // granularity) * granularity))
        for start, length in ranges
        if length > 0 and start < size
    )
    runs: list[tuple[int, int]] = []
    for start, end in spans:
        if runs and start <= runs[-1][0] + runs[-1][1]:
            first = runs[-1][0]
            runs[-1] = (first, max(end, first + runs[-1][1]) - first)
        else:
            runs.append((start, end - start))
    return runs


def requests(
    runs: Iterable[tuple[int, int]], granularity: int, max_request: int = MAX_REQUEST
) -> Iterator[tuple[int, int]]:
    """Cut cluster runs into (offset, length) requests: `max_request` pieces, then the rest as
    power-of-two multiples of the granularity, then a sub-cluster tail (only at the disk's end).
    At most log2(max_request/granularity)+2 distinct lengths ever appear."""
    top = max(max_request - max_request % granularity, granularity)
    for start, length in runs:
        pos, end = start, start + length
        while end - pos >= granularity:
            n = min(top, _largest_pow2_multiple(end - pos, granularity))
            yield pos, n
            pos += n
        if pos < end:
            yield pos, end - pos


def _largest_pow2_multiple(n: int, granularity: int) -> int:
    clusters = n // granularity
    return (1 << (clusters.bit_length() - 1)) * granularity


def bitmap_runs(bitmap_b64: str, granularity: int, size: int) -> list[tuple[int, int]]:
    """`bitmapBase64` (bit i = cluster i, LSB first in each byte) -> merged cluster runs."""
    bits = base64.b64decode(bitmap_b64)
    ranges: list[tuple[int, int]] = []
    for i, byte in enumerate(bits):
        if not byte:
            continue
        for b in range(8):
            if byte >> b & 1:
                ranges.append(((i * 8 + b) * granularity, granularity))
    return cluster_runs(ranges, granularity, size)


def gaps(runs: Iterable[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """What sorted, non-overlapping runs leave out of [0, size), as (start, length) runs."""
    out: list[tuple[int, int]] = []
    pos = 0
    for start, length in runs:
        if start > pos:
            out.append((pos, start - pos))
        pos = max(pos, start + length)
    if pos < size:
        out.append((pos, size - pos))
    return out


def total(runs: Iterable[tuple[int, int]]) -> int:
    return sum(n for _, n in runs)


def split_zero(
    runs: Iterable[tuple[int, int]], zero: Iterable[tuple[int, int]], granularity: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Split cluster runs into (runs to read, runs to write as zeroes): the clusters that the
    export's `base:allocation` reports wholly zero (trimmed, discarded, zero-written) need no
    read; the backup stores them as zero clusters. Both inputs sorted and non-overlapping."""
    zeros = [
        (s, e)
        for s, e in (
            (-(-start // granularity) * granularity, (start + length) // granularity * granularity)
            for start, length in zero
        )
        if e > s
    ]
    data: list[tuple[int, int]] = []
    zeroed: list[tuple[int, int]] = []
    i = 0
    for start, length in runs:
        pos, end = start, start + length
        while i < len(zeros) and zeros[i][1] <= pos:
            i += 1
        j = i
        while pos < end:
            if j >= len(zeros) or zeros[j][0] >= end:
                data.append((pos, end - pos))
                break
            zs, ze = max(zeros[j][0], pos), min(zeros[j][1], end)
            if zs > pos:
                data.append((pos, zs - pos))
            zeroed.append((zs, ze - zs))
            pos = ze
            j += 1
    return data, zeroed


def largest(runs: Iterable[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The `n` longest of `runs` (ties: the first), back in offset order."""
    if n <= 0:
        return []
    ranked = sorted(enumerate(runs), key=lambda item: (-item[1][1], item[0]))[:n]
    return [run for _, run in sorted(ranked)]
