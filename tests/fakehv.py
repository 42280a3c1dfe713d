"""A stand-in for `cbt_agent.hypervisor.libvirt.Hypervisor` for fast tests of the API's own
rules (authentication, validation, queries, the OpenAPI document): VMs are plain `VmInfo`
values the test defines, all shut off. Anything that would need QEMU is not here: the
real-stack tests cover those paths."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from cbt_agent.hypervisor.libvirt import DiskInfo, VmEvent, VmInfo


def stopped_vm(vm_uuid: str, *volumes: str) -> VmInfo:
    disks = tuple(
        DiskInfo(
            volume_uuid=v,
            alias="",
            target=f"vd{chr(ord('a') + i)}",
            device_id=i,
            install_path=f"/nonexistent/{v}.qcow2",
            format="qcow2",
            bus="virtio",
        )
        for i, v in enumerate(volumes)
    )
    return VmInfo(vm_uuid=vm_uuid, running=False, disks=disks)


class FakeHypervisor:
    def __init__(self, *vms: VmInfo) -> None:
        self.vms = {vm.vm_uuid: vm for vm in vms}
        self.opened = False
        self.closed = False

    async def open(self) -> None:
        self.opened = True

    async def close(self) -> None:
        self.closed = True

    async def watch(self, handler: Callable[[VmEvent], Awaitable[None]]) -> None:
        pass

    async def find_vm(self, vm_uuid: str) -> VmInfo | None:
        return self.vms.get(vm_uuid)

    async def is_running(self, vm_uuid: str) -> bool:
        vm = self.vms.get(vm_uuid)
        return vm is not None and vm.running

    async def qemu_pid(self, vm_uuid: str) -> int | None:
        return None

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the fake hypervisor has no {name}: use a real-stack test")
