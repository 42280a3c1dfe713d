"""A real guest: quiesced checkpoints through its guest agent, and restores that boot.

The guest is the minimal Debian of scripts/guest-image.sh (kernel, systemd, qemu-guest-agent),
booted under TCG once for the module. Files are written through the guest's own filesystem
with `guest-exec`; backups go through the agent process and `cbt-agent backup --quiesce`; each
checkpoint is restored, checked with `e2fsck`, and booted, and its files are read back through
the restored guest's agent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import guest
import pytest
import stack
from agentproc import AgentProcess, cli, restored_images
from cbtharness import Agent

from cbt_agent.api import replies, validate
from cbt_agent.engine.reconcile import reconcile
from cbt_agent.errors import CbtError
from cbt_agent.model import TaskStatus
from cbt_agent.qemu import images
from cbt_agent.qemu.qmp import QmpChannel
from cbt_agent.store import SyncStore

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def image(libvirt_stack: Any) -> guest.GuestImage:
    try:
        return guest.guest_image()
    except stack.StackUnavailable as e:
        stack.unavailable(f"guest image: {e}")


@pytest.fixture(scope="module")
def booted(
    image: guest.GuestImage, tmp_path_factory: pytest.TempPathFactory, qmp_socket_dir: Path
) -> Iterator[stack.TestVm]:
    """One guest for the module, with ZStack's extra QMP socket, its agent answering."""
    vm = guest.make_guest_vm(image, tmp_path_factory.mktemp("guest"), socket_dir=qmp_socket_dir)
    try:
        guest.wait_for_agent(vm)
        guest.sh(vm, "mkdir -p /data && sync")
        yield vm
    finally:
        vm.destroy()


@pytest.fixture
async def agent_proc(agent_process: Callable[..., AgentProcess]) -> AgentProcess:
    proc = agent_process("11050:11099")
    await proc.start()
    return proc


def files_in_guest(vm: stack.TestVm) -> dict[str, str]:
    """sha256 of every file under /data in the guest."""
    out = guest.sh(vm, "cd /data && find . -type f -exec sha256sum {} + | sort -k2")
    return {line.split()[1]: line.split()[0] for line in out.splitlines() if line.strip()}


# ---- quiesced backups whose restores boot ------------------------------------------------------


async def test_quiesced_backups_restore_to_filesystems_that_boot(
    booted: stack.TestVm, agent_proc: AgentProcess, image: guest.GuestImage, tmp_path: Path
) -> None:
    vm = booted
    dest = tmp_path / "backup"
    expected: dict[str, dict[str, str]] = {}
    rounds = [
        "dd if=/dev/urandom of=/data/a.bin bs=64k count=40 conv=fsync status=none;"
        " echo one >> /data/log",
        "dd if=/dev/urandom of=/data/b.bin bs=4k count=7 status=none; echo two >> /data/log;"
        " dd if=/dev/urandom of=/data/a.bin bs=4k count=3 seek=5 conv=notrunc status=none",
        "rm /data/b.bin; echo three >> /data/log; mkdir -p /data/d; echo x > /data/d/y",
    ]
    for script in rounds:
        # written and fsynced by the guest, but nothing synced by hand: the freeze flushes
        await asyncio.to_thread(guest.sh, vm, script)
        await cli(
            "backup",
            "--url",
            agent_proc.base,
            "--vm",
            vm.vm_uuid,
            "--dest",
            str(dest),
            "--quiesce",
        )
        assert await asyncio.to_thread(guest.freeze_status, vm) == "thawed"
        manifest = json.loads((dest / "manifest.json").read_text())
        name = manifest["checkpoints"][-1]["name"]
        expected[name] = await asyncio.to_thread(files_in_guest, vm)
    task = manifest["taskUuid"]
    assert [c["mode"] for c in manifest["checkpoints"]] == ["full", "incremental", "incremental"]
    history = json.loads(await cli("tasks", "--config", str(agent_proc.config), task, "--json"))
    running = [h["reason"] for h in history["history"] if h["to_status"] == "Running"]
    assert len(running) == 3
    assert all("; quiesced (guest filesystems frozen " in r for r in running), running

    # every checkpoint: restore, a clean filesystem, and a guest that boots with its files
    vms: list[stack.TestVm] = []
    try:
        for name in expected:
            out = tmp_path / name
            [restored] = await restored_images(dest, name, out)
            await fsck_clean(restored)
            vms.append(
                await asyncio.to_thread(guest.make_guest_vm, image, out / "vm", root=restored)
            )
        # the restored guests boot side by side
        await asyncio.gather(*(asyncio.to_thread(guest.wait_for_agent, v) for v in vms))
        for v, (name, files) in zip(vms, expected.items(), strict=True):
            assert await asyncio.to_thread(files_in_guest, v) == files, name
    finally:
        await asyncio.gather(*(asyncio.to_thread(v.destroy) for v in vms))


