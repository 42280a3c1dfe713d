"""Changed-areas pages from a kept change set (`DirtyMap.page`) against the walk of NBD block
status they replace (`nbd.changed_areas`), the bitmap built from it, and the service's store of
them (`ExportMaps`): kept per export, never answering for another, dropped when it ends."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from cbt_agent.dirtymap import (
    DirtyExtent,
    DirtyMap,
    bitmap_changed_bytes,
    bitmap_from_extents,
    changed_bytes,
)
from cbt_agent.engine.exportmaps import ExportMaps
from cbt_agent.qemu import nbd as nbdio
from cbt_agent.store import VolumeExport

CONTEXT = "qemu:dirty-bitmap:cbt-tmp-x"
G = 4096


class MapHandle:
    """A libnbd handle stand-in serving block status of one map: the extents that meet the
    request, the first starting at its offset, in chunks of at most `per_reply`."""

    def __init__(self, size: int, runs: list[tuple[int, int]], per_reply: int = 7) -> None:
        self.size = size
        self.per_reply = per_reply
        self.extents: list[tuple[int, int, int]] = []
        pos = 0
        for start, n in runs:
            if start > pos:
                self.extents.append((pos, start - pos, 0))
            self.extents.append((start, n, nbdio.DIRTY))
            pos = start + n
        if pos < size:
            self.extents.append((pos, size - pos, 0))

    def get_size(self) -> int:
        return self.size

    def block_status(self, count: int, offset: int, callback: Any) -> None:
        entries: list[int] = []
        for start, n, flags in self.extents:
            end = start + n
            if end <= offset or start >= offset + count:
                continue
            s = max(start, offset)
            entries += [min(end, offset + count) - s, flags]
            if len(entries) >= 2 * self.per_reply:
                break
        callback(CONTEXT, offset, entries, 0)

    def shutdown(self) -> None:
        pass


def random_runs(rng: random.Random, size: int) -> list[tuple[int, int]]:
    """Merged, sorted dirty runs: cluster-aligned mostly, a few not (a granularity below G)."""
    runs: list[tuple[int, int]] = []
    pos = 0
    while True:
        pos += rng.choice([G, 2 * G, 5 * G, 512, 3 * G + 512])
        n = rng.choice([G, G, 3 * G, 512, 17 * G])
        if pos + n > size:
            return runs
        runs.append((pos, n))
        pos += n


def walked(
    monkeypatch: pytest.MonkeyPatch,
    h: MapHandle,
    start: int,
    length: int | None,
    limit: int,
) -> tuple[list[tuple[int, int]], int, bool]:
    monkeypatch.setattr(nbdio, "connect", lambda *_a, **_k: h)
    page = nbdio.changed_areas(nbdio.NbdAddress("h", 1, None, "e"), CONTEXT, start, length, limit)
    return page.areas, page.end, page.done


def test_pages_from_memory_answer_as_the_nbd_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    for _ in range(40):
        size = rng.choice([256 * G, 300 * G + 512, 64 * G])
        runs = random_runs(rng, size)
        h = MapHandle(size, runs, per_reply=rng.choice([1, 3, 50]))
        dirty = DirtyMap.from_runs(runs)
        for _ in range(25):
            start = rng.randrange(size)
            length = rng.choice([None, rng.randrange(1, size), G, 1])
            limit = rng.choice([1, 2, 3, 10, 10_000])
            end = size if length is None else min(size, start + length)
            assert dirty.page(start, end, limit) == walked(monkeypatch, h, start, length, limit)


def test_following_next_offset_lists_every_run_once() -> None:
    runs = [(G * i * 3, G) for i in range(10)] + [(40 * G, 5 * G)]
    dirty = DirtyMap.from_runs(runs)
    got: list[tuple[int, int]] = []
    offset, pages, done = 0, 0, False
    while not done:
        areas, offset, done = dirty.page(offset, 100 * G, 4)
        got += areas
        pages += 1
    assert got == runs and pages == 3
    # exactly `limit` runs and nothing after: the next page finds none (as the walk says)
    assert dirty.page(0, 100 * G, 11) == (runs, 45 * G, False)
    assert dirty.page(45 * G, 100 * G, 11) == ([], 100 * G, True)
    # the last run reaching the end: that page is the last
    assert dirty.page(30 * G, 45 * G, 1) == ([(40 * G, 5 * G)], 45 * G, True)
    assert dirty.page(42 * G, 43 * G, 1) == ([(42 * G, G)], 43 * G, True)  # clipped both ways


def test_bitmap_and_changed_bytes_as_from_extents() -> None:
    rng = random.Random(3)
    for size in (256 * G, 300 * G + 512, 8 * G + 100):
        for _ in range(20):
            runs = random_runs(rng, size)
            if rng.random() < 0.5 and runs and runs[-1][0] + runs[-1][1] < size:
                runs.append((size - 300, 300))  # the last, partial cluster
            dirty = DirtyMap.from_runs(runs)
            extents = [DirtyExtent(s, n, True) for s, n in runs]
            bits = dirty.bitmap(size, G)
            assert bits == bitmap_from_extents(extents, size, G)
            assert bitmap_changed_bytes(bits, size, G) == changed_bytes(extents, size, G)
            assert dirty.extents() == extents
    assert bitmap_changed_bytes(bytes(1), 5 * G, G) == 0


def _export(checkpoint: str = "cbt-0123456789ab-000002", volume: str = "v" * 32) -> VolumeExport:
    return VolumeExport(
        "t" * 32, volume, checkpoint, "libvirt-1-format", "cbtsc", "/s/x.qcow2", "cbtjob",
        f"cbtexp-{volume}", "cbt-tmp-0123456789ab-000002", "incremental", "cbt-x", None,
        1 << 30, 65536, "exported",
    )  # fmt: skip


def test_export_maps_keep_one_export_and_drop_it_at_its_end() -> None:
    maps = ExportMaps()
    e, other = _export(), _export(volume="w" * 32)
    dirty = DirtyMap.from_runs([(0, G)])
    assert maps.get(e) is None
    assert maps.put(e, dirty) and maps.get(e) is dirty and maps.get(other) is None
    # the next Enable's export of the same disk (a new checkpoint) never meets this copy
    assert maps.get(_export("cbt-0123456789ab-000003")) is None
    assert maps.get(replace(e, phase="planned")) is dirty  # the phase does not name it
    maps.put(other, dirty)
    maps.drop(e.task_uuid)
    assert maps.get(e) is None and maps.get(other) is None and len(maps) == 0


def test_a_read_that_raced_the_export_s_end_is_not_kept() -> None:
    maps = ExportMaps()
    e = _export()
    generation = maps.generation(e.task_uuid)
    maps.drop(e.task_uuid)  # Disable ended the export while the map was being read
    assert not maps.put(e, DirtyMap.from_runs([(0, G)]), generation)
    assert maps.get(e) is None


def test_a_map_too_large_is_not_kept_and_says_so() -> None:
    maps = ExportMaps(max_runs=2)
    e = _export()
    assert not maps.put(e, DirtyMap.from_runs([(0, G), (2 * G, G), (4 * G, G)]))
    assert maps.get(e) is None and maps.too_large(e)
    assert not maps.too_large(_export("cbt-0123456789ab-000003"))
    maps.drop(e.task_uuid)
    assert not maps.too_large(e)


def test_maps_past_the_total_are_not_kept_until_room_is_made() -> None:
    """A host exporting many disks at once keeps at most `max_total_runs` runs: a map that
    does not fit beside the others is paged from its export (`too_large`)."""
    maps = ExportMaps(max_runs=3, max_total_runs=4)
    a, b = _export(), _export(volume="w" * 32)
    c = replace(_export(), task_uuid="u" * 32)
    three = DirtyMap.from_runs([(0, G), (2 * G, G), (4 * G, G)])
    one = DirtyMap.from_runs([(0, G)])
    assert maps.put(a, three) and maps.put(b, one) and maps.runs == 4
    assert not maps.put(c, one)  # no room beside a and b
    assert maps.get(c) is None and maps.too_large(c) and maps.runs == 4
    assert maps.put(a, one) and maps.runs == 2  # a's own new map replaces its old one
    assert not maps.put(a, DirtyMap.from_runs([(0, G), (2 * G, G), (4 * G, G), (6 * G, G)]))
    assert maps.get(a) is None and maps.too_large(a) and maps.runs == 1  # a's old map is gone
    maps.drop(a.task_uuid)  # a's and b's exports end
    assert maps.runs == 0 and len(maps) == 0 and not maps.too_large(a)
    assert maps.put(c, three) and maps.get(c) is three and not maps.too_large(c)
    assert maps.runs == 3
