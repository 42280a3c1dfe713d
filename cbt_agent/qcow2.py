"""A qcow2 image written in one sequential pass, its sha256 taken as it is written: the
reference client's backup files, and the agent's empty scratch images (no data at all).

A backup knows, before it copies anything, which guest clusters it will store (its read
requests, in guest offset order) and which it will mark zero, so the whole layout is fixed up
front:

    cluster 0        the header: version 3, 16-bit refcounts, the backing file's format
                     (an extension) and name (an incremental), nothing else
    clusters 1..N    the data, request after request, in the order the requests are made
    then             the L2 tables, the L1 table, the refcount table, the refcount blocks

The copy delivers the requests in order, so every byte of the file is produced in file order:
it is hashed once, as it is written, and never read back. A request that reads as zero is not
written: its clusters stay a hole in the file (unreferenced, refcount 0) and the L2 entries say
"zero" (an incremental: they must hide the backing file) or nothing (a full: an unallocated
cluster without a backing file reads as zero). The image is what `qemu-img create -f qcow2` and
qemu's own writes would make of the same data, and `qemu-img check` finds nothing to say about
it; compared with writing through qemu-nbd, there is no qemu-img and no qemu-nbd to start, no
metadata written twice, and no second pass for the checksum.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

MAGIC = b"QFI\xfb"
VERSION = 3
HEADER_LENGTH = 112  # v3 header with the compression type byte (zlib) and its padding
EXT_BACKING_FORMAT = 0xE2792ACA
REFCOUNT_ORDER = 4  # 16-bit refcounts, qemu's default
COPIED = 1 << 63  # L1/L2 entry: the cluster's refcount is exactly 1
ZERO = 1  # L2 entry: the cluster reads as zero (hides the backing file)
MAX_CLUSTER = 2 << 20
MIN_CLUSTER = 512
_ZEROES = bytes(1 << 20)


def cluster_size(granularity: int) -> int:
    """The qcow2 cluster size matching a tracking granularity (within qcow2's limits)."""
    return min(max(granularity, MIN_CLUSTER), MAX_CLUSTER)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Layout:
    """Where everything goes, in clusters, for `data` clusters of data and `tables` L2 tables."""

    cluster_size: int
    size: int  # the virtual size, bytes
    data: int  # data clusters reserved (1..data)
    tables: tuple[int, ...]  # the L1 indexes that get an L2 table, ascending
    l1_entries: int
    l1_clusters: int
    reftable_clusters: int
    refblocks: int

    @classmethod
    def plan(cls, size: int, cluster_size: int, data: int, tables: Sequence[int]) -> Layout:
        l2_entries = cluster_size // 8
        l1_entries = max(1, _ceil(size, cluster_size * l2_entries))
        l1_clusters = _ceil(l1_entries * 8, cluster_size)
        per_block = cluster_size * 8 >> REFCOUNT_ORDER  # refcounts in one refcount block
        fixed = 1 + data + len(tables) + l1_clusters
        refblocks, reftable = 1, 1
        while True:  # the refcount structures count themselves: find the fixed point
            total = fixed + reftable + refblocks
            need_blocks = _ceil(total, per_block)
            need_table = _ceil(need_blocks * 8, cluster_size)
            if (need_blocks, need_table) == (refblocks, reftable):
                break
            refblocks, reftable = max(refblocks, need_blocks), max(reftable, need_table)
        return cls(
            cluster_size, size, data, tuple(tables), l1_entries, l1_clusters, reftable, refblocks
        )

    @property
    def l2_start(self) -> int:
        return 1 + self.data

    @property
    def l1_start(self) -> int:
        return self.l2_start + len(self.tables)

    @property
    def reftable_start(self) -> int:
        return self.l1_start + self.l1_clusters

    @property
    def refblock_start(self) -> int:
        return self.reftable_start + self.reftable_clusters

    @property
    def total(self) -> int:
        return self.refblock_start + self.refblocks


def header(layout: Layout, backing: str | None) -> bytes:
    """Cluster 0: the qcow2 v3 header, the backing format extension and the backing name."""
    cs = layout.cluster_size
    exts = b""
    if backing is not None:
        fmt = b"qcow2"
        exts += struct.pack(">II", EXT_BACKING_FORMAT, len(fmt)) + fmt.ljust(8, b"\0")
    exts += struct.pack(">II", 0, 0)  # end of the extensions
    name = b"" if backing is None else os.fsencode(backing)
    name_at = HEADER_LENGTH + len(exts) if name else 0
    if name_at + len(name) > cs or len(name) > 1023:
        raise ValueError(f"backing file name {backing!r} is too long for a qcow2 header")
    head = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        MAGIC,
        VERSION,
        name_at,
        len(name),
        cs.bit_length() - 1,
        layout.size,
        0,  # no encryption
        layout.l1_entries,
        layout.l1_start * cs,
        layout.reftable_start * cs,
        layout.reftable_clusters,
        0,  # no snapshots
        0,
        0,  # incompatible features: none (not dirty, not corrupt, no external data file)
        0,  # compatible features: none (no lazy refcounts)
        0,  # autoclear features
        REFCOUNT_ORDER,
        HEADER_LENGTH,
    )
    head += bytes(HEADER_LENGTH - len(head))  # compression type 0 (zlib) and padding
    return (head + exts + name).ljust(cs, b"\0")


