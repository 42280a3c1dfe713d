"""Fault injection: the agent is killed with SIGKILL at each step of Enable, Disable and Delete
(tests/faultagent.py installs the step hook), restarted, and every case must end in a true
status with nothing left behind in QEMU or on disk, and the next incremental must hold every
write (none lost)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import stack
from agentproc import AgentProcess, free_port, write_config

from cbt_agent.qemu import nbd as nbdio

pytestmark = pytest.mark.stack

MIB = 1 << 20
G = 65536


@pytest.fixture
async def agent(tmp_path: Path, qmp_socket_template: str) -> AsyncIterator[AgentProcess]:
    config, port = tmp_path / "config.toml", free_port()
    write_config(config, port, tmp_path / "state", qmp_socket_template, "11900:11999")
    a = AgentProcess(config, port)
    yield a
    await a.close()


async def call(agent: AgentProcess, method: str, path: str, body: Any = None) -> Any:
    status, reply = await agent.call(method, path, body)
    assert status == 200, reply
    return reply


def leftovers(vm: stack.TestVm, state: Path) -> dict[str, Any]:
    nodes = vm.qmp("query-named-block-nodes", {"flat": True})
    bitmaps = {b.get("name", "") for n in nodes for b in n.get("dirty-bitmaps", []) or []}
    return {
        "exports": vm.qmp("query-block-exports"),
        "jobs": vm.qmp("query-jobs"),
        "scratch_nodes": [n["node-name"] for n in nodes if n["node-name"].startswith("cbtsc-")],
        "scratch_files": sorted(os.listdir(state / "scratch"))
        if (state / "scratch").exists()
        else [],
        "temp_bitmaps": sorted(b for b in bitmaps if b.startswith("cbt-tmp-")),
    }


CLEAN = {"exports": [], "jobs": [], "scratch_nodes": [], "scratch_files": [], "temp_bitmaps": []}

ENABLE_STEPS = [
    "enable:planned",
    "enable:scratch",
    "enable:checkpoint",
    "enable:bitmaps",
    "enable:nbd-server",
    "enable:exported",
]
DISABLE_STEPS = ["disable:exports", "disable:jobs", "disable:scratch"]
DELETE_STEPS = ["delete:disabled", "delete:bitmaps"]


async def dirty(info: dict[str, Any]) -> list[tuple[int, int]]:
    address = nbdio.NbdAddress(info["nbdServer"], int(info["nbdPort"]), None, info["exportName"])
    extents = await asyncio.to_thread(nbdio.dirty_extents, address, info["dirtyBitmapContext"])
    return [(e.start, e.length) for e in extents if e.dirty]


@pytest.mark.parametrize("step", ENABLE_STEPS + DISABLE_STEPS + DELETE_STEPS)
async def test_sigkill_at_each_step(
    step: str, agent: AgentProcess, vm_factory: Callable[..., stack.TestVm], tmp_path: Path
) -> None:
    vm = vm_factory(disks_mib=[16, 16])
    (v0, _, _), (v1, _, _) = vm.volumes
    state = tmp_path / "state"
    await agent.start()
    task = (
        await call(
            agent,
            "POST",
            "/cbt-task/create",
            {"params": {"name": "crash", "vmInstanceUuid": vm.vm_uuid}},
        )
    )["inventory"]["uuid"]
    infos = (await call(agent, "POST", f"/cbt-task/enable/{task}", {}))["volumeCbtBackupInfos"]
    first = infos[0]["bitmapName"]
    if not step.startswith("disable:"):
        await call(agent, "POST", f"/cbt-task/disable/{task}", {})
    await vm.write(v0, 1 * MIB, 4096, 0x11)  # before the crash
    await agent.stop()

    await agent.start(crash_at=step)
    if step.startswith("enable:"):
        await agent.killed_by("POST", f"/cbt-task/enable/{task}", {})
    elif step.startswith("disable:"):
        await agent.killed_by("POST", f"/cbt-task/disable/{task}", {})
    else:
        await agent.killed_by("DELETE", f"/cbt-task/{task}")
    await vm.write(v1, 2 * MIB, 4096, 0x22)  # while the agent is down

    await agent.start()
    assert leftovers(vm, state) == CLEAN
    async with agent.session.get(f"{agent.base}/zstack/v1/cbt-task/{task}") as r:
        inventories = (await r.json())["inventories"]
    if step.startswith("delete:"):
        assert inventories == []
        names = {b["name"] for v in (v0, v1) for b in vm.bitmaps(v)}
        assert not any(n.startswith("cbt-") for n in names)
        await agent.stop()
        return
    expected = {
        "enable": ("Failed", "enable interrupted by an agent restart: rolled back"),
        "disable": ("Stopped", "interrupted disable finished at agent start"),
    }[step.split(":")[0]]
    assert inventories[0]["status"] == expected[0]
    out = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cbt_agent",
        "tasks",
        "--config",
        str(agent.config),
        task,
        stdout=asyncio.subprocess.PIPE,
    )
    text = (await out.communicate())[0].decode()
    assert f"status: {expected[0]} ({expected[1]})" in text

    # The next Enable since the first checkpoint holds the writes from before and after.
    await vm.write(v0, 3 * MIB, 4096, 0x33)
    infos = (
        await call(agent, "POST", f"/cbt-task/enable/{task}", {"params": {"bitmapName": first}})
    )["volumeCbtBackupInfos"]
    by_vol = {i["exportName"]: i for i in infos}
    assert by_vol[v0]["mode"] == by_vol[v1]["mode"] == "incremental"
    assert await dirty(by_vol[v0]) == [(1 * MIB, G), (3 * MIB, G)]
    assert await dirty(by_vol[v1]) == [(2 * MIB, G)]
    await call(agent, "POST", f"/cbt-task/disable/{task}", {})
    assert leftovers(vm, state) == CLEAN
    await agent.stop()
