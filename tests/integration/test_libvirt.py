"""cbt_agent.hypervisor.libvirt against the real libvirtd 9.0 + QEMU 7.2 (TCG)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import stack

from cbt_agent.errors import HypervisorError, NotFound, QmpCommandError
from cbt_agent.hypervisor.libvirt import Hypervisor
from testbed.qemu_io import hmp, qemu_io

pytestmark = pytest.mark.stack

VmFactory = Callable[..., stack.TestVm]


async def test_find_vm_two_disks(vm_factory: VmFactory, hypervisor: Hypervisor) -> None:
    vm = vm_factory([64, 32])
    info = await hypervisor.find_vm(vm.vm_uuid)
    assert info is not None
    assert info.vm_uuid == vm.vm_uuid
    assert info.domain_uuid == vm.domain_uuid == str(uuid.UUID(hex=vm.vm_uuid))
    assert info.running
    assert [d.volume_uuid for d in info.disks] == [v.volume_uuid for v in vm.volumes]
    assert [d.alias for d in info.disks] == ["virtio-disk0", "virtio-disk1"]
    assert [d.target for d in info.disks] == ["vda", "vdb"]
    assert [d.device_id for d in info.disks] == [0, 1]
    assert [d.install_path for d in info.disks] == [str(v.path) for v in vm.volumes]
    assert {d.format for d in info.disks} == {"qcow2"}
    assert {d.bus for d in info.disks} == {"virtio"}
    # source index = libvirt's node-name index; qdev = what query-block reports
    for d in info.disks:
        entry = vm.block_entry(d.volume_uuid)
        assert entry["qdev"] == d.qdev == f"/machine/peripheral/{d.alias}/virtio-backend"
        assert entry["inserted"]["node-name"] == f"libvirt-{d.source_index}-format"
    assert info.disk(vm.volumes[1].volume_uuid) == info.disks[1]


async def test_find_vm_not_running_has_no_alias(
    vm_factory: VmFactory, hypervisor: Hypervisor
) -> None:
    vm = vm_factory([16], start=False)
    info = await hypervisor.find_vm(vm.vm_uuid)
    assert info is not None
    assert not info.running
    assert [(d.volume_uuid, d.alias, d.target, d.source_index) for d in info.disks] == [
        (vm.volumes[0].volume_uuid, "", "vda", None)
    ]
    assert await hypervisor.qemu_pid(vm.vm_uuid) is None
    with pytest.raises(HypervisorError, match="not running"):
        await hypervisor.qmp_passthrough(vm.vm_uuid, {"execute": "query-status"})


async def test_find_vm_unknown(hypervisor: Hypervisor) -> None:
    assert await hypervisor.find_vm(uuid.uuid4().hex) is None
    with pytest.raises(NotFound):
        await hypervisor.qmp_passthrough(uuid.uuid4().hex, {"execute": "query-status"})


async def test_qmp_passthrough_query_block(vm_factory: VmFactory, hypervisor: Hypervisor) -> None:
    vm = vm_factory([64, 32])
    blocks = await hypervisor.qmp_passthrough(vm.vm_uuid, {"execute": "query-block"})
    assert isinstance(blocks, list)
    by_qdev = {b["qdev"]: b for b in blocks}
    for i, vol in enumerate(vm.volumes):
        b = by_qdev[f"/machine/peripheral/virtio-disk{i}/virtio-backend"]
        assert b["device"] == ""  # -blockdev era: no drive name
        assert b["inserted"]["file"] == str(vol.path)
        assert b["inserted"]["drv"] == "qcow2"
        assert b["inserted"]["node-name"].startswith("libvirt-")
        assert b["inserted"]["node-name"].endswith("-format")
        assert b["inserted"]["image"]["virtual-size"] == vol.size
        assert b["inserted"]["image"]["cluster-size"] == 65536
        assert "dirty-bitmaps" not in b["inserted"]


async def test_qmp_passthrough_error(vm_factory: VmFactory, hypervisor: Hypervisor) -> None:
    vm = vm_factory([16], extra_qmp=False)
    args = {"node": "nope", "name": "b"}
    with pytest.raises(QmpCommandError) as ei:
        await hypervisor.qmp_passthrough(
            vm.vm_uuid, {"execute": "block-dirty-bitmap-add", "arguments": args}
        )
    assert ei.value.command == "block-dirty-bitmap-add"
    assert ei.value.arguments == args
    assert "nope" in ei.value.reply
    assert ei.value.error_class == "GenericError"
    with pytest.raises(QmpCommandError, match="not been found") as ei:
        await hypervisor.qmp_passthrough(vm.vm_uuid, {"execute": "no-such-command"})
    assert ei.value.error_class == "CommandNotFound"  # QMP's class, kept


async def test_no_extra_socket_passthrough_works(
    vm_factory: VmFactory, hypervisor: Hypervisor, qmp_socket_template: str
) -> None:
    vm = vm_factory([16], extra_qmp=False)
    assert vm.qmp_socket is None
    socket = Path(qmp_socket_template.format(vm_uuid=vm.vm_uuid))
    assert not await asyncio.to_thread(socket.exists)
    status = await hypervisor.qmp_passthrough(vm.vm_uuid, {"execute": "query-status"})
    assert status["status"] == "running"


async def test_extra_socket_answers_qmp(
    vm_factory: VmFactory, hypervisor: Hypervisor, qmp_socket_template: str
) -> None:
    vm = vm_factory([16])
    assert vm.qmp_socket is not None
    assert str(vm.qmp_socket) == qmp_socket_template.format(vm_uuid=vm.vm_uuid)
    assert vm.qmp_socket.is_socket()  # exists as soon as start returned
    async with vm.qmp_connection() as client:
        status: Any = await client.execute("query-status")
        assert status["status"] == "running"
        # libvirt's passthrough works while the extra socket is held
        blocks = await hypervisor.qmp_passthrough(vm.vm_uuid, {"execute": "query-block"})
        assert len(blocks) == 1


async def test_hmp_write_sets_dirty_bitmap(vm_factory: VmFactory, hypervisor: Hypervisor) -> None:
    vm = vm_factory([64, 32])
    info = await hypervisor.find_vm(vm.vm_uuid)
    assert info is not None
    disk = info.disks[1]
    blocks = await hypervisor.qmp_passthrough(vm.vm_uuid, {"execute": "query-block"})
    node = next(b["inserted"]["node-name"] for b in blocks if b["qdev"] == disk.qdev)
    assert node == f"libvirt-{disk.source_index}-format"
    await hypervisor.qmp_passthrough(
        vm.vm_uuid,
        {"execute": "block-dirty-bitmap-add", "arguments": {"node": node, "name": "b0"}},
    )

    out = await qemu_io(hypervisor, vm.vm_uuid, disk.qdev, "write -P 0xab 1M 64k")
    assert "wrote 65536/65536 bytes at offset 1048576" in out
    await vm.write(disk.volume_uuid, 4 << 20, 4096, 0xCD)  # harness path: one more cluster
    await hmp(
        hypervisor, vm.vm_uuid, f'qemu-io -d {disk.qdev} "write -z 8M 64k"'
    )  # plain HMP: reply is empty

    blocks = await hypervisor.qmp_passthrough(vm.vm_uuid, {"execute": "query-block"})
    entry = next(b for b in blocks if b["qdev"] == disk.qdev)
    bitmaps = {b["name"]: b for b in entry["inserted"]["dirty-bitmaps"]}
    assert bitmaps["b0"]["count"] == 3 * 65536
    assert bitmaps["b0"]["granularity"] == 65536
    assert bitmaps["b0"]["recording"] is True
    assert bitmaps["b0"]["persistent"] is False
    assert "inconsistent" not in bitmaps["b0"]
    # the other disk saw nothing
    other = next(b for b in blocks if b["qdev"] == info.disks[0].qdev)
    assert "dirty-bitmaps" not in other["inserted"]


async def test_write_of_64k_counts_65536(vm_factory: VmFactory) -> None:
    vm = vm_factory([64])
    vol = vm.volumes[0].volume_uuid
    node = vm.node_name(vol)
    vm.qmp("block-dirty-bitmap-add", {"node": node, "name": "b"})
    await vm.write(vol, 1 << 20, 65536, 0xAB)
    assert [b["count"] for b in vm.bitmaps(vol) if b["name"] == "b"] == [65536]


async def test_write_errors_are_reported(vm_factory: VmFactory, hypervisor: Hypervisor) -> None:
    vm = vm_factory([16])
    info = await hypervisor.find_vm(vm.vm_uuid)
    assert info is not None
    qdev = info.disks[0].qdev
    # beyond the end: qemu-io only says so on QEMU's stdout (the domain log)
    with pytest.raises(HypervisorError, match="failed"):
        await qemu_io(hypervisor, vm.vm_uuid, qdev, "write -P 0xab 100M 64k")
    with pytest.raises(HypervisorError, match="not found"):
        await hmp(
            hypervisor,
            vm.vm_uuid,
            'qemu-io -d /machine/peripheral/nope/virtio-backend "write 0 512"',
        )
    with pytest.raises(ValueError):
        await vm.write(vm.volumes[0].volume_uuid, 16 << 20, 512)


async def test_qemu_pid_and_kill(vm_factory: VmFactory, hypervisor: Hypervisor) -> None:
    vm = vm_factory([16])
    pid = await hypervisor.qemu_pid(vm.vm_uuid)
    assert pid is not None and pid == vm.qemu_pid()
    assert await asyncio.to_thread(Path(f"/proc/{pid}").exists)
    await asyncio.to_thread(vm.kill)
    assert vm.state() == (5, 3)  # shut off, crashed
    assert await hypervisor.qemu_pid(vm.vm_uuid) is None
    info = await hypervisor.find_vm(vm.vm_uuid)
    assert info is not None and not info.running
    assert vm.qmp_socket is not None and vm.qmp_socket.exists()  # stale socket file stays


async def test_persistent_bitmap_survives_clean_shutdown(
    vm_factory: VmFactory, hypervisor: Hypervisor
) -> None:
    vm = vm_factory([16])
    vol = vm.volumes[0].volume_uuid
    node = vm.node_name(vol)
    vm.qmp("block-dirty-bitmap-add", {"node": node, "name": "p", "persistent": True})
    await vm.write(vol, 0, 65536)
    await asyncio.to_thread(vm.shutdown)
    assert vm.state() == (5, 1)  # shut off, shutdown
    assert vm.qmp_socket is not None and not vm.qmp_socket.exists()  # QEMU unlinked it
    await asyncio.to_thread(vm.start)
    assert [(b["name"], b["count"], b["persistent"]) for b in vm.bitmaps(vol)] == [
        ("p", 65536, True)
    ]


async def test_hypervisor_reopen_and_close(libvirt_stack: Any) -> None:
    hv = Hypervisor(libvirt_stack.uri)
    with pytest.raises(HypervisorError, match="not open"):
        await hv.find_vm(uuid.uuid4().hex)
    async with hv:
        assert await hv.find_vm(uuid.uuid4().hex) is None
    with pytest.raises(HypervisorError):
        await hv.find_vm(uuid.uuid4().hex)