WRITEBACK_STEP = 16 << 20  # data bytes written between two writeback starts


class Qcow2Writer:
    """Writes `requests` (sorted, non-overlapping (offset, length), lengths whole clusters but
    at the disk's end) and `zeros` (incremental only: ranges marked zero without data) into the
    open, empty file `fd` as a qcow2 image of `size` bytes.

    Call `store(data)` or `store_zero()` once per request, in order, then `finish()`, which
    writes the metadata, syncs the file and returns its sha256."""

    def __init__(
        self,
        fd: int,
        size: int,
        cluster_size: int,
        requests: Sequence[tuple[int, int]],
        zeros: Sequence[tuple[int, int]] = (),
        backing: str | None = None,
    ) -> None:
        if cluster_size & (cluster_size - 1) or not MIN_CLUSTER <= cluster_size <= MAX_CLUSTER:
            raise ValueError(f"cluster size {cluster_size} is not a qcow2 cluster size")
        if zeros and backing is None:
            raise ValueError("zero ranges need a backing file (a full stores no zeroes)")
        self.fd = fd
        self.cs = cluster_size
        self.requests = requests
        self.zeros = zeros
        self.backing = backing
        self._l2_entries = cluster_size // 8
        hosts: list[int] = []  # host cluster of each request's first cluster
        data = 0
        tables: set[int] = set()
        for offset, length in requests:
            self._check(offset, length, size)
            hosts.append(1 + data)
            data += _ceil(length, cluster_size)
            tables.update(self._tables_of(offset, length))
        for offset, length in zeros:
            self._check(offset, length, size)
            tables.update(self._tables_of(offset, length))
        self._hosts = hosts
        self.layout = Layout.plan(size, cluster_size, data, sorted(tables))
        self._stored = bytearray(len(requests))  # 1: written; 0: read as zero, not written
        self._flushed_to = 0  # data bytes handed to writeback
        self._next = 0
        self._sha = hashlib.sha256()
        self._emit(header(self.layout, backing), 0)

    def _check(self, offset: int, length: int, size: int) -> None:
        if offset % self.cs or length <= 0 or offset + length > size:
            raise ValueError(f"range ({offset}, {length}) is not whole clusters of the disk")
        if length % self.cs and offset + length != size:
            raise ValueError(f"range ({offset}, {length}) ends inside a cluster")

    def _tables_of(self, offset: int, length: int) -> range:
        span = self.cs * self._l2_entries
        return range(offset // span, (offset + length - 1) // span + 1)

    def _emit(self, data: bytes | bytearray | memoryview, cluster: int) -> None:
        """Write `data` at host cluster `cluster` (whole clusters) and hash it."""
        view = memoryview(data)
        pos = cluster * self.cs
        while view:
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n
        self._sha.update(data)

    def _hash_zeroes(self, n: int) -> None:
        while n > 0:
            k = min(n, len(_ZEROES))
            self._sha.update(_ZEROES[:k] if k < len(_ZEROES) else _ZEROES)
            n -= k

    @property
    def pending(self) -> int:
        """Requests not stored yet."""
        return len(self.requests) - self._next

    def store(self, data: bytes | bytearray | memoryview) -> None:
        """The next request's bytes (exactly its length)."""
        i = self._next
        offset, length = self.requests[i]
        if len(data) != length:
            raise ValueError(f"request at {offset}: {len(data)} bytes, expected {length}")
        view = memoryview(data)
        pos = self._hosts[i] * self.cs
        while view:
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n
        self._sha.update(data)
        self._hash_zeroes(-length % self.cs)  # a short last cluster: the file holds zeroes
        self._stored[i] = 1
        self._next += 1
        if pos - self._flushed_to >= WRITEBACK_STEP:
            # the kernel starts writing this back now (without waiting) and keeps none of it
            # cached: the sync in finish() has little left to wait for, and a backup does not
            # push the host's own data out of the page cache
            os.posix_fadvise(
                self.fd, self._flushed_to, pos - self._flushed_to, os.POSIX_FADV_DONTNEED
            )
            self._flushed_to = pos

    def store_zero(self) -> None:
        """The next request read as zero: nothing is written (a hole the file hashes as zero)."""
        length = self.requests[self._next][1]
        self._hash_zeroes(_ceil(length, self.cs) * self.cs)
        self._next += 1

    def _mappings(self) -> Iterator[tuple[int, int, int]]:
        """(first guest cluster, clusters, L2 entry of the first) in guest order; consecutive
        clusters of a data entry are consecutive host clusters."""
        zero_entry = ZERO if self.backing is not None else 0
        reqs = ((off // self.cs, _ceil(n, self.cs), i) for i, (off, n) in enumerate(self.requests))
        zeros = ((off // self.cs, _ceil(n, self.cs), -1) for off, n in self.zeros)
        for guest, count, i in sorted((*reqs, *zeros)):
            if i >= 0 and self._stored[i]:
                yield guest, count, (self._hosts[i] * self.cs) | COPIED
            elif zero_entry:
                yield guest, count, zero_entry

    def finish(self, sync: bool = True) -> str:
        """Write the L2 tables, the L1 table and the refcounts after the data and (`sync`)
        sync the file; the file's sha256 (hex)."""
        if self._next != len(self.requests):
            raise ValueError(f"{self.pending} requests were never stored")
        lay, cs, per = self.layout, self.cs, self._l2_entries
        l1 = bytearray(lay.l1_clusters * cs)
        maps = self._mappings()
        pending = next(maps, None)
        for k, t in enumerate(lay.tables):  # every table, also one whose reads were all zero
            l2 = bytearray(cs)
            lo, hi = t * per, (t + 1) * per
            while pending is not None and pending[0] < hi:
                guest, count, entry = pending
                for g in range(max(guest, lo), min(guest + count, hi)):
                    e = entry + (g - guest) * cs if entry & COPIED else entry
                    struct.pack_into(">Q", l2, (g - lo) * 8, e)
                if guest + count > hi:
                    break  # the rest of this mapping is in the next table
                pending = next(maps, None)
            self._emit(l2, lay.l2_start + k)
            struct.pack_into(">Q", l1, t * 8, ((lay.l2_start + k) * cs) | COPIED)
        self._emit(l1, lay.l1_start)
        self._emit(self._reftable(), lay.reftable_start)
        for k, block in enumerate(self._refblocks()):
            self._emit(block, lay.refblock_start + k)
        if sync:
            os.fdatasync(self.fd)
        return self._sha.hexdigest()

    def _reftable(self) -> bytearray:
        lay, cs = self.layout, self.cs
        table = bytearray(lay.reftable_clusters * cs)
        for k in range(lay.refblocks):
            struct.pack_into(">Q", table, k * 8, (lay.refblock_start + k) * cs)
        return table

    def _referenced(self) -> Iterator[tuple[int, int]]:
        """Host cluster ranges [start, end) with refcount 1, ascending."""
        yield 0, 1  # the header
        for i, first in enumerate(self._hosts):
            if self._stored[i]:
                yield first, first + _ceil(self.requests[i][1], self.cs)
        yield self.layout.l2_start, self.layout.total  # every metadata cluster

    def _refblocks(self) -> Iterator[bytearray]:
        per_block = self.cs * 8 >> REFCOUNT_ORDER
        ranges = self._referenced()
        pending = next(ranges, None)
        for k in range(self.layout.refblocks):
            lo, hi = k * per_block, (k + 1) * per_block
            block = bytearray(self.cs)
            while pending is not None and pending[0] < hi:
                a, b = max(pending[0], lo), min(pending[1], hi)
                block[2 * (a - lo) : 2 * (b - lo)] = b"\0\1" * (b - a)
                if pending[1] > hi:
                    break  # the rest of this range is in the next block
                pending = next(ranges, None)
            yield block
