"""One VM's bitmaps beside what the database expects, disk by disk and layer by layer, with every
mismatch flagged. Pure: the chains come from QMP or qemu-img, the expectation from SQLite.

The expectation, from the engine's own rules: every live checkpoint of the task that covers a
disk is a bitmap on some layer of that disk's chain; on the image it was cut on (recorded with
it) while that image is still in the chain, never below it; and the latest one on the top,
where writes are recorded. A temporary bitmap belongs only to an open export. A bitmap named
like the agent's that none of this explains is unknown. libvirt's empty copies of a recording
bitmap on a snapshot overlay sit above the image it was cut on: expected.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cbt_agent.model import (
    BitmapState,
    CbtTask,
    Checkpoint,
    DiskPlan,
    Layer,
    checkpoint_name,
    plan_disk,
    temp_bitmap_name,
    tracking_break,
)

# a candidate only: the name must also come back out of model's naming functions
_AGENT_NAME = re.compile(r"^cbt-(tmp-)?([0-9a-f]{12})-([0-9]{6})$")


@dataclass(frozen=True)
class AgentBitmap:
    """A bitmap name as the agent makes them: a task's checkpoint or temporary change set."""

    prefix: str  # the first 12 hex digits of the task's uuid
    seq: int
    temporary: bool


def agent_bitmap(name: str) -> AgentBitmap | None:
    """What an agent-made bitmap name says (None: not named like the agent's)."""
    m = _AGENT_NAME.match(name)
    if m is None:
        return None
    temporary, prefix, seq = bool(m.group(1)), m.group(2), int(m.group(3))
    made = temp_bitmap_name(prefix, seq) if temporary else checkpoint_name(prefix, seq)
    return AgentBitmap(prefix, seq, temporary) if made == name else None


def task_prefix(task_uuid: str) -> str:
    """The part of a task's uuid its bitmap names carry."""
    parsed = agent_bitmap(checkpoint_name(task_uuid, 1))
    if parsed is None:
        raise ValueError(f"{task_uuid!r} is not a task uuid")
    return parsed.prefix


class Flag(enum.StrEnum):
    MISSING = "missing"
    INCONSISTENT = "inconsistent"
    UNKNOWN = "unknown"
    WRONG_LAYER = "wrong-layer"


LEGEND: Mapping[Flag, str] = {
    Flag.MISSING: "a checkpoint the database holds is on no layer of the disk",
    Flag.INCONSISTENT: "QEMU did not close the image cleanly: the bitmap cannot be trusted",
    Flag.UNKNOWN: "named like the agent's, but no live checkpoint or open export of the "
    "database explains it here",
    Flag.WRONG_LAYER: "not on the layer the database expects (the image it was cut on, or the "
    "top, which records the writes)",
}


@dataclass(frozen=True)
class Recorded:
    """What the database holds for one VM (task None: it has no task)."""

    task: CbtTask | None
    checkpoints: Sequence[Checkpoint] = ()  # live, oldest first
    removed: frozenset[str] = frozenset()  # checkpoint names removed by retention
    temp_bitmaps: Mapping[str, str] = field(default_factory=dict)  # volume -> open export's
    tasks_by_prefix: Mapping[str, CbtTask] = field(default_factory=dict)  # every task
    pending: Mapping[str, str] = field(default_factory=dict)  # volume -> break seen at start
    tracking_lost: str | None = None


@dataclass(frozen=True)
class BitmapRow:
    """One bitmap on one layer, or one the database expects and the layer lacks."""

    layer: int | None  # index in the chain, 0 = top; None: expected on no particular layer
    name: str
    state: str  # recording | frozen | busy | inconsistent | absent
    granularity: int | None
    count: int | None  # dirty bytes (QMP only; None from qemu-img or when absent)
    expected: str | None  # what the database has it as; None: not the agent's, or nothing
    flags: tuple[Flag, ...] = ()
    detail: str | None = None


@dataclass(frozen=True)
class DiskAudit:
    volume_uuid: str
    target: str
    layers: tuple[Layer, ...]
    bitmaps: tuple[BitmapRow, ...]
    next_enable: DiskPlan | None  # what an Enable now would do (None: no task)
    tracking: str | None  # why the tracking since the latest checkpoint is broken (None: not)
    error: str | None = None  # the chain could not be read

    @property
    def flags(self) -> list[Flag]:
        return [f for row in self.bitmaps for f in row.flags]

    @property
    def consistent(self) -> bool:
        return self.error is None and not self.flags


def state_of(b: BitmapState) -> str:
    if b.inconsistent:
        return "inconsistent"
    if b.busy:
        return "busy"
    return "recording" if b.recording else "frozen"


