"""The change sets of the open exports, kept in memory for the changed-areas pages.

Enable reads each disk's whole dirty map once (its reply's `bitmapBase64` needs it). Asked for
changed areas page by page, the agent used to connect to the export again and walk its map from
the page's start every time; now it pages from the runs Enable read. They are exactly what QEMU
reports for as long as the export lives: an exported change set is a disabled (frozen) bitmap,
and no write or trim changes it. The copy is dropped when the task's exports end; it is keyed
by what names the export in the database (checkpoint, change-set bitmap, export id, size), so a
later export of the same disk never meets an older copy.

A full has no change set: its changed areas are the allocated ones of the point-in-time view,
which a backup client's trims change while it reads: those are never kept here.
"""

from __future__ import annotations

from collections import defaultdict

from cbt_agent.dirtymap import DirtyMap
from cbt_agent.store import VolumeExport

# past this many runs (16 bytes each: 64 MiB) a map is not kept, and its pages are read from
# the export each time: a checkerboard 1 TiB disk at 64 KiB has 8 million
MAX_RUNS = 1 << 22
# and past this many in all the maps kept at once (256 MiB), a further map is not kept either: a
# host exporting hundreds of disks at once must not hold hundreds of large maps
MAX_TOTAL_RUNS = 1 << 24

Identity = tuple[str, str | None, str, int]


def identity(export: VolumeExport) -> Identity:
    """What names one export of a disk: a new Enable cuts a new checkpoint."""
    return (export.checkpoint, export.temp_bitmap, export.export_id, export.size)


class ExportMaps:
    """The dirty runs of each open export, by task and volume."""

    def __init__(self, max_runs: int = MAX_RUNS, max_total_runs: int = MAX_TOTAL_RUNS) -> None:
        self.max_runs = max_runs
        self.max_total_runs = max_total_runs
        self._maps: dict[tuple[str, str], tuple[Identity, DirtyMap]] = {}
        self._runs = 0  # in all the kept maps
        self._too_large: dict[tuple[str, str], Identity] = {}
        # bumped by each drop: a read that began before it must not put its map back
        self._generation: defaultdict[str, int] = defaultdict(int)

    def __len__(self) -> int:
        return len(self._maps)

    @property
    def runs(self) -> int:
        """The runs held in all the kept maps (16 bytes each)."""
        return self._runs

    def get(self, export: VolumeExport) -> DirtyMap | None:
        """The kept change set of this very export; None when not kept."""
        kept = self._maps.get((export.task_uuid, export.volume_uuid))
        if kept is None or kept[0] != identity(export):
            return None
        return kept[1]

    def too_large(self, export: VolumeExport) -> bool:
        """This export's map was found too large to keep (by itself, or beside the maps kept
        already): page it from the export."""
        return self._too_large.get((export.task_uuid, export.volume_uuid)) == identity(export)

    def generation(self, task_uuid: str) -> int:
        """Take before reading a map from the export; hand to `put`."""
        return self._generation[task_uuid]

    def put(self, export: VolumeExport, dirty: DirtyMap, generation: int | None = None) -> bool:
        """Keep `dirty` for `export`; True when kept. Not kept when it is too large, by itself
        or beside the maps kept already, or when the task's exports were dropped since
        `generation` was taken (the read raced their end)."""
        if generation is not None and generation != self._generation[export.task_uuid]:
            return False
        key = (export.task_uuid, export.volume_uuid)
        self._forget(key)
        if len(dirty) > self.max_runs or self._runs + len(dirty) > self.max_total_runs:
            self._too_large[key] = identity(export)
            return False
        self._too_large.pop(key, None)
        self._maps[key] = (identity(export), dirty)
        self._runs += len(dirty)
        return True

    def _forget(self, key: tuple[str, str]) -> None:
        kept = self._maps.pop(key, None)
        if kept is not None:
            self._runs -= len(kept[1])

    def drop(self, task_uuid: str) -> None:
        """The task's exports end (or are replaced): forget their maps."""
        self._generation[task_uuid] += 1
        for key in [k for k in self._maps if k[0] == task_uuid]:
            self._forget(key)
        for key in [k for k in self._too_large if k[0] == task_uuid]:
            del self._too_large[key]
