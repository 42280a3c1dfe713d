"""The Enable plan: every name QEMU will see and every command's content, decided from the
recorded state (the task's checkpoints) and what QEMU reports (each disk's chain and bitmaps).
Pure: no QMP, no SQLite, no files; the executor (`checkpoints.enable`) records it, then runs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cbt_agent.errors import OperationError
from cbt_agent.hypervisor.libvirt import DiskInfo
from cbt_agent.model import (
    Checkpoint,
    DiskPlan,
    Layer,
    Source,
    checkpoint_name,
    checkpoint_seq,
    found_checkpoints,
    plan_disk,
    temp_bitmap_name,
    tracking_break,
)
from cbt_agent.qemu.blockdev import BlockDevice
from cbt_agent.qemu.transaction import DiskCut, checkpoint_actions
from cbt_agent.store import VolumeExport

DEFAULT_GRANULARITY = 65536  # QEMU's default for a qcow2 of 64 KiB clusters


def ours(task_uuid: str, bitmap: str) -> bool:
    return bitmap.startswith(f"cbt-{task_uuid[:12]}-")


def is_temp(task_uuid: str, bitmap: str) -> bool:
    return bitmap.startswith(f"cbt-tmp-{task_uuid[:12]}-")


def scratch_node_name(volume_uuid: str) -> str:
    # node names: at most 31 characters, starting with a letter
    return f"cbtsc-{volume_uuid[:24]}"


@dataclass(frozen=True)
class DiskView:
    """One disk of the VM as Enable plans it: libvirt's view, QEMU's device and its chain."""

    disk: DiskInfo
    dev: BlockDevice
    chain: list[Layer]  # top first

    @property
    def top(self) -> Layer:
        return self.chain[0]


def found_on(task_uuid: str, views: Sequence[DiskView]) -> list[Checkpoint]:
    """The task's checkpoints as the running VM's disks hold them, over every layer."""
    chains = {
        v.disk.volume_uuid: [(layer.filename, list(layer.bitmaps)) for layer in v.chain]
        for v in views
    }
    sizes = {v.disk.volume_uuid: v.dev.virtual_size for v in views}
    return found_checkpoints(task_uuid, chains, sizes, datetime.now(UTC))


@dataclass(frozen=True)
class StaleBitmap:
    """A bitmap on a disk's top to remove before the checkpoint: one of the task's left
    inconsistent by an unclean shutdown, or a temporary one left by an interrupted Enable."""

    node: str
    name: str
    why: str  # "inconsistent" | "left over"


@dataclass(frozen=True)
class Merge:
    """A disk's change set: the temporary bitmap made on its top and the bitmaps, on any layer
    of its chain, merged into it."""

    node: str
    target: str
    granularity: int
    sources: tuple[Source, ...]


@dataclass(frozen=True)
class EnablePlan:
    """What one Enable does, for every disk of the VM."""

    seq: int
    checkpoint: str  # the new checkpoint's bitmap, the same name on every disk
    disks: tuple[DiskPlan, ...]  # full or incremental, in the VM's disk order
    exports: tuple[VolumeExport, ...]  # recorded before the first command (phase "planned")
    breaks: Mapping[str, str]  # volume -> why its tracking broke since the latest checkpoint
    tops: Mapping[str, str]  # volume -> its top image's file, recorded with the checkpoint
    stale: tuple[StaleBitmap, ...]  # removed before the transaction
    actions: tuple[dict[str, Any], ...]  # the checkpoint transaction
    merges: tuple[Merge, ...]  # the incremental disks' change sets, made after it
    clears_pending: bool  # the pending breaks are recorded in this checkpoint: clear them
    superseded: tuple[str, ...]  # tracking was lost: the checkpoints this fresh chain ends

    @property
    def volumes(self) -> list[str]:
        return [e.volume_uuid for e in self.exports]

    @property
    def sizes(self) -> dict[str, int]:
        return {e.volume_uuid: e.size for e in self.exports}


def refuse_untrackable(views: Iterable[DiskView]) -> None:
    """OperationError naming every disk whose top image cannot hold persistent dirty bitmaps
    (raw, qcow2 v2): no change of it could be tracked, so Enable makes nothing."""
    problems = [
        f"disk {v.disk.volume_uuid} ({v.top.filename}) is {why}"
        for v in views
        if (why := v.top.bitmaps_unsupported) is not None
    ]
    if problems:
        raise OperationError(
            "; ".join(problems)
            + ": it cannot hold persistent dirty bitmaps, so its changes cannot be tracked. "
            "With the VM shut off, upgrade a qcow2 v2 image in place (qemu-img amend -f qcow2 "
            "-o compat=1.1 FILE) or convert a raw one (qemu-img convert -O qcow2), then retry"
        )


def plan_enable(
    task_uuid: str,
    seq: int,
    views: Sequence[DiskView],
    checkpoints: Sequence[Checkpoint],
    *,
    scratch_dir: Path,
    since_name: str | None = None,
    removed: Iterable[str] = (),
    pending: Mapping[str, str] | None = None,
    lost: str | None = None,
) -> EnablePlan:
    """Plan checkpoint `seq` of a task on the disks `views` (as QEMU holds them now), given the
    task's live `checkpoints` in seq order, the names of `removed` ones, the `pending` tracking
    breaks seen at a VM start, and `lost` (why every bitmap of the task is suspect: then every
    disk is a full). Changes are counted since `since_name` (None: the latest handed out)."""
    pending = pending or {}
    removed = list(removed)
    new_name = checkpoint_name(task_uuid, seq)
    tmp_name = temp_bitmap_name(task_uuid, seq)
    disks: list[DiskPlan] = []
    breaks: dict[str, str] = {}
    for v in views:
        vol = v.disk.volume_uuid
        why = pending.get(vol) or tracking_break(vol, checkpoints, v.chain)
        if why is not None:
            breaks[vol] = why
        plan = plan_disk(
            vol, checkpoints, since_name, v.chain, removed, v.dev.virtual_size, pending.get(vol)
        )
        if lost is not None:
            # every bitmap of the task is suspect: no incremental until a new full
            plan = DiskPlan(vol, "full", None, (), lost, plan.freeze)
        disks.append(plan)

    exports: list[VolumeExport] = []
    cuts: list[DiskCut] = []
    merges: list[Merge] = []
    for v, plan in zip(views, disks, strict=True):
        vol = v.disk.volume_uuid
        e = VolumeExport(
            task_uuid=task_uuid,
            volume_uuid=vol,
            checkpoint=new_name,
            device_node=v.top.node,
            scratch_node=scratch_node_name(vol),
            scratch_path=str(scratch_dir / f"{task_uuid}-{vol}.qcow2"),
            job_id=f"cbtjob-{vol}",
            export_id=f"cbtexp-{vol}",
            temp_bitmap=tmp_name if plan.mode == "incremental" else None,
            mode=plan.mode,
            since=plan.since,
            reason=plan.reason,
            size=v.dev.virtual_size,
            granularity=granularity(v.chain, plan),
            phase="planned",
        )
        exports.append(e)
        cuts.append(
            DiskCut(
                e.device_node,
                tuple(to_freeze(task_uuid, v.top, plan)),
                new_name,
            )
        )
        if e.temp_bitmap is not None:
            merges.append(Merge(e.device_node, e.temp_bitmap, e.granularity, plan.merge))

    return EnablePlan(
        seq=seq,
        checkpoint=new_name,
        disks=tuple(disks),
        exports=tuple(exports),
        breaks=breaks,
        tops={v.disk.volume_uuid: v.top.filename for v in views},
        stale=tuple(stale_bitmaps(task_uuid, views)),
        actions=tuple(checkpoint_actions(cuts)),
        merges=tuple(merges),
        clears_pending=bool(pending),
        superseded=tuple(c.name for c in checkpoints) if lost is not None else (),
    )


def stale_bitmaps(task_uuid: str, views: Iterable[DiskView]) -> list[StaleBitmap]:
    """Bitmaps that cannot be trusted or were left behind, on the writable top: the task's
    inconsistent ones (unclean shutdown) and its temporary ones from an interrupted Enable (an
    exported, busy one belongs to a live export and is left alone)."""
    out: list[StaleBitmap] = []
    for v in views:
        for b in v.top.bitmaps.values():
            if ours(task_uuid, b.name) and b.inconsistent:
                out.append(StaleBitmap(v.top.node, b.name, "inconsistent"))
            elif is_temp(task_uuid, b.name) and not b.busy:
                out.append(StaleBitmap(v.top.node, b.name, "left over"))
    return out


def to_freeze(task_uuid: str, top: Layer, plan: DiskPlan) -> list[str]:
    """The recording bitmaps of the task on the top to disable in the checkpoint transaction:
    the latest checkpoint's, and any other still recording (an adopted one whose transaction
    lost its reply recorded on beside the next): only the new one may record afterwards."""
    names = [plan.freeze] if plan.freeze else []
    for b in top.bitmaps.values():
        if (
            b.name != plan.freeze
            and checkpoint_seq(task_uuid, b.name) is not None
            and b.recording
            and not b.inconsistent
            and not b.busy
        ):
            names.append(b.name)
    return names


def granularity(chain: Sequence[Layer], plan: DiskPlan) -> int:
    """The change set's granularity: that of the newest bitmap it merges (QEMU's default, the
    cluster size, for a full: replaced by the new bitmap's once it exists)."""
    layers = {layer.node: layer for layer in chain}
    for node, name in plan.merge:
        state = layers[node].bitmaps.get(name) if node in layers else None
        if state is not None:
            return state.granularity
    return DEFAULT_GRANULARITY


def with_new_granularity(
    exports: Iterable[VolumeExport], new: Mapping[str, int]
) -> list[VolumeExport]:
    """A full export's granularity is the new checkpoint bitmap's, known once it exists
    (`new`: volume -> its granularity); an incremental keeps its change set's."""
    return [
        e
        if e.temp_bitmap
        else VolumeExport(**{**e.__dict__, "granularity": new.get(e.volume_uuid, e.granularity)})
        for e in exports
    ]
