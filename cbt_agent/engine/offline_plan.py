"""The plan of an offline export (ExportNbdVolumes of a VM that is shut off). Pure: no
qemu-img, no daemon, no SQLite; `offline.export_volumes` records it, then runs it.

Checkpoint semantics offline, and why:

- **The base** is the same as a running Enable's: the `bitmapName` the caller gives (in
  `params` or as a `bitmapName::<name>` system tag), else the latest checkpoint handed out. The
  change set is the task's bitmaps base .. latest over every layer of each disk's chain, read
  from the qcow2 files, judged by the same rules (`plan.plan_enable` over the files' layers):
  a missing or inconsistent bitmap, a top that changed without tracking (a `qemu-img` snapshot
  while the VM was off), an unknown or retired base, a resized disk, or tracking lost at a
  crash give a full with the reason.
- **A new checkpoint is cut**, exactly as a running Enable cuts one, and handed out: on each
  exported disk's top image a new persistent, recording bitmap is added (`qemu-img bitmap
  --add`) and the task's recording ones are frozen (`--disable`). The VM is off, so nothing
  is written between the two and none of them while the daemon holds the images (read-only,
  locked): the new bitmap starts at exactly the state this export shows. When the VM runs
  again it records into the new bitmap, so the next Enable with the handed-out name holds
  every write made after this backup and none from before it; an older base still merges
  through it. Adding the new bitmap before freezing the old ones means there is no moment
  without a recording bitmap, whatever is interrupted.
- **Only the exported disks** are in the checkpoint (`volumeUuids` may name some of the VM's
  disks): a disk left out keeps recording in its own latest bitmap and is judged on its own
  at its next export (a full there, never a silent gap).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cbt_agent.engine.plan import DiskView, EnablePlan, plan_enable, to_freeze
from cbt_agent.hypervisor.libvirt import DiskInfo
from cbt_agent.model import Checkpoint, Layer
from cbt_agent.qemu.blockdev import BlockDevice
from cbt_agent.qemu.images import ImageLayer
from cbt_agent.qemu.storage_daemon import ImageNode
from cbt_agent.store import DaemonExport


def node_names(device_id: int, depth: int) -> tuple[str, str]:
    """The daemon's format and file node of image `depth` (0 = top) of disk `device_id`."""
    return f"cbt-d{device_id}-{depth}", f"cbt-d{device_id}-{depth}-file"


def export_id(volume_uuid: str) -> str:
    return f"cbtexp-{volume_uuid}"  # ids must start with a letter


def disk_view(disk: DiskInfo, chain: Sequence[ImageLayer]) -> DiskView:
    """A shut-off disk as Enable's rules read a disk: its chain's layers (as the daemon will
    name their nodes) with the bitmaps the files carry."""
    layers = [
        Layer(
            node=node_names(disk.device_id, depth)[0],
            filename=image.filename,
            size=image.size,
            bitmaps=image.bitmaps,
            read_only=True,
            driver=image.format,
        )
        for depth, image in enumerate(chain)
    ]
    top = layers[0]
    dev = BlockDevice(disk.alias or disk.target, top.node, top.driver, top.size, top.filename)
    return DiskView(disk, dev, layers)


def image_nodes(views: Iterable[DiskView]) -> list[ImageNode]:
    """Every image the daemon opens, the bottom of each chain first."""
    out: list[ImageNode] = []
    for v in views:
        for depth in reversed(range(len(v.chain))):
            layer = v.chain[depth]
            node, file_node = node_names(v.disk.device_id, depth)
            below = v.chain[depth + 1].node if depth + 1 < len(v.chain) else None
            out.append(ImageNode(node, file_node, layer.filename, layer.driver, below))
    return out


@dataclass(frozen=True)
class TopCut:
    """The offline checkpoint on one disk's top image: add `new`, then freeze `freeze`."""

    image: str
    new: str
    freeze: tuple[str, ...]


@dataclass(frozen=True)
class OfflinePlan:
    enable: EnablePlan  # the same decisions a running Enable makes on these layers
    exports: tuple[DaemonExport, ...]
    cuts: tuple[TopCut, ...]
    stale: tuple[tuple[str, str], ...]  # (image, bitmap) removed from a top before the cut
    images: tuple[ImageNode, ...]

    @property
    def checkpoint(self) -> str:
        return self.enable.checkpoint


def plan_offline(
    task_uuid: str,
    vm_uuid: str,
    seq: int,
    views: Sequence[DiskView],
    checkpoints: Sequence[Checkpoint],
    *,
    since_name: str | None = None,
    removed: Iterable[str] = (),
    pending: Mapping[str, str] | None = None,
    lost: str | None = None,
) -> OfflinePlan:
    """Plan checkpoint `seq` of a task, cut offline on the disks `views` (their chains read
    from the files), and their exports by the VM's storage daemon."""
    enable = plan_enable(
        task_uuid,
        seq,
        views,
        checkpoints,
        scratch_dir=Path("/nonexistent"),  # no scratch offline: the images do not change
        since_name=since_name,
        removed=removed,
        pending=pending,
        lost=lost,
    )
    exports: list[DaemonExport] = []
    cuts: list[TopCut] = []
    for v, disk, e in zip(views, enable.disks, enable.exports, strict=True):
        exports.append(
            DaemonExport(
                vm_uuid=vm_uuid,
                volume_uuid=e.volume_uuid,
                checkpoint=enable.checkpoint,
                node=v.top.node,
                image=v.top.filename,
                export_id=export_id(e.volume_uuid),
                temp_bitmap=e.temp_bitmap,
                mode=e.mode,
                since=e.since,
                reason=e.reason,
                size=e.size,
                granularity=e.granularity,
            )
        )
        cuts.append(
            TopCut(v.top.filename, enable.checkpoint, tuple(to_freeze(task_uuid, v.top, disk)))
        )
    tops = {v.top.node: v.top.filename for v in views}
    stale = tuple((tops[s.node], s.name) for s in enable.stale)
    return OfflinePlan(enable, tuple(exports), tuple(cuts), stale, tuple(image_nodes(views)))
