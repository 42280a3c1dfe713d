"""Fault injection on offline exports: the agent is killed with SIGKILL at each step of
ExportNbdVolumes (tests/faultagent.py installs the step hook) and while an export is open,
restarted, and reconcile must know the VM's qemu-storage-daemon: an interrupted export is
rolled back (no daemon left, the images free, the task Failed), an open one stays usable, and
the next incremental still holds every write since the base (none lost)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import stack
from agentproc import AgentProcess, free_port, write_config
from offlinehelp import daemons_of, stop_daemons_of

from cbt_agent.qemu import nbd as nbdio

pytestmark = pytest.mark.stack

MIB = 1 << 20
G = 65536
EXPORT_STEPS = ["export:planned", "export:checkpoint", "export:daemon", "export:exported"]


@pytest.fixture
async def agent(tmp_path: Path, qmp_socket_template: str) -> AsyncIterator[AgentProcess]:
    config, port = tmp_path / "config.toml", free_port()
    write_config(config, port, tmp_path / "state", qmp_socket_template, "12400:12499")
    a = AgentProcess(config, port)
    yield a
    await a.close()
    await stop_daemons_of(tmp_path / "state")  # whatever happened, by pid


async def call(agent: AgentProcess, method: str, path: str, body: Any = None) -> Any:
    status, reply = await agent.call(method, path, body)
    assert status == 200, reply
    return reply


async def dirty(info: dict[str, Any]) -> list[tuple[int, int]]:
    address = nbdio.NbdAddress(info["nbdServer"], int(info["nbdPort"]), None, info["exportName"])
    extents = await asyncio.to_thread(nbdio.dirty_extents, address, info["dirtyBitmapContext"])
    return [(e.start, e.length) for e in extents if e.dirty]


async def task_of(agent: AgentProcess, task: str) -> dict[str, Any]:
    async with agent.session.get(f"{agent.base}/zstack/v1/cbt-task/{task}") as r:
        return dict((await r.json())["inventories"][0])


@pytest.mark.parametrize("step", EXPORT_STEPS)
async def test_sigkill_at_each_step_of_an_offline_export(
    step: str, agent: AgentProcess, vm_factory: Callable[..., stack.TestVm], tmp_path: Path
) -> None:
    vm = vm_factory(disks_mib=[16, 16])
    (v0, _, _), (v1, _, _) = vm.volumes
    state = tmp_path / "state"
    await agent.start()
    body = {"params": {"name": "crash", "vmInstanceUuid": vm.vm_uuid}}
    task = (await call(agent, "POST", "/cbt-task/create", body))["inventory"]["uuid"]
    infos = (await call(agent, "POST", f"/cbt-task/enable/{task}", {}))["volumeCbtBackupInfos"]
    first = infos[0]["bitmapName"]
    await call(agent, "POST", f"/cbt-task/disable/{task}", {})
    await vm.write(v0, 1 * MIB, 4096, 0x11)
    vm.shutdown()
    await agent.stop()

    await agent.start(crash_at=step)
    vm_body = {"params": {"vmInstanceUuid": vm.vm_uuid}}
    await agent.killed_by("POST", "/cbt-task/exportvolume", vm_body)
    await agent.start()
    inventory = await task_of(agent, task)
    assert inventory["status"] == "Failed"
    assert daemons_of(state) == {}  # reconcile stopped the daemon by its pid (if it ran)
    vm.start()  # nothing holds the images
    await vm.write(v1, 2 * MIB, 4096, 0x22)

    # The next Enable since the first checkpoint holds every write, before and after.
    infos = (
        await call(agent, "POST", f"/cbt-task/enable/{task}", {"params": {"bitmapName": first}})
    )["volumeCbtBackupInfos"]
    by_vol = {i["exportName"]: i for i in infos}
    assert by_vol[v0]["mode"] == by_vol[v1]["mode"] == "incremental"
    assert await dirty(by_vol[v0]) == [(1 * MIB, G)]
    assert await dirty(by_vol[v1]) == [(2 * MIB, G)]
    await call(agent, "POST", f"/cbt-task/disable/{task}", {})
    await agent.stop()


async def test_sigkill_with_an_offline_export_open_keeps_it_and_unexport_ends_it(
    agent: AgentProcess, vm_factory: Callable[..., stack.TestVm], tmp_path: Path
) -> None:
    vm = vm_factory(disks_mib=[16])
    ((v0, _, _),) = vm.volumes
    state = tmp_path / "state"
    await agent.start()
    body = {"params": {"name": "open", "vmInstanceUuid": vm.vm_uuid}}
    task = (await call(agent, "POST", "/cbt-task/create", body))["inventory"]["uuid"]
    await vm.write(v0, 3 * MIB, 4096, 0x33)
    vm.shutdown()
    vm_body = {"params": {"vmInstanceUuid": vm.vm_uuid}}
    (info,) = (await call(agent, "POST", "/cbt-task/exportvolume", vm_body))["volumeInfos"]
    assert info["mode"] == "full"
    (pid,) = daemons_of(state)
    await agent.stop(signal.SIGKILL)

    await agent.start()
    assert (await task_of(agent, task))["status"] == "Running"
    assert list(daemons_of(state)) == [pid]  # the same daemon, still exporting
    address = nbdio.NbdAddress(info["nbdServer"], int(info["nbdPort"]), None, v0)
    h = await asyncio.to_thread(nbdio.connect, address)
    try:
        assert await asyncio.to_thread(h.pread, 4096, 3 * MIB) == b"\x33" * 4096
    finally:
        nbdio.close(h)
    reply = await call(agent, "POST", "/cbt-task/unexportvolume", vm_body)
    assert reply["storageDaemonPid"] == pid
    assert daemons_of(state) == {}
    assert (await task_of(agent, task))["status"] == "Stopped"
    vm.start()
    await agent.stop()
