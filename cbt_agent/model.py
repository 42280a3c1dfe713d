"""The domain: tasks, statuses, checkpoints, and the pure rules that govern them. No I/O here."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from cbt_agent.errors import OperationError
from cbt_agent.reasons import (
    FULL_BROKEN,
    FULL_FIRST,
    FULL_GAP,
    FULL_INCONSISTENT,
    FULL_LAYER_SIZE,
    FULL_MISSING,
    FULL_NEW_DISK,
    FULL_NEW_TOP,
    FULL_NONE_HANDED_OUT,
    FULL_REMOVED,
    FULL_RESIZED,
    FULL_UNKNOWN,
)


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
    released: str | None = None  # why its disks belong elsewhere now (VM migrated away)


@dataclass(frozen=True)
class Checkpoint:
    """One Enable's cut: a persistent bitmap of the same name on every disk it covers.

    `seq` orders checkpoints of a task. Bitmap `name` on a disk records writes from this
    checkpoint until the next one (then it is frozen). `handed_out`: its Enable reached
    Running, so a caller holds its name; only such a checkpoint is a default base.
    """

    task_uuid: str
    seq: int
    name: str
    volumes: frozenset[str]
    created: datetime
    sizes: tuple[tuple[str, int], ...] = ()  # (volume uuid, virtual size) when it was cut
    handed_out: bool = True
    tops: tuple[tuple[str, str], ...] = ()  # (volume uuid, top image) when it was cut
    # (volume uuid, why): the disk's tracking was interrupted before this checkpoint was cut
    breaks: tuple[tuple[str, str], ...] = ()

    def size_of(self, volume_uuid: str) -> int | None:
        return dict(self.sizes).get(volume_uuid)

    def top_of(self, volume_uuid: str) -> str | None:
        return dict(self.tops).get(volume_uuid)


def new_uuid() -> str:
    """A fresh ZStack uuid (32 lowercase hex digits)."""
    return uuid.uuid4().hex


def checkpoint_name(task_uuid: str, seq: int) -> str:
    """The bitmap name of checkpoint `seq` of a task: short, unique per task, sortable."""
    return f"cbt-{task_uuid[:12]}-{seq:06d}"


def temp_bitmap_name(task_uuid: str, seq: int) -> str:
    return f"cbt-tmp-{task_uuid[:12]}-{seq:06d}"


def checkpoint_seq(task_uuid: str, bitmap: str) -> int | None:
    """The seq of a bitmap named like this task's checkpoints (not its temporary ones)."""
    prefix = f"cbt-{task_uuid[:12]}-"
    rest = bitmap.removeprefix(prefix)
    if rest == bitmap or len(rest) != 6 or not rest.isdigit():
        return None
    return int(rest)


# QEMU's default dirty-bitmap granularity (= a qcow2 cluster): bytes per bit of a change set.
DEFAULT_GRANULARITY: Final = 65536


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
class Layer:
    """One image of a disk's backing chain as QEMU holds it (the top first in a chain)."""

    node: str  # its format node, where its bitmaps live
    filename: str
    size: int  # virtual size
    bitmaps: Mapping[str, BitmapState]
    read_only: bool = False
    driver: str = "qcow2"
    compat: str = "1.1"  # qcow2's version: "0.10" (v2) cannot hold persistent bitmaps

    @property
    def bitmaps_unsupported(self) -> str | None:
        """Why this image cannot hold persistent dirty bitmaps, or None when it can."""
        if self.driver != "qcow2":
            return f"a {self.driver or 'non-qcow2'} image"
        if self.compat == "0.10":
            return "a qcow2 v2 image (compat=0.10)"
        return None


# A bitmap on one layer of a disk: (node name, bitmap name), as block-dirty-bitmap-merge takes it.
Source = tuple[str, str]


@dataclass(frozen=True)
class DiskPlan:
    """What one Enable does for one disk."""

    volume_uuid: str
    mode: str  # "full" | "incremental"
    since: str | None  # the checkpoint the changes are counted from (incremental)
    merge: tuple[Source, ...]  # bitmaps whose union is the change set (incremental)
    reason: str | None  # why full
    freeze: str | None  # the recording bitmap on the top to disable in the transaction


