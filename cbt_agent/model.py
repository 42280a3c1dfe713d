"""The domain: tasks, statuses, checkpoints, and the pure rules that govern them. No I/O here."""

from __future__ import annotations

import base64
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from cbt_agent.errors import OperationError


class TaskStatus(enum.StrEnum):
    CREATED = "Created"
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPED = "Stopped"
    FAILED = "Failed"


# Every allowed status change, in one place. Failed is reachable from every state.
ALLOWED_TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.CREATED: frozenset({TaskStatus.STARTING}),
    TaskStatus.STARTING: frozenset({TaskStatus.RUNNING, TaskStatus.STOPPED}),
    TaskStatus.RUNNING: frozenset({TaskStatus.STOPPED}),
    TaskStatus.STOPPED: frozenset({TaskStatus.STARTING}),
    TaskStatus.FAILED: frozenset({TaskStatus.STARTING, TaskStatus.STOPPED}),
}


def check_transition(current: TaskStatus, new: TaskStatus) -> None:
    """Raise OperationError unless `current -> new` is an allowed transition."""
    if new is TaskStatus.FAILED:
        return
    if new not in ALLOWED_TRANSITIONS[current]:
        raise OperationError(f"task status cannot change from {current} to {new}")


@dataclass(frozen=True)
class CbtTask:
    uuid: str
    name: str
    description: str | None
    vm_uuid: str
    status: TaskStatus
    create_date: datetime
    last_op_date: datetime
    reason: str | None = None  # why the last transition happened (kept for Failed)
    operation: str | None = None  # enable | disable | delete while one is in flight


@dataclass(frozen=True)
class Checkpoint:
    """One Enable's cut: a persistent bitmap of the same name on every disk it covers.

    `seq` orders checkpoints of a task. Bitmap `name` on a disk records writes from this
    checkpoint until the next one (then it is frozen).
    """

    task_uuid: str
    seq: int
    name: str
    volumes: frozenset[str]
    created: datetime
    sizes: tuple[tuple[str, int], ...] = ()  # (volume uuid, virtual size) when it was cut

    def size_of(self, volume_uuid: str) -> int | None:
        return dict(self.sizes).get(volume_uuid)


def checkpoint_name(task_uuid: str, seq: int) -> str:
    """The bitmap name of checkpoint `seq` of a task: short, unique per task, sortable."""
    return f"cbt-{task_uuid[:12]}-{seq:06d}"


def temp_bitmap_name(task_uuid: str, seq: int) -> str:
    return f"cbt-tmp-{task_uuid[:12]}-{seq:06d}"


@dataclass(frozen=True)
class BitmapState:
    """What QEMU reports of one named bitmap on one disk."""

    name: str
    recording: bool
    persistent: bool
    inconsistent: bool
    busy: bool
    granularity: int
    count: int


@dataclass(frozen=True)
class DiskPlan:
    """What one Enable does for one disk."""

    volume_uuid: str
    mode: str  # "full" | "incremental"
    since: str | None  # the checkpoint the changes are counted from (incremental)
    merge: tuple[str, ...]  # frozen bitmaps whose union is the change set (incremental)
    reason: str | None  # why full
    freeze: str | None  # the recording bitmap to disable in the checkpoint transaction


FULL_FIRST = "first checkpoint of this disk: no earlier change tracking"
FULL_UNKNOWN = "checkpoint {name} is unknown to this task"
FULL_REMOVED = "checkpoint {name} was removed by retention"
TRACKING_LOST = "change tracking lost after unclean shutdown"
FULL_NEW_DISK = "disk was added after checkpoint {name}"
FULL_RESIZED = "disk was resized since checkpoint {name} ({old} -> {new} bytes)"
FULL_MISSING = "bitmap {bitmap} is missing on this disk (change tracking lost)"
FULL_INCONSISTENT = "change tracking lost after unclean shutdown (bitmap {bitmap} inconsistent)"


def plan_disk(
    volume_uuid: str,
    checkpoints: Sequence[Checkpoint],
    since_name: str | None,
    bitmaps: dict[str, BitmapState],
    removed_names: Iterable[str] = (),
    size: int | None = None,
) -> DiskPlan:
    """Decide full or incremental for one disk, and which bitmaps make the change set.

    `checkpoints` are the task's live checkpoints in seq order; `since_name` the asked
    checkpoint (None = the latest); `bitmaps` what QEMU has on the disk, by name. Never an
    incremental built on a bitmap that is missing, inconsistent, or of a disk added later.
    """
    latest = checkpoints[-1] if checkpoints else None
    freeze: str | None = None
    if latest is not None and volume_uuid in latest.volumes:
        state = bitmaps.get(latest.name)
        if state is not None and state.recording and not state.inconsistent:
            freeze = latest.name

    def full(reason: str) -> DiskPlan:
        return DiskPlan(volume_uuid, "full", None, (), reason, freeze)

    if not checkpoints:
        if since_name is not None:
            return full(FULL_UNKNOWN.format(name=since_name))
        return full(FULL_FIRST)
    names = [c.name for c in checkpoints]
    if since_name is None:
        since_name = names[-1]
    if since_name not in names:
        if since_name in set(removed_names):
            return full(FULL_REMOVED.format(name=since_name))
        return full(FULL_UNKNOWN.format(name=since_name))
    chain = checkpoints[names.index(since_name) :]
    for cp in chain:
        if volume_uuid not in cp.volumes:
            return full(FULL_NEW_DISK.format(name=cp.name))
        old = cp.size_of(volume_uuid)
        if size is not None and old is not None and old != size:
            return full(FULL_RESIZED.format(name=cp.name, old=old, new=size))
        state = bitmaps.get(cp.name)
        if state is None:
            return full(FULL_MISSING.format(bitmap=cp.name))
        if state.inconsistent:
            return full(FULL_INCONSISTENT.format(bitmap=cp.name))
    return DiskPlan(
        volume_uuid, "incremental", since_name, tuple(c.name for c in chain), None, freeze
    )


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


def retention_victims(checkpoints: Sequence[Checkpoint], keep: int) -> list[Checkpoint]:
    """Checkpoints to remove, oldest first, so that at most `keep` remain (keep >= 1)."""
    if keep < 1 or len(checkpoints) <= keep:
        return []
    return list(checkpoints[: len(checkpoints) - keep])