# ---- freeze and thaw on every path -------------------------------------------------------------


async def test_quiesce_failure_paths_always_thaw(
    booted: stack.TestVm, make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = booted
    node: list[str] = []
    agent: Agent | None = None

    async def hook(step: str) -> None:
        # between the scratch nodes and the transaction: a bitmap of the checkpoint's own name
        # makes QEMU refuse the transaction (its guest frozen at that moment)
        if step == "enable:scratch" and node:
            exports = await agent.store.run(SyncStore.exports, task) if agent else []
            await vm.qmp_async(
                "block-dirty-bitmap-add", {"node": node[0], "name": exports[0].checkpoint}
            )

    agent = await make_agent(step=hook, ports="11000:11049")
    task = await agent.create(vm)
    node.append(vm.node_name(vm.volumes[0].volume_uuid))
    quiesced = validate.enable_task(task, {"params": {}, "systemTags": ["quiesce::true"]})
    with pytest.raises(CbtError, match="QMP transaction failed"):
        await agent.service.enable(quiesced)
    assert await asyncio.to_thread(guest.freeze_status, vm) == "thawed"
    t = await agent.store.run(SyncStore.require_task, task)
    assert t.status is TaskStatus.FAILED
    node.clear()

    # the agent killed while the guest is frozen for a checkpoint: reconcile thaws it
    await asyncio.to_thread(lambda: vm.domain().fsFreeze())
    assert await asyncio.to_thread(guest.freeze_status, vm) == "frozen"
    await agent.store.run(
        SyncStore.set_status, task, TaskStatus.STARTING, "enable requested", operation="enable"
    )
    await reconcile(agent.service)
    assert await asyncio.to_thread(guest.freeze_status, vm) == "thawed"
    t = await agent.store.run(SyncStore.require_task, task)
    assert (t.status, t.reason) == (
        TaskStatus.FAILED,
        "enable interrupted by an agent restart: rolled back",
    )

    # and a quiesced Enable that works says so, per disk and in the history
    info = replies.enable_reply(await agent.service.enable(quiesced))["volumeCbtBackupInfos"][0]
    assert info["quiesced"] is True and json.loads(info["metadata"])["quiesced"] is True
    rows = await agent.store.run(SyncStore.history_rows, task)
    assert "; quiesced (guest filesystems frozen " in rows[-1]["reason"]
    assert await asyncio.to_thread(guest.freeze_status, vm) == "thawed"
    await agent.disable(task)

    # a checkpoint transaction slower than freeze_timeout: the guest is thawed at the timeout,
    # the outcome read back (here it never ran), the checkpoint forgotten
    config = agent.service.config
    agent.service.config = replace(
        config, checkpoints=replace(config.checkpoints, freeze_timeout=1)
    )
    before = [c.name for c in await agent.store.run(SyncStore.checkpoints, task)]
    real = agent.router.channel
    slowed: list[str] = []

    class Slow:
        def __init__(self, inner: QmpChannel) -> None:
            self.inner, self.kind = inner, inner.kind

        async def execute(self, command: str, arguments: Any = None) -> Any:
            if command == "transaction" and not slowed:
                slowed.append(command)
                await asyncio.sleep(30)  # cancelled at the freeze timeout
            return await self.inner.execute(command, arguments)

        async def execute_with_fd(self, command: str, arguments: Any, fd: int) -> Any:
            return await self.inner.execute_with_fd(command, arguments, fd)

        async def close(self) -> None:
            await self.inner.close()

    async def channel(vm_uuid: str) -> QmpChannel:
        return Slow(await real(vm_uuid))

    agent.router.channel = channel  # type: ignore[method-assign]
    with pytest.raises(CbtError, match=r"did not answer within the freeze timeout \(1 s\)"):
        await agent.service.enable(quiesced)
    assert slowed == ["transaction"]
    assert await asyncio.to_thread(guest.freeze_status, vm) == "thawed"
    assert [c.name for c in await agent.store.run(SyncStore.checkpoints, task)] == before
    assert vm.qmp("query-block-exports") == [] and vm.qmp("query-jobs") == []
    info = replies.enable_reply(await agent.service.enable(quiesced))["volumeCbtBackupInfos"][0]
    assert info["mode"] == "incremental" and info["quiesced"] is True
    await agent.disable(task)


async def test_without_a_guest_agent_auto_is_crash_consistent_and_always_fails(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[16])  # no OS, no guest agent channel
    agent = await make_agent(ports="11000:11049")
    task = await agent.create(vm)
    info = (await agent.enable(task))[0]  # [checkpoints] quiesce = "auto" by default
    assert info["quiesced"] is False
    rows = await agent.store.run(SyncStore.history_rows, task)
    assert rows[-1]["reason"].endswith(
        "; crash-consistent (no guest agent: argument unsupported: QEMU guest agent is not "
        "configured)"
    )
    await agent.disable(task)
    always = validate.enable_task(task, {"params": {}, "systemTags": ["quiesce::true"]})
    with pytest.raises(CbtError) as err:
        await agent.service.enable(always)
    assert err.value.message.startswith(
        f"quiesce was asked for but VM [uuid: {vm.vm_uuid}] has no guest agent to freeze its "
        "filesystems: "
    )
    assert vm.qmp("query-block-exports") == [] and vm.qmp("query-jobs") == []
    never = validate.enable_task(task, {"params": {}, "systemTags": ["quiesce::false"]})
    info = replies.enable_reply(await agent.service.enable(never))["volumeCbtBackupInfos"][0]
    assert info["quiesced"] is False and info["mode"] == "incremental"
    rows = await agent.store.run(SyncStore.history_rows, task)
    assert rows[-1]["reason"].endswith("; crash-consistent (quiesce not asked for)")
    await agent.disable(task)


async def test_fstrim_makes_no_data_in_the_incremental(
    booted: stack.TestVm, agent_proc: AgentProcess, tmp_path: Path
) -> None:
    vm = booted
    dest = tmp_path / "backup"

    async def backup() -> dict[str, Any]:
        await cli(
            "backup",
            "--url",
            agent_proc.base,
            "--vm",
            vm.vm_uuid,
            "--dest",
            str(dest),
        )
        return dict(json.loads((dest / "manifest.json").read_text())["checkpoints"][-1])

    await asyncio.to_thread(
        guest.sh, vm, "dd if=/dev/urandom of=/data/big bs=1M count=16 status=none && sync"
    )
    await backup()
    await asyncio.to_thread(guest.sh, vm, "rm /data/big && sync && fstrim /")
    inc = await backup()
    assert inc["mode"] == "incremental"
    [disk] = inc["disks"]
    # the 16 MiB trimmed are in the change set, but the incremental holds them as zeroes
    assert disk["copiedBytes"] >= 16 << 20
    mapping = json.loads(
        await images.run("qemu-img", "map", "--output=json", str(dest / disk["file"]))
    )
    data = sum(m["length"] for m in mapping if m["data"] and m["depth"] == 0)
    assert data < 4 << 20, f"{data} bytes of data in the incremental"
    # and the restore is a clean filesystem
    [restored] = await restored_images(dest, inc["name"], tmp_path / "out")
    await fsck_clean(restored)


async def fsck_clean(image: Path) -> None:
    raw = image.with_suffix(".raw")
    await images.run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw))
    fsck = await asyncio.create_subprocess_exec(
        "e2fsck", "-fn", str(raw), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    report, _ = await fsck.communicate()
    await asyncio.to_thread(raw.unlink)
    assert fsck.returncode == 0, f"{image}: e2fsck -fn: {report.decode()}"
