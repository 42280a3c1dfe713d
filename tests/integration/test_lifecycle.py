"""VM lifecycle through libvirt events, on the real stack: clean shutdown, QEMU killed,
undefine, restart, and the agent down while it happens. The agent's status must stay true and
no incremental may ever be built on a broken bitmap."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import stack
from cbtharness import Agent, by_volume, dirty_runs

from cbt_agent.config import parse_config
from cbt_agent.engine.reconcile import reconcile
from cbt_agent.model import TaskStatus
from cbt_agent.reasons import TRACKING_LOST
from cbt_agent.store import SyncStore

pytestmark = pytest.mark.stack

MIB = 1 << 20
G = 65536


@pytest.fixture
async def watched_agent(
    tmp_path: Path, qmp_socket_template: str
) -> AsyncIterator[Callable[[], Awaitable[Agent]]]:
    made: list[Agent] = []

    async def make() -> Agent:
        config = parse_config(
            {
                "api": {"tokens": ["test-token-0123456789abcdef"]},
                "state": {"dir": str(tmp_path / "state")},
                "libvirt": {"uri": stack.LIBVIRT_URI},
                "qmp": {"socket_template": qmp_socket_template},
                "nbd": {"listen": "127.0.0.1", "port_range": "11600:11699"},
            }
        )
        agent = Agent(config, None)
        await agent.open()
        await reconcile(agent.service)  # as the app does before it listens
        await agent.hv.watch(agent.service.on_vm_event)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        await agent.close()


async def until(agent: Agent, task: str, check: Callable[[Any], bool]) -> Any:
    for _ in range(300):
        t = await agent.store.run(SyncStore.get_task, task)
        if check(t):
            return t
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task} never reached the expected state: {t}")


async def test_clean_shutdown_with_export_open_then_incremental_across_restart(
    vm_factory: Callable[..., stack.TestVm], watched_agent: Callable[[], Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[16])
    v0 = vm.volumes[0].volume_uuid
    agent = await watched_agent()
    task = await agent.create(vm)
    info = (await agent.enable(task))[0]
    caps = {c["capability"]: c["state"] for c in vm.qmp("query-migrate-capabilities")}
    assert caps["dirty-bitmaps"] is True
    await vm.write(v0, MIB, 4096, 0x11)
    await asyncio.to_thread(vm.shutdown)  # clean quit: persistent bitmaps are saved
    t = await until(agent, task, lambda t: t.status is TaskStatus.STOPPED)
    assert t.reason.startswith("VM stopped with the export open")
    assert await agent.store.run(SyncStore.exports, task) == []
    assert not await asyncio.to_thread(os.path.exists, info["target"])
    await asyncio.to_thread(vm.start)
    await asyncio.sleep(0.5)  # the start event is verified: nothing lost
    assert await agent.store.run(SyncStore.tracking_lost, task) is None
    await vm.write(v0, 2 * MIB, 4096, 0x22)
    inc = (await agent.enable(task))[0]
    assert inc["mode"] == "incremental"
    assert dirty_runs(inc) == [(MIB, G), (2 * MIB, G)]
    await agent.disable(task)


async def test_qemu_killed_means_full_with_the_reason(
    vm_factory: Callable[..., stack.TestVm], watched_agent: Callable[[], Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[16, 16])
    agent = await watched_agent()
    task = await agent.create(vm)
    await agent.enable(task)
    await agent.disable(task)
    await agent.enable(task)  # a second checkpoint, added at runtime: lost on SIGKILL
    await asyncio.to_thread(vm.kill)
    t = await until(agent, task, lambda t: t.status is TaskStatus.FAILED)
    assert t.reason.startswith(f"VM crashed: {TRACKING_LOST}")
    await asyncio.to_thread(vm.start)
    infos = by_volume(await agent.enable(task))
    assert {(i["mode"], i["reason"]) for i in infos.values()} == {("full", TRACKING_LOST)}
    await agent.disable(task)
    # a fresh chain: the next one is incremental again, and the old checkpoints are gone
    await vm.write(vm.volumes[1].volume_uuid, 3 * MIB, 100, 0x33)
    infos = by_volume(await agent.enable(task))
    assert {i["mode"] for i in infos.values()} == {"incremental"}
    assert dirty_runs(infos[vm.volumes[1].volume_uuid]) == [(3 * MIB, G)]
    assert len(await agent.store.run(SyncStore.checkpoints, task)) == 2
    await agent.disable(task)


async def test_qemu_killed_while_the_agent_is_down(
    vm_factory: Callable[..., stack.TestVm], watched_agent: Callable[[], Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[16])
    agent = await watched_agent()
    task = await agent.create(vm)
    await agent.enable(task)
    await agent.disable(task)
    await asyncio.to_thread(vm.shutdown)  # the first checkpoint reaches the qcow2
    await asyncio.to_thread(vm.start)
    await agent.close()
    await asyncio.to_thread(vm.kill)  # the stored bitmap now loads inconsistent
    await asyncio.to_thread(vm.start)
    agent = await watched_agent()  # reconcile verifies: inconsistent bitmap removed
    assert await agent.store.run(SyncStore.tracking_lost, task) == TRACKING_LOST
    assert [b["name"] for b in vm.bitmaps(vm.volumes[0].volume_uuid)] == []
    info = (await agent.enable(task))[0]
    assert (info["mode"], info["reason"]) == ("full", TRACKING_LOST)
    await agent.disable(task)


async def test_undefined_vm_fails_the_task(
    vm_factory: Callable[..., stack.TestVm], watched_agent: Callable[[], Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[16], start=False)
    agent = await watched_agent()
    task = await agent.create(vm)
    await asyncio.to_thread(vm.domain().undefine)
    t = await until(agent, task, lambda t: t.status is TaskStatus.FAILED)
    assert t.reason.startswith("VM undefined on this host")
