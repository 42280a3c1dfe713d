"""What the engine's operations return: domain values, not JSON. The API turns them into
ZStack's replies (`cbt_agent.api.replies`)."""

from __future__ import annotations

from dataclasses import dataclass

from cbt_agent.dirtymap import DirtyMap
from cbt_agent.hypervisor.libvirt import DiskInfo
from cbt_agent.model import CbtTask
from cbt_agent.qemu.psk import Psk
from cbt_agent.qemu.storage_daemon import BINARY
from cbt_agent.store import NbdServer, ResourceRef, VolumeExport


@dataclass(frozen=True)
class TaskView:
    """A task with the resources it covers (its VM, then its volumes)."""

    task: CbtTask
    refs: list[ResourceRef]


@dataclass(frozen=True)
class VolumeBackup:
    """One disk after an Enable: where its point-in-time view is exported and what changed."""

    disk: DiskInfo
    export: VolumeExport
    server: NbdServer
    bitmap: bytes  # bit i set = cluster i changed, LSB first within each byte
    changed_bytes: int
    quiesced: bool  # the guest's filesystems were frozen for the checkpoint
    psk: Psk | None = None  # what a client proves itself with ([nbd] tls = "psk")
    scratch_budget: int | None = None  # bytes its scratch may fill (None: no scratch)
    # the change set's dirty runs as QEMU reported them (None for a full): the service keeps
    # them for the changed-areas pages while the export lives
    dirty_map: DirtyMap | None = None

    @property
    def dirty_bitmap_context(self) -> str | None:
        """The NBD meta context of the changes; None for a full (read base:allocation)."""
        t = self.export.temp_bitmap
        return f"qemu:dirty-bitmap:{t}" if t else None


@dataclass(frozen=True)
class ChangedAreas:
    """One page of a disk's changed areas in the current checkpoint: maximal runs between
    `start` and `end`; `done` when nothing lies beyond."""

    export: VolumeExport
    start: int
    end: int
    areas: list[tuple[int, int]]  # (offset, length)
    done: bool


@dataclass(frozen=True)
class Unexported:
    """An offline export that UnexportNbdVolumes ended (`pid` None and nothing else: there was
    none). `start_refused`: QEMU's words when a start of the VM failed meanwhile (the daemon
    held its images' locks); it can be started again now."""

    pid: int | None = None
    images: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    start_refused: str | None = None

    @property
    def message(self) -> str:
        """What the task's history and the reply say: which process held the images' locks,
        and a start of the VM that failed on them."""
        if self.pid is None:
            text = f"unexported: {BINARY} had exited, nothing holds the images' locks"
        else:
            text = f"unexported: {BINARY} pid {self.pid} stopped, the images' locks released"
        if self.start_refused:
            text += (
                f"; a start of the VM failed while they were held ({self.start_refused}): "
                "it can start now"
            )
        return text[:2000]
