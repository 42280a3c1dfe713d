"""Fault injection: the agent is killed with SIGKILL at each step of Enable, Disable and Delete
(CBT_AGENT_CRASH_AT), restarted, and every case must end in a true status with nothing left
behind in QEMU or on disk, and the next incremental must hold every write (none lost)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import stack

from cbt_agent.qemu import nbd as nbdio

pytestmark = pytest.mark.stack

TOKEN = "crash-token"
MIB = 1 << 20
G = 65536


class Agent:
    """`cbt-agent serve` as a process; stopped by pid."""

    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.base = f"http://127.0.0.1:{port}/zstack/v1"
        self.proc: asyncio.subprocess.Process | None = None
        self.session = aiohttp.ClientSession(headers={"Authorization": f"OAuth {TOKEN}"})

    async def start(self, crash_at: str | None = None) -> None:
        env = dict(os.environ)
        env.pop("CBT_AGENT_CRASH_AT", None)
        if crash_at:
            env["CBT_AGENT_CRASH_AT"] = crash_at
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cbt_agent",
            "serve",
            "--config",
            str(self.config),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(400):
            try:
                async with self.session.get(self.base.replace("/zstack/v1", "/healthz")) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert self.proc.returncode is None, "agent exited at start"
            await asyncio.sleep(0.05)
        raise AssertionError("agent did not start")

    async def stop(self) -> None:
        if self.proc is not None:
            if self.proc.returncode is None:
                os.kill(self.proc.pid, signal.SIGTERM)
            await asyncio.wait_for(self.proc.wait(), 30)
            self.proc = None

    async def submit(self, method: str, path: str, body: Any = None) -> str:
        async with self.session.request(method, self.base + path, json=body) as r:
            assert r.status == 202, await r.text()
            return str((await r.json())["location"])

    async def poll(self, location: str) -> tuple[int, Any]:
        while True:
            async with self.session.get(location) as r:
                if r.status != 202:
                    return r.status, await r.json()
            await asyncio.sleep(0.02)

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        status, reply = await self.poll(await self.submit(method, path, body))
        assert status == 200, reply
        return reply

    async def killed_by(self, method: str, path: str, body: Any = None) -> None:
        """Send a call and wait for the agent to die of the injected SIGKILL."""
        assert self.proc is not None
        await self.submit(method, path, body)
        assert await asyncio.wait_for(self.proc.wait(), 60) == -signal.SIGKILL
        self.proc = None


@pytest.fixture
async def agent(tmp_path: Path, qmp_socket_template: str) -> AsyncIterator[Agent]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "config.toml"
    config.write_text(
        f'[api]\nlisten = "127.0.0.1:{port}"\ntokens = ["{TOKEN}"]\n'
        f'[state]\ndir = "{tmp_path / "state"}"\n[libvirt]\nuri = "{stack.LIBVIRT_URI}"\n'
        f'[qmp]\nsocket_template = "{qmp_socket_template}"\n'
        '[nbd]\nlisten = "127.0.0.1"\nport_range = "11900:11999"\n'
    )
    a = Agent(config, port)
    yield a
    if a.proc is not None and a.proc.returncode is None:
        os.kill(a.proc.pid, signal.SIGKILL)
        await a.proc.wait()
    await a.session.close()


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
    step: str, agent: Agent, vm_factory: Callable[..., stack.TestVm], tmp_path: Path
) -> None:
    vm = vm_factory(disks_mib=[16, 16])
    (v0, _, _), (v1, _, _) = vm.volumes
    state = tmp_path / "state"
    await agent.start()
    task = (
        await agent.call(
            "POST", "/cbt-task/create", {"params": {"name": "crash", "vmInstanceUuid": vm.vm_uuid}}
        )
    )["inventory"]["uuid"]
    infos = (await agent.call("POST", f"/cbt-task/enable/{task}", {}))["volumeCbtBackupInfos"]
    first = infos[0]["bitmapName"]
    if not step.startswith("disable:"):
        await agent.call("POST", f"/cbt-task/disable/{task}", {})
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
    async with agent.session.get(f"{agent.base}/cbt-task/{task}") as r:
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
        await agent.call("POST", f"/cbt-task/enable/{task}", {"params": {"bitmapName": first}})
    )["volumeCbtBackupInfos"]
    by_vol = {i["exportName"]: i for i in infos}
    assert by_vol[v0]["mode"] == by_vol[v1]["mode"] == "incremental"
    assert await dirty(by_vol[v0]) == [(1 * MIB, G), (3 * MIB, G)]
    assert await dirty(by_vol[v1]) == [(2 * MIB, G)]
    await agent.call("POST", f"/cbt-task/disable/{task}", {})
    assert leftovers(vm, state) == CLEAN
    await agent.stop()
