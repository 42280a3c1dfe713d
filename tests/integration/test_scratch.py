"""The guest never pays for a backup (real stack: libvirt TCG VMs, QEMU 7.2, libnbd, SQLite).

The scratch of an open export sits on a small tmpfs mounted by the test (and unmounted by it):
it fills during an export and the guest's writes all still succeed, the export breaks with
the reason in the task, and the next Enable counts from the last complete backup, losing no
write; a budget that cannot fit refuses the Enable before anything changes; a disk past its
budget breaks its export; a client that trims what it has read keeps the scratch small.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import stack
from cbtharness import Agent, address, by_volume, dirty_runs, expected_runs, read_export

from cbt_agent.errors import HypervisorError, OperationError
from cbt_agent.model import TaskStatus
from cbt_agent.qemu import nbd as nbdio
from cbt_agent.store import SyncStore

pytestmark = pytest.mark.stack

MIB = 1 << 20
OURS = ("cbtsc-", "cbtcw-", "cbtac-")


@pytest.fixture
def small_scratch(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """mount(size_mib) -> the agent's scratch directory, a tmpfs of that size."""
    mounted: list[Path] = []

    def mount(size_mib: int) -> Path:
        where = tmp_path / "state" / "scratch"
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(where)],
            check=True,
        )
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def leftovers(vm: stack.TestVm, volume: str) -> dict[str, Any]:
    return {
        "nodes": sorted(
            n["node-name"]
            for n in vm.qmp("query-named-block-nodes", {"flat": True})
            if n["node-name"].startswith(OURS)
        ),
        "exports": vm.qmp("query-block-exports"),
        "device_on": vm.block_entry(volume)["inserted"]["drv"],
    }


