"""Offline exports on the real stack: ExportNbdVolumes / UnexportNbdVolumes of a shut-off libvirt
VM, served by a qemu-storage-daemon, read through NBD as a backup client reads them.

Each test drives CbtService (the worker behind the API); every daemon a test's agent started is
stopped by its pid at teardown, whatever happened."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import stack
from apiharness import BACKUP_INFO, INFO_FIELDS, VOLUME_TO, Api, P, assert_error
from cbtharness import Agent, by_volume, dirty_runs, expected_runs, read_export
from offlinehelp import daemons_of, stop_daemons_of

from cbt_agent import commands
from cbt_agent.api import replies
from cbt_agent.errors import CbtError
from cbt_agent.model import TaskStatus
from cbt_agent.qemu import images
from cbt_agent.store import SyncStore

pytestmark = pytest.mark.stack

KIB = 1024
MIB = 1 << 20
G = 64 * KIB
PORTS = "12300:12399"
LOCK_ERROR = 'Failed to get "write" lock'


@pytest.fixture
async def agent(
    make_agent: Callable[..., Awaitable[Agent]], tmp_path: Path
) -> AsyncIterator[Agent]:
    a = await make_agent(ports=PORTS)
    yield a
    left = await stop_daemons_of(tmp_path / "state")
    assert not left, f"daemons left running: {left}"


async def export(agent: Agent, vm: stack.TestVm, **kw: Any) -> dict[str, dict[str, Any]]:
    cmd = commands.ExportVolumes(
        vm.vm_uuid,
        tuple(kw.get("volumes", ())),
        kw.get("since"),
        kw.get("force", False),
    )
    reply = replies.export_reply(await agent.service.export_volumes(cmd))
    return by_volume(reply["volumeInfos"])


async def unexport(agent: Agent, vm: stack.TestVm) -> dict[str, Any]:
    cmd = commands.UnexportVolumes(vm.vm_uuid, ())
    return replies.unexport_reply(await agent.service.unexport_volumes(cmd))


async def task_row(agent: Agent, task: str) -> Any:
    return await agent.store.run(SyncStore.require_task, task)


def start_fails(vm: stack.TestVm) -> str:
    with pytest.raises(RuntimeError) as e:
        vm.start()
    return str(e.value)


async def test_offline_export_is_the_writes_since_the_last_checkpoint_and_locks_the_vm(
    vm_factory: Callable[..., stack.TestVm], agent: Agent, tmp_path: Path
) -> None:
    vm = vm_factory(disks_mib=[32, 16])
    (v0, path0, size0), (v1, _, size1) = vm.volumes
    task = await agent.create(vm)
    first = by_volume(await agent.enable(task))[v0]["bitmapName"]
    await agent.disable(task)
    writes0 = [(0, 4096), (5 * MIB + 100, 70 * KIB), (31 * MIB, MIB)]
    writes1 = [(3 * MIB, 512)]
    for off, n in writes0:
        await vm.write(v0, off, n, 0x5A)
    for off, n in writes1:
        await vm.write(v1, off, n, 0x5B)
    vm.shutdown()  # clean: the bitmaps reach the qcow2 files

    with pytest.raises(CbtError, match="is running: ExportNbdVolumes exports the disks"):
        await export(agent, vm_factory(disks_mib=[16]))  # a running VM: refused

    infos = await export(agent, vm)
    assert set(infos) == {v0, v1}
    i0, i1 = infos[v0], infos[v1]
    assert (i0["mode"], i1["mode"]) == ("incremental", "incremental")
    assert i0["sinceBitmapName"] == first and i0["reason"] is None
    new = i0["bitmapName"]
    assert new != first and i1["bitmapName"] == new  # a checkpoint cut offline, handed out
    assert (i0["size"], i1["size"], i0["granularity"]) == (size0, size1, G)
    # the dirty map is exactly the clusters written since the last checkpoint
    want0 = expected_runs(writes0, size0)
    assert dirty_runs(i0) == want0
    assert dirty_runs(i1) == expected_runs(writes1, size1)
    assert i0["changedBytes"] == sum(n for _, n in want0)
    assert await agent.areas(task, v0) == want0  # QueryChangedDiskAreas answers offline too
    bits = base64.b64decode(i0["bitmapBase64"])
    assert {c for c in range(size0 // G) if bits[c // 8] >> (c % 8) & 1} == {
        c for s, n in want0 for c in range(s // G, (s + n + G - 1) // G)
    }
    assert read_export(i0, 5 * MIB + 100, 70 * KIB) == b"\x5a" * (70 * KIB)
    assert read_export(i1, 3 * MIB, 512) == b"\x5b" * 512
    assert i0["target"] == str(path0)
    assert i0["exportName"] == v0 and i0["dirtyBitmapContext"].startswith("qemu:dirty-bitmap:")

    # the daemon: recorded with its pid, running, holding the images read-only
    daemon = await agent.store.run(SyncStore.storage_daemon, vm.vm_uuid)
    assert daemon is not None and daemon.phase == "exported"
    assert list(daemons_of(tmp_path / "state")) == [daemon.pid]
    t = await task_row(agent, task)
    assert t.status is TaskStatus.RUNNING
    assert f"qemu-storage-daemon pid {daemon.pid}" in str(t.reason)
    assert "UnexportNbdVolumes" in str(t.reason)

    # starting the VM fails on the image lock (libvirt's error); Unexport says so and frees it
    assert LOCK_ERROR in start_fails(vm)
    done = await unexport(agent, vm)
    assert done["storageDaemonPid"] == daemon.pid
    assert set(done["volumeUuids"]) == {v0, v1}
    assert str(path0) in done["releasedImages"]
    assert LOCK_ERROR in done["startRefused"]
    assert "it can start now" in done["message"]
    assert daemons_of(tmp_path / "state") == {}
    t = await task_row(agent, task)
    assert t.status is TaskStatus.STOPPED and LOCK_ERROR in str(t.reason)
    assert await unexport(agent, vm) == {}  # nothing exported: nothing to do
    vm.start()

    # The next Enable counts from the offline checkpoint: only what was written since...
    late = [(7 * MIB, 8192)]
    for off, n in late:
        await vm.write(v0, off, n, 0x6C)
    inc = by_volume(await agent.enable(task))
    assert inc[v0]["sinceBitmapName"] == new
    assert dirty_runs(inc[v0]) == expected_runs(late, size0)
    assert inc[v1]["mode"] == "incremental" and dirty_runs(inc[v1]) == []
    await agent.disable(task)
    # ...and from the first one: everything, merged through the offline checkpoint
    since_first = by_volume(await agent.enable(task, first))
    assert dirty_runs(since_first[v0]) == expected_runs(writes0 + late, size0)
    assert dirty_runs(since_first[v1]) == expected_runs(writes1, size1)
    await agent.disable(task)


async def test_offline_export_full_with_reasons_and_a_subset_of_disks(
    vm_factory: Callable[..., stack.TestVm], agent: Agent, tmp_path: Path
) -> None:
    vm = vm_factory(disks_mib=[16, 16])
    (v0, _, size0), (v1, path1, _) = vm.volumes
    task = await agent.create(vm)
    vm.shutdown()
    # no checkpoint yet: full, with the reason; a subset of disks only
    infos = await export(agent, vm, volumes=[v0])
    assert set(infos) == {v0}
    assert infos[v0]["mode"] == "full"
    assert infos[v0]["reason"] == "first checkpoint of this disk: no earlier change tracking"
    assert base64.b64decode(infos[v0]["bitmapBase64"]) == b"\xff" * (size0 // G // 8)
    assert infos[v0]["changedBytes"] == size0 and infos[v0]["dirtyBitmapContext"] is None
    first = infos[v0]["bitmapName"]
    # exported already: refused, unless forced
    with pytest.raises(CbtError, match="has already exported"):
        await export(agent, vm)
    infos = await export(agent, vm, force=True, since=first)
    assert infos[v0]["mode"] == "incremental" and infos[v0]["sinceBitmapName"] == first
    assert dirty_runs(infos[v0]) == []  # nothing written in between
    assert infos[v1]["mode"] == "full"  # not in the first checkpoint
    second = infos[v0]["bitmapName"]
    await unexport(agent, vm)

    # a bitmap lost on one disk (removed behind the agent's back): that disk full, with why
    await images.remove_bitmap(str(path1), second)
    infos = await export(agent, vm)
    assert infos[v0]["mode"] == "incremental"
    assert infos[v1]["mode"] == "full"
    assert infos[v1]["reason"] == f"bitmap {second} is missing on this disk (change tracking lost)"
    # Delete while exported: the daemon is stopped, the bitmaps removed from the files
    await agent.service.delete(commands.DeleteTask(task, False, False))
    assert daemons_of(tmp_path / "state") == {}
    assert await agent.store.run(SyncStore.storage_daemon, vm.vm_uuid) is None
    assert [names for _f, names in await images.chain_bitmaps(str(path1))] == [set()]
    vm.start()  # the locks are gone


async def test_offline_export_survives_an_agent_restart_and_a_dead_daemon_is_reconciled(
    vm_factory: Callable[..., stack.TestVm],
    make_agent: Callable[..., Awaitable[Agent]],
    agent: Agent,
    tmp_path: Path,
) -> None:
    from cbt_agent.engine.reconcile import reconcile

    vm = vm_factory(disks_mib=[16])
    ((v0, _, _),) = vm.volumes
    task = await agent.create(vm)
    vm.shutdown()
    infos = await export(agent, vm)
    await agent.close()  # the agent goes; its daemon stays, exporting

    again = await make_agent(ports=PORTS)
    await reconcile(again.service)
    t = await task_row(again, task)
    assert t.status is TaskStatus.RUNNING
    assert read_export(infos[v0], 0, 4096) == bytes(4096)

    # the daemon dies while the agent is down: the next start says so and cleans up
    (pid,) = daemons_of(tmp_path / "state")
    os.kill(pid, 9)
    await again.close()
    third = await make_agent(ports=PORTS)
    await reconcile(third.service)
    t = await task_row(third, task)
    assert t.status is TaskStatus.STOPPED
    assert str(t.reason).startswith("offline export lost while the agent was down")
    assert await third.store.run(SyncStore.storage_daemon, vm.vm_uuid) is None
    vm.start()


async def test_offline_export_through_the_api(
    vm_factory: Callable[..., stack.TestVm], api: Api, tmp_path: Path
) -> None:
    """ZStack's ExportNbdVolumes / UnexportNbdVolumes over HTTP: async jobs, `volumeInfos` with
    ZStack's schema map, refusals through the job; Unexport's `{}` carries what ended."""
    vm = vm_factory(disks_mib=[16, 16])
    (v0, path0, _), (v1, _, _) = vm.volumes
    export_path, unexport_path = f"{P}/cbt-task/exportvolume", f"{P}/cbt-task/unexportvolume"
    body = {"params": {"vmInstanceUuid": vm.vm_uuid}}
    task = await api.create(vm.vm_uuid)
    try:
        assert_error(await api.call("POST", export_path, body), "SYS.1006", "is running")
        first = (await api.enable(task))[0]["bitmapName"]
        r = await api.call("POST", f"{P}/cbt-task/disable/{task}", {"params": {}})
        assert r.status == 200, r
        await vm.write(v1, MIB, 4096, 0x42)
        vm.shutdown()
        for bad, needle in (
            ({"params": {**body["params"], "volumeUuids": ["b" * 32]}}, "is not a disk of VM"),
            ({"params": {**body["params"], "bitmapName": "x y"}}, "field [bitmapName]"),
            ({**body, "systemTags": ["bitmapName::x y"]}, "field [bitmapName]"),
        ):
            assert_error(await api.call("POST", export_path, bad), "SYS.1007", needle)

        r = await api.call(
            "POST", export_path, {**body, "systemTags": [f"bitmapName::{first}"]},
            headers={"X-JSON-Schema": "true"},
        )  # fmt: skip
        assert r.status == 200, r
        infos = by_volume(r.body["volumeInfos"])
        assert r.body["schema"]["volumeInfos[0]"] == BACKUP_INFO
        assert r.body["schema"]["volumeInfos[0].volume"] == VOLUME_TO
        assert infos[v0]["sinceBitmapName"] == first
        assert dirty_runs(infos[v0]) == []
        assert dirty_runs(infos[v1]) == [(MIB, G)]
        # nothing writes to a shut-off VM's disks: an offline export has no scratch budget
        assert set(infos[v0]) >= INFO_FIELDS - {"scratchBudget"}
        assert "scratchBudget" not in infos[v0] and "scratchBudget" not in infos[v0]["metadata"]
        assert api.status(task) == "Running"
        # a second export is refused while this one is open
        assert_error(await api.call("POST", export_path, body), "SYS.1006", "already exported")

        r = await api.call("POST", unexport_path, body)
        assert r.status == 200, r
        assert set(r.body) == {"volumeUuids", "storageDaemonPid", "releasedImages", "message"}
        assert str(path0) in r.body["releasedImages"]
        assert api.history(task)[-2:] == ["Running", "Stopped"]
        vm.start()
    finally:
        await stop_daemons_of(tmp_path / "state")
