"""Checkpoints and exports on the real stack: libvirt TCG VMs, QEMU 7.2, libnbd, SQLite.

Each test drives CbtService (the worker behind the API) and checks through NBD what a backup
client would see: the point-in-time data, the exact dirty clusters, and that nothing is left
behind in QEMU or on disk.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import stack
from cbtharness import Agent, address, by_volume, dirty_runs, expected_runs, read_export

from cbt_agent.api import replies, validate
from cbt_agent.dirtymap import DirtyExtent, bitmap_from_extents
from cbt_agent.errors import CbtError
from cbt_agent.model import TaskStatus
from cbt_agent.qemu import nbd as nbdio
from cbt_agent.store import SyncStore

pytestmark = pytest.mark.stack

KIB = 1024
MIB = 1 << 20
G = 64 * KIB  # bitmap granularity = qcow2 cluster size


def qemu_state(vm: stack.TestVm) -> dict[str, Any]:
    return {
        "exports": vm.qmp("query-block-exports"),
        "jobs": vm.qmp("query-jobs"),
        "scratch": [
            n["node-name"]
            for n in vm.qmp("query-named-block-nodes", {"flat": True})
            if n["node-name"].startswith(("cbtsc-", "cbtcw-", "cbtac-"))
        ],
    }


def bitmap_names(vm: stack.TestVm, volume_uuid: str) -> list[str]:
    return sorted(b["name"] for b in vm.bitmaps(volume_uuid))


async def test_full_then_incremental_exact_extents_and_data(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[64, 32])
    (v0, _, size0), (v1, _, size1) = vm.volumes
    agent = await make_agent()
    task = await agent.create(vm)
    await vm.write(v0, 0, MIB, 0xAA)
    await vm.write(v1, 3 * MIB, 128 * KIB, 0xAB)

    full = by_volume(await agent.enable(task))
    assert {i["mode"] for i in full.values()} == {"full"}
    assert full[v0]["reason"] == "first checkpoint of this disk: no earlier change tracking"
    assert full[v0]["bitmapName"] == full[v1]["bitmapName"]
    assert (full[v0]["size"], full[v1]["size"]) == (size0, size1)
    assert full[v0]["changedBytes"] == size0 and full[v0]["dirtyBitmapContext"] is None
    assert base64.b64decode(full[v1]["bitmapBase64"]) == b"\xff" * (size1 // G // 8)
    first = full[v0]["bitmapName"]
    # The export is the disk as of Enable: a guest write afterwards does not show in it.
    await vm.write(v0, 0, 64 * KIB, 0xBB)
    assert read_export(full[v0], 0, 128 * KIB) == b"\xaa" * (128 * KIB)
    assert read_export(full[v0], MIB, 64 * KIB) == bytes(64 * KIB)
    assert read_export(full[v1], 3 * MIB, 128 * KIB) == b"\xab" * (128 * KIB)
    await agent.disable(task)
    assert os.listdir(agent.config.scratch_dir) == []
    assert qemu_state(vm) == {"exports": [], "jobs": [], "scratch": []}

    writes0 = [(5 * MIB + 100, 1000), (20 * MIB + 4096, 100 * KIB), (63 * MIB, MIB)]
    writes1 = [(7 * MIB, 512), (7 * MIB + 512, 512), (31 * MIB + 65535, 2)]
    for off, n in writes0:
        await vm.write(v0, off, n, 0xC0)
    for off, n in writes1:
        await vm.write(v1, off, n, 0xC1)
    inc = by_volume(await agent.enable(task))
    assert {i["mode"] for i in inc.values()} == {"incremental"}
    assert inc[v0]["sinceBitmapName"] == first and inc[v0]["reason"] is None
    assert inc[v0]["bitmapName"] != first
    # exactly the written clusters, including the 0xBB write made while the first export was open
    want0 = expected_runs([(0, 64 * KIB), *writes0], size0)
    want1 = expected_runs(writes1, size1)
    assert dirty_runs(inc[v0]) == want0
    assert dirty_runs(inc[v1]) == want1
    assert want1 == [(7 * MIB, G), (31 * MIB, 2 * G)]
    for vol, want in ((v0, want0), (v1, want1)):
        extents = [DirtyExtent(s, n, True) for s, n in want]
        size = inc[vol]["size"]
        assert base64.b64decode(inc[vol]["bitmapBase64"]) == bitmap_from_extents(extents, size, G)
        assert inc[vol]["changedBytes"] == sum(n for _, n in want)
    # and the data there is what was written
    assert read_export(inc[v0], 0, 64 * KIB) == b"\xbb" * (64 * KIB)
    assert read_export(inc[v0], 5 * MIB + 100, 1000) == b"\xc0" * 1000
    assert read_export(inc[v0], 5 * MIB, 100) == bytes(100)
    assert read_export(inc[v1], 7 * MIB, 1024) == b"\xc1" * 1024
    await agent.disable(task)
    assert await agent.history(task) == [
        (None, "Created"),
        ("Created", "Starting"),
        ("Starting", "Running"),
        ("Running", "Stopped"),
        ("Stopped", "Starting"),
        ("Starting", "Running"),
        ("Running", "Stopped"),
    ]


async def test_changes_since_an_older_checkpoint_are_the_union(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[16])
    v0, _, size = vm.volumes[0]
    agent = await make_agent()
    task = await agent.create(vm)
    names = []
    writes = [(1 * MIB, 4096), (2 * MIB, 4096), (3 * MIB, 4096)]
    for off, n in writes:
        infos = await agent.enable(task)
        names.append(infos[0]["bitmapName"])
        await agent.disable(task)
        await vm.write(v0, off, n, 0x11)
    since_first = (await agent.enable(task, since=names[0]))[0]
    assert since_first["mode"] == "incremental" and since_first["sinceBitmapName"] == names[0]
    assert dirty_runs(since_first) == expected_runs(writes, size)
    await agent.disable(task)
    # the default is "since the latest checkpoint": only what came after the one just cut
    await vm.write(v0, 9 * MIB, 10, 0x22)
    latest = (await agent.enable(task))[0]
    assert dirty_runs(latest) == [(9 * MIB, G)]
    await agent.disable(task)
    unknown = (await agent.enable(task, since="cbt-nosuch-000001"))[0]
    assert unknown["mode"] == "full"
    assert unknown["reason"] == "checkpoint cbt-nosuch-000001 is unknown to this task"
    await agent.disable(task)


async def test_libvirt_passthrough_when_there_is_no_extra_socket(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[16, 16], extra_qmp=False)
    (v0, _, _), (v1, _, _) = vm.volumes
    agent = await make_agent()
    task = await agent.create(vm)
    await agent.enable(task)
    assert (await agent.router.channel(vm.vm_uuid)).kind == "libvirt"
    await agent.disable(task)
    await vm.write(v1, 4 * MIB, 70 * KIB, 0x33)
    inc = by_volume(await agent.enable(task))
    assert dirty_runs(inc[v1]) == [(4 * MIB, 2 * G)]
    assert dirty_runs(inc[v0]) == []
    assert inc[v0]["changedBytes"] == 0
    assert read_export(inc[v1], 4 * MIB, 70 * KIB) == b"\x33" * (70 * KIB)
    await agent.disable(task)
    assert qemu_state(vm) == {"exports": [], "jobs": [], "scratch": []}


class Boom(Exception):
    pass


@pytest.mark.parametrize(
    ("step", "checkpoint_kept"),
    [
        ("enable:planned", False),
        ("enable:scratch", False),
        ("enable:checkpoint", True),
        ("enable:bitmaps", True),
        ("enable:nbd-server", True),
        ("enable:exported", True),
    ],
)
async def test_failed_enable_leaves_nothing_and_loses_no_write(
    vm_factory: Callable[..., stack.TestVm],
    make_agent: Callable[..., Awaitable[Agent]],
    step: str,
    checkpoint_kept: bool,
) -> None:
    vm = vm_factory(disks_mib=[16, 16])
    (v0, _, _), (v1, _, _) = vm.volumes
    fail_at: list[str] = []

    async def hook(name: str) -> None:
        if fail_at and name == fail_at[0]:
            raise Boom(f"injected at {name}")

    agent = await make_agent(step=hook)
    task = await agent.create(vm)
    first = (await agent.enable(task))[0]["bitmapName"]
    await agent.disable(task)
    await vm.write(v0, 1 * MIB, 4096, 0x44)  # before the failed Enable

    fail_at.append(step)
    with pytest.raises(Boom):
        await agent.enable(task)
    fail_at.clear()
    t = await agent.store.run(SyncStore.require_task, task)
    assert t.status is TaskStatus.FAILED and t.reason == f"enable failed: Boom: injected at {step}"
    assert os.listdir(agent.config.scratch_dir) == []
    assert qemu_state(vm) == {"exports": [], "jobs": [], "scratch": []}
    names = [c.name for c in await agent.store.run(SyncStore.checkpoints, task)]
    assert len(names) == (2 if checkpoint_kept else 1)
    for vol in (v0, v1):
        assert bitmap_names(vm, vol) == names  # no temporary bitmap, nothing stray

    await vm.write(v0, 2 * MIB, 4096, 0x55)  # after the failed Enable
    inc = by_volume(await agent.enable(task, since=first))
    assert inc[v0]["mode"] == "incremental"
    assert dirty_runs(inc[v0]) == [(1 * MIB, G), (2 * MIB, G)]
    assert dirty_runs(inc[v1]) == []
    await agent.disable(task)
    assert (None, "Created") in await agent.history(task)
    assert ("Starting", "Failed") in await agent.history(task)


async def test_retention_removes_oldest_and_reports_it(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[16])
    v0 = vm.volumes[0].volume_uuid
    agent = await make_agent(keep=2)
    task = await agent.create(vm)
    names = []
    for i in range(4):
        names.append((await agent.enable(task))[0]["bitmapName"])
        await agent.disable(task)
        await vm.write(v0, i * MIB, 512, 0x66)
    assert bitmap_names(vm, v0) == names[2:]
    assert [c.name for c in await agent.store.run(SyncStore.checkpoints, task)] == names[2:]
    old = (await agent.enable(task, since=names[0]))[0]
    assert old["mode"] == "full"
    assert old["reason"] == f"checkpoint {names[0]} was removed by retention"
    await agent.disable(task)


async def test_enable_refused_while_running_and_disable_is_idempotent(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[16])
    agent = await make_agent()
    task = await agent.create(vm)
    await agent.disable(task)  # nothing to disable: stays Created
    assert (await agent.store.run(SyncStore.require_task, task)).status is TaskStatus.CREATED
    await agent.enable(task)
    with pytest.raises(CbtError, match="has already enabled, please disable it"):
        await agent.enable(task)
    assert (await agent.store.run(SyncStore.require_task, task)).status is TaskStatus.RUNNING
    await agent.disable(task)
    await agent.disable(task)
    assert await agent.history(task) == [
        (None, "Created"),
        ("Created", "Starting"),
        ("Starting", "Running"),
        ("Running", "Stopped"),
    ]


async def test_disable_force_with_a_client_connected(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[16])
    agent = await make_agent()
    task = await agent.create(vm)
    info = (await agent.enable(task))[0]
    client = await asyncio.to_thread(nbdio.connect, address(info))
    try:
        await agent.disable(task, force=True)
        assert qemu_state(vm) == {"exports": [], "jobs": [], "scratch": []}
    finally:
        nbdio.close(client)


async def test_delete_removes_bitmaps_running_and_shut_off(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    running = vm_factory(disks_mib=[16, 16])
    stopped = vm_factory(disks_mib=[16])
    agent = await make_agent()
    t1 = await agent.create(running)
    t2 = await agent.create(stopped)
    await agent.enable(t1)  # left Running: Delete disables first
    await agent.enable(t2)
    await agent.disable(t2)
    await asyncio.to_thread(stopped.shutdown)  # clean quit: the bitmap is saved in the qcow2
    await agent.service.delete(validate.delete_task(t1, False, None))
    await agent.service.delete(validate.delete_task(t2, False, None))
    for vol in running.volumes:
        assert bitmap_names(running, vol.volume_uuid) == []
    assert qemu_state(running) == {"exports": [], "jobs": [], "scratch": []}
    proc = await asyncio.create_subprocess_exec(
        "qemu-img",
        "info",
        "--output=json",
        str(stopped.volumes[0].path),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert b'"bitmaps"' not in out
    assert await agent.store.run(SyncStore.list_tasks) == []
    assert (await agent.history(t1))[-2:] == [("Running", "Stopped"), ("Stopped", "Deleted")]
    rows = await agent.store.run(SyncStore.history_rows, t1)
    assert rows[-2]["reason"] == "disabled before delete"


async def test_changed_areas_pages_equal_a_direct_nbd_read(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[64])
    v0, _, size = vm.volumes[0]
    agent = await make_agent()
    task = await agent.create(vm)
    full = (await agent.enable(task))[0]
    # a full: the areas that hold data (base:allocation), here none yet
    page = replies.changed_areas(await agent.service.changed_areas(task, v0, 0, None, 100))
    assert (page["mode"], page["changedAreas"], page["nextOffset"]) == ("full", [], None)
    assert page["bitmapName"] == full["bitmapName"]
    await agent.disable(task)
    writes = [(i * 3 * MIB + 777, 10 * KIB) for i in range(7)] + [(40 * MIB, 300 * KIB)]
    for off, n in writes:
        await vm.write(v0, off, n, 0x5A)
    info = (await agent.enable(task))[0]
    direct = dirty_runs(info)
    assert direct == expected_runs(writes, size)
    whole = replies.changed_areas(await agent.service.changed_areas(task, v0, 0, None, 10_000))
    assert [(a["start"], a["length"]) for a in whole["changedAreas"]] == direct
    assert (whole["startOffset"], whole["length"], whole["nextOffset"]) == (0, size, None)
    # paged two at a time: the pages join up to the same runs, none split across pages
    got: list[tuple[int, int]] = []
    offset: int | None = 0
    pages = 0
    while offset is not None:
        page = replies.changed_areas(await agent.service.changed_areas(task, v0, offset, None, 2))
        assert len(page["changedAreas"]) <= 2
        got += [(a["start"], a["length"]) for a in page["changedAreas"]]
        assert page["startOffset"] + page["length"] == (page["nextOffset"] or size)
        offset = page["nextOffset"]
        pages += 1
    assert got == direct and pages == 5  # the last page finds no more
    # a window: only what lies inside it, clipped
    window = replies.changed_areas(await agent.service.changed_areas(task, v0, 40 * MIB + G, G, 10))
    assert window["changedAreas"] == [{"start": 40 * MIB + G, "length": G}]
    with pytest.raises(CbtError, match="beyond the disk's size"):
        await agent.service.changed_areas(task, v0, size, None, 10)
    await agent.disable(task)
    with pytest.raises(CbtError, match="need a Running task"):
        await agent.service.changed_areas(task, v0, 0, None, 10)


async def test_changed_areas_come_from_the_kept_map_which_is_qemu_s_and_dropped_at_the_end(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[64])
    v0, _, size = vm.volumes[0]
    agent = await make_agent()
    task = await agent.create(vm)
    await agent.enable(task)
    assert len(agent.service.maps) == 0  # a full keeps no map: its areas are read each time
    await agent.disable(task)
    writes = [(MIB + 5, 3 * G), (9 * MIB, G), (9 * MIB + 2 * G, 100), (size - 10, 10)]
    for off, n in writes:
        await vm.write(v0, off, n, 0x3C)
    info = (await agent.enable(task))[0]
    (export,) = await agent.store.run(SyncStore.exports, task)
    kept = agent.service.maps.get(export)
    assert kept is not None  # the map Enable read for bitmapBase64
    direct = dirty_runs(info)  # QEMU's answer, on a connection of our own
    assert direct == expected_runs(writes, size)
    assert [(e.start, e.length) for e in kept.extents()] == direct
    assert base64.b64decode(info["bitmapBase64"]) == kept.bitmap(size, G)

    async def listing(limit: int) -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        offset: int | None = 0
        while offset is not None:
            page = replies.changed_areas(
                await agent.service.changed_areas(task, v0, offset, None, limit)
            )
            got += [(a["start"], a["length"]) for a in page["changedAreas"]]
            offset = page["nextOffset"]
        return got

    assert await listing(1) == await listing(10_000) == direct
    # not kept (as after a restart of the agent): read once from the export, then kept again
    agent.service.maps.drop(task)
    assert await listing(2) == direct
    assert agent.service.maps.get(export) is not None
    await agent.disable(task)
    assert len(agent.service.maps) == 0  # dropped when the export ended
    # the next Enable's map is its own: nothing of the last one answers for it
    await vm.write(v0, 30 * MIB, G, 0x3D)
    info = (await agent.enable(task))[0]
    assert await listing(10_000) == dirty_runs(info) == [(30 * MIB, G)]
    await agent.disable(task)
    assert len(agent.service.maps) == 0


async def test_disks_added_resized_and_removed(
    vm_factory: Callable[..., stack.TestVm],
    make_agent: Callable[..., Awaitable[Agent]],
    tmp_path: Path,
) -> None:
    vm = vm_factory(disks_mib=[16, 16])
    (v0, _, _), (v1, _, _) = vm.volumes
    agent = await make_agent()
    task = await agent.create(vm)
    first = (await agent.enable(task))[0]["bitmapName"]
    await agent.disable(task)

    # hot-plug a third disk, grow the second
    v2 = "ab" * 16
    path = tmp_path / "hotplug.qcow2"
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "create", "-q", "-f", "qcow2", str(path), "8M"
    )
    assert await proc.wait() == 0
    xml = (
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{path}'/><target dev='vdc' bus='virtio'/><serial>{v2}</serial></disk>"
    )
    live_and_config = 3  # VIR_DOMAIN_AFFECT_LIVE | VIR_DOMAIN_AFFECT_CONFIG
    await asyncio.to_thread(vm.domain().attachDeviceFlags, xml, live_and_config)
    vm.volumes.append(stack.TestVolume(v2, path, 8 * MIB))
    vm.qmp("block_resize", {"node-name": vm.node_name(v1), "size": 32 * MIB})
    await vm.write(v0, MIB, 512, 0x01)
    infos = by_volume(await agent.enable(task))
    assert infos[v0]["mode"] == "incremental" and dirty_runs(infos[v0]) == [(MIB, G)]
    assert infos[v1]["mode"] == "full"
    assert infos[v1]["reason"] == (
        f"disk was resized since checkpoint {first} ({16 * MIB} -> {32 * MIB} bytes)"
    )
    assert infos[v2]["mode"] == "full"
    assert infos[v2]["reason"] == f"disk was added after checkpoint {first}"
    refs = await agent.store.run(SyncStore.resource_refs, task)
    assert sorted(r.resource_uuid for r in refs if r.resource_type == "VolumeVO") == sorted(
        [v0, v1, v2]
    )
    second = infos[v0]["bitmapName"]
    await agent.disable(task)

    # the new disk is tracked from its first checkpoint on. Remove the first disk from the
    # definition, shut the VM down cleanly (bitmaps are saved in the qcow2) and start it again.
    await vm.write(v2, 2 * MIB, 512, 0x02)
    disk0 = vm.domain().XMLDesc(0).split("<disk ")[1].split("</disk>")[0]
    assert v0 in disk0
    config_only = 2  # VIR_DOMAIN_AFFECT_CONFIG: a guest without an OS never acks a hot-unplug
    await asyncio.to_thread(
        vm.domain().detachDeviceFlags, "<disk " + disk0 + "</disk>", config_only
    )
    await asyncio.to_thread(vm.shutdown)
    await asyncio.to_thread(vm.start)
    infos = by_volume(await agent.enable(task))
    assert sorted(infos) == sorted([v1, v2])
    assert infos[v2]["mode"] == "incremental" and infos[v2]["sinceBitmapName"] == second
    assert dirty_runs(infos[v2]) == [(2 * MIB, G)]
    refs = await agent.store.run(SyncStore.resource_refs, task)
    assert sorted(r.resource_uuid for r in refs if r.resource_type == "VolumeVO") == sorted(
        [v1, v2]
    )
    await agent.disable(task)


async def test_qmp_errors_keep_their_class_on_the_held_socket(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    from cbt_agent.errors import QmpCommandError

    vm = vm_factory(disks_mib=[16])
    agent = await make_agent()
    qmp = await agent.router.channel(vm.vm_uuid)
    assert qmp.kind == "socket"
    with pytest.raises(QmpCommandError) as err:
        await qmp.execute("block-job-cancel", {"device": "cbtjob-none"})
    assert (err.value.command, err.value.error_class) == ("block-job-cancel", "DeviceNotActive")
    with pytest.raises(QmpCommandError) as err:
        await qmp.execute("no-such-command")
    assert err.value.error_class == "CommandNotFound"


async def test_a_paused_vm_is_enabled_without_a_freeze_and_stays_paused(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    """libvirt refuses the guest agent of a paused domain ("domain is not running"): with
    quiesce "auto" that is no guest agent to freeze (the paused guest writes nothing), not a
    failed Enable; the VM is neither resumed nor paused again by the cut."""
    vm = vm_factory(disks_mib=[32])
    ((v0, _, _),) = vm.volumes
    agent = await make_agent()
    task = await agent.create(vm)
    await vm.write(v0, 0, MIB, 0xAA)
    dom = vm.domain()
    await asyncio.to_thread(dom.suspend)
    try:
        (info,) = await agent.enable(task)
        assert info["mode"] == "full" and info["quiesced"] is False
        assert read_export(info, 0, 128 * KIB) == b"\xaa" * (128 * KIB)
        assert vm.qmp("query-status")["status"] == "paused"
        await agent.disable(task)
        assert qemu_state(vm) == {"exports": [], "jobs": [], "scratch": []}
    finally:
        await asyncio.to_thread(dom.resume)