def unreadable(volume_uuid: str, target: str, error: str) -> DiskAudit:
    return DiskAudit(volume_uuid, target, (), (), None, None, error)


def audit_disk(
    volume_uuid: str,
    target: str,
    layers: Sequence[Layer],
    recorded: Recorded,
    *,
    counted: bool = True,
) -> DiskAudit:
    """Flag every mismatch between a disk's chain (`layers`, top first) and the database.
    `counted`: the layers carry dirty counts (read through QMP, not from the files)."""
    task = recorded.task
    mine = [c for c in recorded.checkpoints if volume_uuid in c.volumes]
    by_name = {c.name: c for c in recorded.checkpoints}
    latest = mine[-1] if mine else None
    files = [layer.filename for layer in layers]

    def home(cp: Checkpoint) -> int | None:
        """The layer of the image it was cut on, while that image is in the chain."""
        top = cp.top_of(volume_uuid)
        return files.index(top) if top in files else None

    def label(cp: Checkpoint) -> str:
        return f"checkpoint {cp.seq}" + (" (latest)" if cp is latest else "")

    def judge(b: BitmapState, depth: int) -> tuple[str | None, tuple[Flag, ...], str | None]:
        """(what the database has it as, flags, why) for one bitmap on one layer."""
        parsed = agent_bitmap(b.name)
        if parsed is None:
            return None, (), None  # not the agent's: shown, never judged
        flags: tuple[Flag, ...] = (Flag.INCONSISTENT,) if b.inconsistent else ()
        if task is None or parsed.prefix != task_prefix(task.uuid):
            other = recorded.tasks_by_prefix.get(parsed.prefix)
            why = (
                f"of task {other.uuid} (VM {other.vm_uuid})"
                if other is not None
                else "of a task the database does not know (`cbt-agent sweep` lists it)"
            )
            return None, (*flags, Flag.UNKNOWN), why
        if parsed.temporary:
            if depth == 0 and recorded.temp_bitmaps.get(volume_uuid) == b.name:
                return "change set of the open export", flags, None
            why = "temporary, with no export open (the next Enable removes it)"
            return None, (*flags, Flag.UNKNOWN), why
        cp = by_name.get(b.name)
        if cp is None:
            why = (
                "removed by retention, left on this layer"
                if b.name in recorded.removed
                else "not in the database (the next Enable adopts it into the chain)"
            )
            return None, (*flags, Flag.UNKNOWN), why
        if volume_uuid not in cp.volumes:
            return None, (*flags, Flag.UNKNOWN), f"checkpoint {cp.seq} does not cover this disk"
        where = home(cp)
        if where is not None and depth > where:
            why = f"below layer {where}, the image it was cut on"
            return label(cp), (*flags, Flag.WRONG_LAYER), why
        return label(cp), flags, None

    rows: list[BitmapRow] = []
    for depth, layer in enumerate(layers):
        for b in sorted(layer.bitmaps.values(), key=lambda b: b.name):
            expected, flags, detail = judge(b, depth)
            count = b.count if counted else None
            rows.append(
                BitmapRow(depth, b.name, state_of(b), b.granularity, count, expected, flags, detail)
            )

    for cp in mine:
        found = [d for d, layer in enumerate(layers) if cp.name in layer.bitmaps]
        want: set[int] = {0} if cp is latest else set()
        where = home(cp)
        if where is not None:
            want.add(where)
        if not found:
            at = min(want) if want else None
            why = "on no layer of the disk"
            rows.append(
                BitmapRow(at, cp.name, "absent", None, None, label(cp), (Flag.MISSING,), why)
            )
            continue
        seen = ", ".join(f"layer {d}" for d in found)
        for d in sorted(want - set(found)):
            why = "the top records the writes" if d == 0 and cp is latest else "it was cut here"
            rows.append(
                BitmapRow(
                    d,
                    cp.name,
                    "absent",
                    None,
                    None,
                    label(cp),
                    (Flag.WRONG_LAYER,),
                    f"not on this layer ({why}); found on {seen}",
                )
            )

    rows.sort(key=lambda r: (r.layer if r.layer is not None else len(layers), r.name))
    plan: DiskPlan | None = None
    tracking: str | None = None
    if task is not None:
        checkpoints = list(recorded.checkpoints)
        size = layers[0].size if layers else None
        pending = recorded.pending.get(volume_uuid)
        plan = plan_disk(
            volume_uuid, checkpoints, None, list(layers), recorded.removed, size, pending
        )
        if recorded.tracking_lost is not None:
            plan = DiskPlan(volume_uuid, "full", None, (), recorded.tracking_lost, plan.freeze)
        tracking = pending or tracking_break(volume_uuid, checkpoints, list(layers))
    return DiskAudit(volume_uuid, target, tuple(layers), tuple(rows), plan, tracking)