def found_checkpoints(
    task_uuid: str,
    disks: Mapping[str, Sequence[tuple[str, Iterable[str]]]],
    sizes: Mapping[str, int],
    created: datetime,
) -> list[Checkpoint]:
    """The task's checkpoints as its disks hold them (a task arriving from another host, or a
    database lost): `disks` maps each volume to its chain, top first, as (image, bitmap names).

    Each checkpoint covers every disk that carries any bitmap of the task, so a disk missing
    one is judged by the chain rules (a full naming the bitmap), never guessed. None is handed
    out here: the caller names its last checkpoint to get an incremental. The latest one's top
    is recorded where it sits on the current top (then a later top swap is named)."""
    where: dict[str, set[str]] = {}
    for volume, layers in disks.items():
        for _image, names in layers:
            for name in names:
                if checkpoint_seq(task_uuid, name) is not None:
                    where.setdefault(name, set()).add(volume)
    carriers = frozenset(v for vols in where.values() for v in vols)
    ordered = sorted(where, key=lambda n: checkpoint_seq(task_uuid, n) or 0)
    out: list[Checkpoint] = []
    for name in ordered:
        tops: tuple[tuple[str, str], ...] = ()
        if name == ordered[-1]:
            tops = tuple(
                sorted(
                    (v, layers[0][0])
                    for v, layers in disks.items()
                    if layers and name in set(layers[0][1])
                )
            )
        out.append(
            Checkpoint(
                task_uuid=task_uuid,
                seq=checkpoint_seq(task_uuid, name) or 0,
                name=name,
                volumes=carriers,
                created=created,
                sizes=tuple(sorted((v, sizes[v]) for v in carriers if v in sizes)),
                handed_out=False,
                tops=tops,
            )
        )
    return out


def tracking_break(
    volume_uuid: str, checkpoints: Sequence[Checkpoint], layers: Sequence[Layer]
) -> str | None:
    """Why the disk's tracking is not continuous since the latest checkpoint covering it
    (None: it is). Checked at every cut and VM start, and recorded: a later stream or copy can
    fold an older layer's bitmaps into a top that was untracked, and then look whole."""
    mine = [c for c in checkpoints if volume_uuid in c.volumes]
    if not mine or not layers:
        return None
    latest = mine[-1]
    before = mine[-2].name if len(mine) > 1 else None
    sources = chain_sources(
        [latest.name], layers, latest.top_of(volume_uuid), before, latest.top_of(volume_uuid)
    )
    return sources if isinstance(sources, str) else None


def default_base(checkpoints: Sequence[Checkpoint]) -> Checkpoint | None:
    """The base of an Enable without `bitmapName`: the latest checkpoint handed out."""
    for c in reversed(checkpoints):
        if c.handed_out:
            return c
    return None


def chain_sources(
    names: Sequence[str],
    layers: Sequence[Layer],
    recorded_top: str | None = None,
    before: str | None = None,
    base_top: str | None = None,
) -> tuple[Source, ...] | str:
    """Which bitmaps of which layers hold every change since `names[0]`, or why none can.

    `names` are the checkpoints base .. latest; `layers` the disk's chain, top first; `before`
    the live checkpoint just before the base on this disk (None: there is none). A bitmap
    records writes to its layer only from when it is made (a checkpoint, or libvirt's empty
    copy onto a new snapshot overlay of the bitmap recording then), so the union of the
    task's bitmaps base .. latest over the layers that took writes since the base never holds a
    write from before it: all of them are merged. Whether they hold every write since it is
    what the rest checks:
    the top must hold the latest bitmap; on each layer the bitmaps run unbroken back from the
    one it must hold; where the run stops at j above the base, the layer was made while j
    recorded, so the layer below must hold j (it took the writes of j's time until then).
    Where the run reaches the base on a layer that was not the top when the base was cut
    (`base_top`, recorded then) and lacks `before`, the layer was made during the base's time,
    and the layer below must hold the base too. A missing bitmap there is a gap, an
    inconsistent one lost tracking: a full, with the reason. (`recorded_top` is the top when
    the latest was cut: it names what changed when the top has no tracking.)
    """
    wanted = set(names)
    for layer in layers:
        for name in names:
            state = layer.bitmaps.get(name)
            if state is not None and state.inconsistent:
                return FULL_INCONSISTENT.format(bitmap=name)
    need = len(names) - 1
    required = True
    missing: str | None = None
    walked = 0  # the layers that took writes since the base: the top and those it needs
    for depth, layer in enumerate(layers):
        if names[need] not in layer.bitmaps:
            if depth == 0:
                if recorded_top is not None and recorded_top != layer.filename:
                    return FULL_NEW_TOP.format(
                        old=recorded_top, new=layer.filename, bitmap=names[need]
                    )
                return FULL_MISSING.format(bitmap=names[need])
            if required:
                return FULL_GAP.format(bitmap=names[need], image=layer.filename)
            break
        if layer.size != layers[0].size:
            return FULL_LAYER_SIZE.format(image=layer.filename, old=layer.size, new=layers[0].size)
        walked = depth + 1
        j = need
        while j >= 0 and names[j] in layer.bitmaps:
            j -= 1
        if j >= 0:
            need, required, missing = j + 1, True, names[j]
        elif layer.filename == base_top or (before is not None and before in layer.bitmaps):
            missing = None
            break  # this layer was there when the base was cut: nothing below is newer
        else:
            need, required, missing = 0, before is not None, None
    if missing is not None:
        return FULL_MISSING.format(bitmap=missing)
    return tuple(
        (layer.node, name)
        for layer in layers[:walked]
        for name in reversed(names)
        if name in wanted and name in layer.bitmaps
    )


