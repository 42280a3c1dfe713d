"""libvirt access: find a VM (domain name = vmInstanceUuid) and its disks (serial = volumeUuid).

INTERFACE STUB: to be implemented. All blocking libvirt-python calls go through
asyncio.to_thread (or libvirtaio), never on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DiskInfo:
    volume_uuid: str  # <serial>
    alias: str  # libvirt device alias, e.g. "virtio-disk0"; QOM path /machine/peripheral/<alias>
    target: str  # "vda"
    device_id: int  # position among the VM's serial-carrying disks, in domain XML order (0 = root)
    install_path: str  # <source file=...> (or dev/name for block/network disks)
    format: str  # <driver type=...>: "qcow2", "raw"
    bus: str  # "virtio", "scsi", ...


@dataclass(frozen=True)
class VmInfo:
    vm_uuid: str  # domain name
    running: bool
    disks: tuple[DiskInfo, ...]