async def stopped_with(agent: Agent, task: str) -> str:
    """Wait (up to 15 s) until the task is Stopped; its reason."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:
        t = await agent.store.run(SyncStore.require_task, task)
        if t.status is TaskStatus.STOPPED:
            return t.reason or ""
        assert loop.time() < deadline, f"task still {t.status}"
        await asyncio.sleep(0.1)


def fill(directory: Path, leave: int) -> Path:
    """A file that takes all but `leave` bytes of the filesystem."""
    st = os.statvfs(directory)
    filler = directory / "filler"
    with filler.open("wb") as f:
        f.truncate(0)
        os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - leave)
    return filler


async def test_a_full_scratch_breaks_the_export_never_the_guest(
    vm_factory: Callable[..., stack.TestVm],
    make_agent: Callable[..., Awaitable[Agent]],
    small_scratch: Callable[[int], Path],
) -> None:
    scratch_dir = small_scratch(48)
    vm = vm_factory(disks_mib=[64])
    ((vol, _, size),) = vm.volumes
    agent = await make_agent(scratch_budget="32M", scratch_reserve="1M", scratch_poll=0.2)
    task = await agent.create(vm)
    # data there before: a cluster the guest overwrites is copied only if it holds some
    await vm.write(vol, 8 * MIB, 16 * MIB, 0x77)
    first = by_volume(await agent.enable(task))[vol]
    c1 = first["bitmapName"]
    await agent.disable(task)

    await vm.write(vol, 0, MIB, 0x11)
    info = by_volume(await agent.enable(task))[vol]
    assert (info["mode"], info["sinceBitmapName"], info["scratchBudget"]) == (
        "incremental",
        c1,
        32 * MIB,
    )
    c2 = info["bitmapName"]
    # something else fills the scratch filesystem to 3 MiB from full
    filler = await asyncio.to_thread(fill, scratch_dir, 3 * MIB)

    # 16 MiB of guest writes: their old data cannot all go to the scratch. Every write succeeds
    # (qemu-io raises on a failed one)
    for i in range(4):
        await vm.write(vol, 8 * MIB + i * 4 * MIB, 4 * MIB, 0x22)

    reason = await stopped_with(agent, task)
    assert reason.startswith("export broken: scratch filesystem")
    assert f"checkpoint {c2} is no default base" in reason
    assert await agent.history(task) == [
        (None, "Created"),
        ("Created", "Starting"),
        ("Starting", "Running"),
        ("Running", "Stopped"),
        ("Stopped", "Starting"),
        ("Starting", "Running"),
        ("Running", "Stopped"),
    ]
    # the export is gone: a reader gets an error, not data
    with pytest.raises(HypervisorError, match="Connection refused"):
        await asyncio.to_thread(read_export, info, 0, 4096)
    # the guest's disk is its own again: no filter, node, export or scratch file left
    assert leftovers(vm, vol) == {"nodes": [], "exports": [], "device_on": "qcow2"}
    assert sorted(p.name for p in scratch_dir.iterdir()) == ["filler"]

    # the next Enable counts from C1 (the last complete backup): every write since, both those
    # before the broken checkpoint and those during it, exactly
    filler.unlink()
    again = by_volume(await agent.enable(task))[vol]
    assert (again["mode"], again["sinceBitmapName"]) == ("incremental", c1)
    assert await asyncio.to_thread(dirty_runs, again) == expected_runs(
        [(0, MIB), (8 * MIB, 16 * MIB)], size
    )
    assert await asyncio.to_thread(read_export, again, 0, 4096) == b"\x11" * 4096
    assert await asyncio.to_thread(read_export, again, 24 * MIB - 4096, 4096) == b"\x22" * 4096
    await agent.disable(task)
    assert leftovers(vm, vol) == {"nodes": [], "exports": [], "device_on": "qcow2"}


async def test_a_budget_that_cannot_fit_refuses_the_enable_and_changes_nothing(
    vm_factory: Callable[..., stack.TestVm],
    make_agent: Callable[..., Awaitable[Agent]],
    small_scratch: Callable[[int], Path],
) -> None:
    small_scratch(8)
    vm = vm_factory(disks_mib=[64])
    ((vol, _, _),) = vm.volumes
    agent = await make_agent()  # 25 % of 64 MiB: 16 MiB, on 8 MiB
    task = await agent.create(vm)

    with pytest.raises(OperationError) as caught:
        await agent.enable(task)

    assert "not enough room for the scratch" in caught.value.message
    message = caught.value.message
    assert "the disks' budget is 16 MiB (checkpoints.scratch_budget = 25%)" in message
    t = await agent.store.run(SyncStore.require_task, task)
    assert t.status is TaskStatus.CREATED
    assert await agent.history(task) == [(None, "Created")]
    assert await agent.store.run(SyncStore.checkpoints, task) == []
    assert vm.bitmaps(vol) == []
    assert leftovers(vm, vol) == {"nodes": [], "exports": [], "device_on": "qcow2"}


async def test_a_disk_past_its_budget_breaks_its_export(
    vm_factory: Callable[..., stack.TestVm],
    make_agent: Callable[..., Awaitable[Agent]],
) -> None:
    vm = vm_factory(disks_mib=[64])
    ((vol, _, _),) = vm.volumes
    agent = await make_agent(scratch_budget="2M", scratch_poll=0.1)
    task = await agent.create(vm)
    await vm.write(vol, 0, 8 * MIB, 0x77)
    info = by_volume(await agent.enable(task))[vol]
    assert info["scratchBudget"] == 2 * MIB

    await vm.write(vol, 0, 8 * MIB, 0x33)

    reason = await stopped_with(agent, task)
    assert reason.startswith(f"export broken: scratch of volume {vol} reached ")
    assert "over its budget of 2 MiB (checkpoints.scratch_budget = 2097152)" in reason
    assert leftovers(vm, vol) == {"nodes": [], "exports": [], "device_on": "qcow2"}
    # the broken full was never a complete backup: the next Enable is a full again
    again = by_volume(await agent.enable(task))[vol]
    assert again["mode"] == "full"
    await agent.disable(task)


def copy_and_trim(info: dict[str, Any], size: int, step: int, trim: bool, between: Any) -> int:
    """Read the export `step` bytes at a time (trimming each range read when `trim`), calling
    `between(offset)` after each; the scratch's peak size (st_blocks) seen."""
    h = nbdio.connect(address(info))
    peak = 0
    try:
        assert h.can_trim()
        for offset in range(0, size, step):
            data = h.pread(step, offset)
            assert data == b"\x44" * step  # the point in time, whatever the guest did since
            if trim:
                h.trim(step, offset)
            between(offset)
            peak = max(peak, os.stat(info["target"]).st_blocks * 512)
    finally:
        nbdio.close(h)
    return peak


async def test_a_client_that_trims_what_it_read_keeps_the_scratch_small(
    vm_factory: Callable[..., stack.TestVm],
    make_agent: Callable[..., Awaitable[Agent]],
) -> None:
    vm = vm_factory(disks_mib=[32])
    ((vol, _, size),) = vm.volumes
    await vm.write(vol, 0, size, 0x44)
    agent = await make_agent(scratch_budget="100%")
    task = await agent.create(vm)
    step = 2 * MIB

    def guest_overwrites(offset: int) -> None:
        # the guest rewrites what the client has just read, and the next range too
        vm.write_sync(vol, offset, min(2 * step, size - offset), 0x55)

    peaks = {}
    for trim in (False, True):
        info = by_volume(await agent.enable(task))[vol]
        peaks[trim] = await asyncio.to_thread(
            copy_and_trim, info, size, step, trim, guest_overwrites
        )
        await agent.disable(task)
        await vm.write(vol, 0, size, 0x44)

    # without trim every cluster the guest overwrote went to the scratch; with it, at most the
    # range ahead of the reader (the one it reads next) at any time
    assert peaks[False] >= size - step
    assert peaks[True] <= 2 * step + MIB