def plan_disk(
    volume_uuid: str,
    checkpoints: Sequence[Checkpoint],
    since_name: str | None,
    layers: Sequence[Layer],
    removed_names: Iterable[str] = (),
    size: int | None = None,
    pending_break: str | None = None,
) -> DiskPlan:
    """Decide full or incremental for one disk, and which bitmaps make the change set.

    `checkpoints` are the task's live checkpoints in seq order; `since_name` the asked
    checkpoint (None = the latest handed out); `layers` the disk's backing chain as QEMU holds
    it, top first; `pending_break` why the disk's tracking was seen interrupted since the
    latest checkpoint (a top without tracking at a VM start). Never an incremental built on a
    bitmap that is missing or inconsistent on a layer that needs it, across an interruption of
    the disk's tracking, or of a disk added later.
    """
    top = layers[0] if layers else Layer("", "", size or 0, {})
    latest = checkpoints[-1] if checkpoints else None
    freeze: str | None = None
    if latest is not None and volume_uuid in latest.volumes:
        state = top.bitmaps.get(latest.name)
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
        base = default_base(checkpoints)
        if base is None:
            return full(FULL_NONE_HANDED_OUT)
        since_name = base.name
    if since_name not in names:
        if since_name in set(removed_names):
            return full(FULL_REMOVED.format(name=since_name))
        return full(FULL_UNKNOWN.format(name=since_name))
    chain = checkpoints[names.index(since_name) :]
    if pending_break is not None:
        return full(pending_break)
    for cp in chain[1:]:
        why = dict(cp.breaks).get(volume_uuid)
        if why is not None:
            return full(FULL_BROKEN.format(name=cp.name, why=why))
    for cp in chain:
        if volume_uuid not in cp.volumes:
            return full(FULL_NEW_DISK.format(name=cp.name))
        old = cp.size_of(volume_uuid)
        if size is not None and old is not None and old != size:
            return full(FULL_RESIZED.format(name=cp.name, old=old, new=size))
    if not layers:
        return full(FULL_MISSING.format(bitmap=chain[-1].name))
    first = names.index(since_name)
    before = checkpoints[first - 1] if first > 0 else None
    sources = chain_sources(
        [c.name for c in chain],
        layers,
        chain[-1].top_of(volume_uuid),
        before.name if before is not None and volume_uuid in before.volumes else None,
        chain[0].top_of(volume_uuid),
    )
    if isinstance(sources, str):
        return full(sources)
    return DiskPlan(volume_uuid, "incremental", since_name, sources, None, freeze)


def retention_victims(checkpoints: Sequence[Checkpoint], keep: int) -> list[Checkpoint]:
    """Checkpoints to remove, oldest first, so that at most `keep` remain (keep >= 1)."""
    if keep < 1 or len(checkpoints) <= keep:
        return []
    return list(checkpoints[: len(checkpoints) - keep])
