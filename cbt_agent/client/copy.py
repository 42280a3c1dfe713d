"""Copying an export's clusters into the backup file being written (`qcow2.Qcow2Writer`).

Blocking (libnbd): run it in a thread. The export's handle is driven asynchronously: up to
`MAX_IN_FLIGHT` reads in flight, each stored in the file as soon as it and the reads before it
are done, each into a buffer from a pool that lives as long as the process: libnbd 1.14's
Python binding never frees a buffer handed to `aio_pread`, so buffers are reused, never
dropped.
"""

from __future__ import annotations

import select
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import nbd

from cbt_agent.client.chain import FULL
from cbt_agent.client.errors import BackupError
from cbt_agent.client.extents import ALLOCATION, cluster_runs
from cbt_agent.qcow2 import Qcow2Writer
from cbt_agent.qemu import nbd as nbdio

MAX_IN_FLIGHT = 16  # QEMU's NBD server serves 16 requests of a client at a time
# Trims on the agent's export cost QEMU ~0.2-4 ms each (next to ~0.5 ms for a 64 KiB read):
# what was read is trimmed behind the copy in one request per TRIM_STEP bytes read, and up
# front only the longest gaps, one per GAP_TRIM_STEP of data (a copy short enough that the
# guest can write little meanwhile trims none up front)
TRIM_STEP = 8 << 20
GAP_TRIM_STEP = 128 << 20
MAX_TRIM = 1 << 30  # bytes per trim request
ZERO_PROBE_MIN = 1 << 20  # dirty runs this long are asked whether they read as zero
WAIT_SLICE = 0.5  # seconds a wait for the export lasts at most before the loop looks again


class BufferPool:
    """nbd.Buffer objects by size, reused forever (see the module docstring)."""

    def __init__(self) -> None:
        self._free: dict[int, list[Any]] = {}
        self.allocated = 0  # bytes

    def take(self, size: int) -> Any:
        free = self._free.setdefault(size, [])
        if free:
            return free.pop()
        self.allocated += size
        return nbd.Buffer(size)

    def give(self, buf: Any, size: int) -> None:
        self._free[size].append(buf)


POOL = BufferPool()


def open_source(address: nbdio.NbdAddress, *contexts: str) -> Any:
    """A libnbd handle on the export with `contexts` negotiated."""
    return nbdio.connect(address, contexts)


def zero_ranges(h: Any, within: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The export's ranges inside the sorted ranges `within` that read as zero
    (`base:allocation`), merged."""
    out: list[tuple[int, int]] = []
    try:
        for start, length in within:
            for pos, n, flags in nbdio.iter_extents(h, ALLOCATION, start, length):
                if not flags & nbdio.STATE_ZERO:
                    continue
                if out and out[-1][0] + out[-1][1] == pos:
                    out[-1] = (out[-1][0], out[-1][1] + n)
                else:
                    out.append((pos, n))
    except nbd.Error as e:
        raise BackupError(f"NBD block status ({ALLOCATION}) failed: {e}") from None
    return out


def source_runs(h: Any, mode: str, context: str, granularity: int) -> list[tuple[int, int]]:
    """The cluster runs to copy: allocated non-zero extents for a full, dirty ones otherwise."""
    size = int(h.get_size())
    try:
        if mode == FULL:
            ranges = [
                (pos, n)
                for pos, n, flags in nbdio.iter_extents(h, context)
                if not flags & nbdio.STATE_ZERO
            ]
        else:
            ranges = [
                (pos, n) for pos, n, flags in nbdio.iter_extents(h, context) if flags & nbdio.DIRTY
            ]
    except nbd.Error as e:
        raise BackupError(f"NBD block status ({context}) failed: {e}") from None
    return cluster_runs(ranges, granularity, size)


def _wait(handles: list[Any]) -> None:
    """Block until one handle can make progress (or WAIT_SLICE passes), then let it."""
    readers, writers, by_fd = [], [], {}
    for h in handles:
        fd = h.aio_get_fd()
        direction = h.aio_get_direction()
        by_fd[fd] = h
        if direction & nbd.AIO_DIRECTION_READ:
            readers.append(fd)
        if direction & nbd.AIO_DIRECTION_WRITE:
            writers.append(fd)
    r, w, _ = select.select(readers, writers, [], WAIT_SLICE)
    for fd in r:
        by_fd[fd].aio_notify_read()
    for fd in w:
        by_fd[fd].aio_notify_write()


@dataclass
class _Read:
    cookie: int
    buf: Any
    offset: int
    length: int
    done: bool = False


def copy_into(
    src: Any,
    image: Qcow2Writer,
    *,
    on_done: Callable[[int], None],
    pool: BufferPool = POOL,
    max_in_flight: int = MAX_IN_FLIGHT,
    trim: bool = False,
    trim_step: int = TRIM_STEP,
    trim_first: Iterable[tuple[int, int]] = (),
) -> None:
    """Read every request of `image` from `src` and store each, in order, in `image`.

    `max_in_flight` reads are kept outstanding whatever order they complete in; each is stored
    once it and every read before it are done (the file is written in request order). A read
    of nothing but zeroes is stored as zero (no data).

    With `trim`, everything below the last stored request is trimmed on `src`, one request per
    `trim_step` bytes stored: on the agent's export that frees its scratch and ends the copies
    the guest's writes there would cost (best effort: a refused trim changes nothing read).
    `trim_first`: (offset, length) trims sent before the first read, not waited for (ranges
    the copy never reads). `on_done(length)` runs after each request is stored. Raises
    nbd.Error when a read fails (SIGTERM and Ctrl-C raise where the loop is)."""
    pending = iter(image.requests)
    window: deque[_Read] = deque()  # issued, in request order
    outstanding: list[_Read] = []  # issued, not completed
    trims: deque[int] = deque(src.aio_trim(n, off) for off, n in trim_first)
    trimmed = stored_to = since_trim = 0
    exhausted = False
    while True:
        while not exhausted and len(outstanding) < max_in_flight:
            req = next(pending, None)
            if req is None:
                exhausted = True
                break
            offset, length = req
            buf = pool.take(length)
            r = _Read(src.aio_pread(buf, offset), buf, offset, length)
            window.append(r)
            outstanding.append(r)
        if outstanding:
            still = []
            for r in outstanding:
                if src.aio_command_completed(r.cookie):
                    r.done = True
                else:
                    still.append(r)
            outstanding = still
        while window and window[0].done:
            r = window.popleft()
            if r.buf.is_zero():
                image.store_zero()
            else:
                image.store(r.buf.to_buffer())
            pool.give(r.buf, r.length)
            on_done(r.length)
            stored_to = r.offset + r.length
            since_trim += r.length
        if trim and since_trim >= trim_step and stored_to > trimmed:
            for off, n in _pieces(trimmed, stored_to):
                trims.append(src.aio_trim(n, off))
            trimmed, since_trim = stored_to, 0
        while trims and _trimmed(src, trims[0]):
            trims.popleft()
        if exhausted and not window and not trims:
            return
        _wait([src])


def _pieces(start: int, end: int) -> Iterator[tuple[int, int]]:
    while start < end:
        n = min(MAX_TRIM, end - start)
        yield start, n
        start += n


def _trimmed(src: Any, cookie: int) -> bool:
    try:
        return bool(src.aio_command_completed(cookie))
    except nbd.Error:
        return True  # refused: the scratch keeps that range, nothing read is affected
