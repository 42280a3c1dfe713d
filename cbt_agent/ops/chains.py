"""Each disk's backing chain with its bitmaps, read without the agent and without changing
anything: through QMP while the VM runs, from the image files (qemu-img -U) when it is off.

QMP goes through the VM's extra socket when no agent holds it, otherwise through libvirt's
passthrough: a second client on the extra socket hangs instead of being refused. While an
export is open the disk's device shows the copy-before-write filter, so its format node is the
one the agent recorded with the export (the engine's `read_disks` refuses such a disk: an
operator looks at exactly that state)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass

from cbt_agent.config import Config
from cbt_agent.errors import CbtError, HypervisorError
from cbt_agent.hypervisor.libvirt import DiskInfo, Hypervisor, VmInfo
from cbt_agent.model import Layer
from cbt_agent.qemu import blockdev, images
from cbt_agent.qemu.qmp import PassthroughQmp, QmpChannel, SocketQmp

SOURCE_SOCKET = "qmp-socket"  # the VM's extra QMP socket
SOURCE_LIBVIRT = "qmp-libvirt"  # libvirt's QMP passthrough
SOURCE_FILES = "qemu-img"  # the image files of a shut-off VM


@dataclass(frozen=True)
class DiskChain:
    disk: DiskInfo
    layers: tuple[Layer, ...]  # top first
    error: str | None = None  # why the chain could not be read


async def qmp_channel(
    config: Config, hv: Hypervisor, vm_uuid: str, *, socket_free: bool
) -> QmpChannel:
    """A QMP channel to a running VM: its extra socket when `socket_free` (no agent holds it)
    and it answers, else libvirt's passthrough. The caller closes it."""
    path = config.qmp_socket_template.format(vm_uuid=vm_uuid)
    if socket_free and await asyncio.to_thread(os.path.exists, path):
        sock = SocketQmp(vm_uuid, path)
        try:
            await sock.connect()
            return sock
        except HypervisorError:
            pass  # held by someone else, or stale: libvirt's monitor still answers
    return PassthroughQmp(vm_uuid, hv)


async def running_chains(
    qmp: QmpChannel, vm: VmInfo, export_nodes: Mapping[str, str]
) -> list[DiskChain]:
    """Every disk's chain as QEMU holds it now. `export_nodes`: volume -> the format node the
    agent recorded for its open export (the device shows a filter then)."""
    devices = await blockdev.block_devices(qmp)
    nodes = await blockdev.chain_nodes(qmp)
    out: list[DiskChain] = []
    for disk in vm.disks:
        dev = devices.get(disk.alias)
        if dev is None or not dev.node_name:
            out.append(DiskChain(disk, (), f"device {disk.alias or disk.target} not in QEMU"))
            continue
        node = dev.node_name
        if dev.driver == "copy-before-write":
            recorded = export_nodes.get(disk.volume_uuid)
            if recorded is None:
                why = "a copy-before-write filter the database does not know is on the disk"
                out.append(DiskChain(disk, (), why))
                continue
            node = recorded
        chain = blockdev.disk_chain(nodes, node)
        if not chain:
            out.append(DiskChain(disk, (), f"node {node} not found in QEMU"))
            continue
        out.append(DiskChain(disk, tuple(chain)))
    return out


async def file_chains(vm: VmInfo) -> list[DiskChain]:
    """Every disk's chain from its image files (a shut-off VM: the bitmaps as QEMU saved them)."""
    out: list[DiskChain] = []
    for disk in vm.disks:
        if not os.path.isabs(disk.install_path):
            out.append(DiskChain(disk, (), f"{disk.install_path or 'no source'}: not a file"))
            continue
        try:
            out.append(DiskChain(disk, tuple(await images.chain_layers(disk.install_path))))
        except CbtError as e:
            out.append(DiskChain(disk, (), e.message))
    return out


@dataclass(frozen=True)
class VmChains:
    vm: VmInfo
    source: str  # SOURCE_SOCKET | SOURCE_LIBVIRT | SOURCE_FILES
    disks: tuple[DiskChain, ...]

    @property
    def counted(self) -> bool:
        """QEMU reported dirty counts (the files hold none)."""
        return self.source != SOURCE_FILES


async def read_vm(
    config: Config,
    hv: Hypervisor,
    vm: VmInfo,
    *,
    socket_free: bool,
    export_nodes: Mapping[str, str] | None = None,
) -> VmChains:
    """A VM's disks and their chains, read-only, however it is reachable now."""
    if not vm.running:
        return VmChains(vm, SOURCE_FILES, tuple(await file_chains(vm)))
    qmp = await qmp_channel(config, hv, vm.vm_uuid, socket_free=socket_free)
    try:
        disks = await running_chains(qmp, vm, export_nodes or {})
    finally:
        await qmp.close()
    source = SOURCE_SOCKET if qmp.kind == "socket" else SOURCE_LIBVIRT
    return VmChains(vm, source, tuple(disks))
