"""A task follows its VM to another host: adopted on arrival from what the disks carry.

One machine has one libvirtd, so "another host" is a second agent with its own state directory
(its own SQLite) on the same VM, a database deleted under a running agent, and a real QEMU live
migration between two QEMU processes on the same image files. The management plane's part, the
Create with `resourceUuid` on the new host, is what the reference client does by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import stack
from agentproc import AgentProcess, cli, restored_disks
from cbtharness import Agent, by_volume, dirty_runs, expected_runs
from qemu.qmp import QMPClient

from cbt_agent.api import replies, validate
from cbt_agent.hypervisor.libvirt import VmEvent, VmEventKind
from cbt_agent.model import TaskStatus
from cbt_agent.qemu import images
from cbt_agent.qemu import nbd as nbdio
from cbt_agent.reasons import FULL_NONE_HANDED_OUT
from cbt_agent.store import SyncStore

pytestmark = pytest.mark.stack

KIB = 1024
MIB = 1 << 20
G = 64 * KIB


# ---- (a) a second agent ("the new host") adopts the task and goes on exactly ----------------


async def test_new_host_adopts_the_task_and_the_next_backup_is_incremental_and_exact(
    vm_factory: Callable[..., stack.TestVm],
    tmp_path: Path,
    agent_process: Callable[..., AgentProcess],
) -> None:
    vm = vm_factory(disks_mib=[16, 16])
    model = {v.volume_uuid: bytearray(v.size) for v in vm.volumes}
    (v0, _, _), (v1, _, _) = vm.volumes
    dest, out = tmp_path / "backup", tmp_path / "out"
    snapshots: dict[str, dict[str, bytes]] = {}

    async def write(vol: str, off: int, n: int, byte: int) -> None:
        await vm.write(vol, off, n, byte)
        model[vol][off : off + n] = bytes([byte]) * n

    async def backup(agent: AgentProcess) -> dict[str, Any]:
        await cli("backup", "--url", agent.base, "--vm", vm.vm_uuid, "--dest", str(dest))
        manifest = json.loads((dest / "manifest.json").read_text())
        cp = dict(manifest["checkpoints"][-1])
        snapshots[cp["name"]] = {v: bytes(d) for v, d in model.items()}
        return {**cp, "taskUuid": manifest["taskUuid"]}

    old = agent_process("11200:11249", "old")
    new = agent_process("11250:11299", "new")
    await old.start()
    await write(v0, 0, MIB, 0x01)
    first = await backup(old)
    for i in range(2):
        await write(v0, (2 + i) * MIB, 64 * KIB, 0x10 + i)
        await write(v1, (5 + i) * MIB + 7, 100, 0x20 + i)
        last = await backup(old)
    assert last["mode"] == "incremental"
    task = last["taskUuid"]
    await old.stop(signal.SIGTERM)  # the VM "left": this agent no longer drives it

    await write(v0, 9 * MIB, 64 * KIB, 0x30)
    await write(v1, 11 * MIB, 64 * KIB, 0x31)
    await new.start()
    arrived = await backup(new)  # the client asks the new host for the manifest's task uuid
    assert arrived["taskUuid"] == task
    assert arrived["mode"] == "incremental"
    disks = {d["volumeUuid"]: d for d in arrived["disks"]}
    assert {d["sinceCheckpoint"] for d in disks.values()} == {last["name"]}
    # exactly the two clusters written since the last backup, one per disk
    assert disks[v0]["copiedBytes"] == G and disks[v1]["copiedBytes"] == G
    for name, want in snapshots.items():
        assert await restored_disks(dest, name, out) == want, name

    # the new host's history says where the chain was found
    text = await cli("tasks", "--config", str(new.config), task, "--json")
    history = json.loads(text)["history"]
    assert history[0]["to_status"] == "Created"
    assert history[0]["reason"].startswith(
        f"adopted: 3 checkpoint(s) {first['name']} .. {last['name']} found on the disks: "
    )
    assert str(vm.volumes[0].path) in history[0]["reason"]


# ---- (c) the database lost while tracking -------------------------------------------------------


async def test_a_lost_database_costs_nothing_with_resource_uuid(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[16, 16])
    (v0, _, size0), (v1, _, _) = vm.volumes
    agent = await make_agent(ports="11150:11199")
    task = await agent.create(vm)
    names = []
    for i in range(3):
        names.append((await agent.enable(task))[0]["bitmapName"])
        await agent.disable(task)
        await vm.write(v0, (1 + i) * MIB, 512, 0x40 + i)
    await agent.close()
    await asyncio.to_thread(agent.config.db_path.unlink)
    # the VM is shut off meanwhile: the chain is read from the image files
    await asyncio.to_thread(vm.shutdown)

    fresh = await make_agent(ports="11150:11199")
    body = {"params": {"name": "t", "vmInstanceUuid": vm.vm_uuid, "resourceUuid": task}}
    created = replies.inventory_reply(await fresh.service.create(validate.create_task(body)))
    assert created["inventory"]["uuid"] == task
    cps = await fresh.store.run(SyncStore.checkpoints, task)
    assert [(c.name, c.handed_out, sorted(c.volumes)) for c in cps] == [
        (n, False, sorted([v0, v1])) for n in names
    ]
    rows = await fresh.store.run(SyncStore.history_rows, task)
    assert rows[0]["reason"].startswith(f"adopted: 3 checkpoint(s) {names[0]} .. {names[2]}")
    await asyncio.to_thread(vm.start)

    infos = by_volume(await fresh.enable(task, since=names[1]))
    assert infos[v0]["mode"] == "incremental"
    assert dirty_runs(infos[v0]) == expected_runs([(2 * MIB, 512), (3 * MIB, 512)], size0)
    assert dirty_runs(infos[v1]) == []
    await fresh.disable(task)
    # without bitmapName: the caller must say what it holds, nothing was handed out here
    infos = by_volume(await fresh.enable(task))
    assert infos[v0]["mode"] == "incremental"  # now one was handed out: the one just cut
    await fresh.disable(task)
    # a Create with a uuid whose bitmaps no disk carries is a new, empty task
    other = vm_factory(disks_mib=[16])
    body = {"params": {"name": "x", "vmInstanceUuid": other.vm_uuid, "resourceUuid": "ab" * 16}}
    await fresh.service.create(validate.create_task(body))
    assert await fresh.store.run(SyncStore.checkpoints, "ab" * 16) == []
    rows = await fresh.store.run(SyncStore.history_rows, "ab" * 16)
    assert rows[0]["reason"] == "created"


async def test_default_enable_after_adoption_is_full_saying_what_to_pass(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[16])
    agent = await make_agent(ports="11150:11199")
    task = await agent.create(vm)
    await agent.enable(task)
    await agent.disable(task)
    await agent.close()
    await asyncio.to_thread(agent.config.db_path.unlink)
    fresh = await make_agent(ports="11150:11199")
    body = {"params": {"name": "t", "vmInstanceUuid": vm.vm_uuid, "resourceUuid": task}}
    await fresh.service.create(validate.create_task(body))
    info = (await fresh.enable(task))[0]
    assert (info["mode"], info["reason"]) == ("full", FULL_NONE_HANDED_OUT)
    await fresh.disable(task)


# ---- (2) the source side lets go ------------------------------------------------------------


async def test_source_host_lets_go_and_delete_keeps_the_disks_bitmaps(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    """libvirt cannot migrate on one host: the event it sends on the source (stopped,
    migrated) is handed to the agent as libvirt would, with the VM gone from QEMU here."""
    vm = vm_factory(disks_mib=[16])
    agent = await make_agent(ports="11150:11199")
    task = await agent.create(vm)
    name = (await agent.enable(task))[0]["bitmapName"]
    await asyncio.to_thread(vm.shutdown)  # QEMU gone from this host; the images stay shared
    await agent.service.on_vm_event(VmEvent(vm.vm_uuid, VmEventKind.MIGRATED_AWAY, "5/3"))
    t = await agent.store.run(SyncStore.require_task, task)
    assert t.status is TaskStatus.FAILED
    assert t.reason == "VM migrated away from this host (5/3)"
    assert t.released == t.reason
    assert await asyncio.to_thread(os.listdir, agent.config.scratch_dir) == []
    await agent.service.delete(validate.delete_task(task, False, None))
    assert await agent.store.run(SyncStore.get_task, task) is None
    [(_file, names)] = await images.chain_bitmaps(str(vm.volumes[0].path))
    assert names == {name}  # the new host's tracking is untouched


# ---- (b) persistent bitmaps through a real QEMU live migration -------------------------------


class Qemu:
    """A bare QEMU (TCG) on one qcow2 image, driven over QMP; stopped by pid."""

    def __init__(self, image: Path, qmp: Path, incoming: Path | None = None) -> None:
        self.image, self.qmp_path, self.incoming = image, qmp, incoming
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp = QMPClient(qmp.name)

    async def start(self) -> None:
        args = [
            "qemu-system-x86_64",
            "-machine",
            "q35,accel=tcg",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "64",
            "-blockdev",
            json.dumps({"driver": "file", "filename": str(self.image), "node-name": "file0"}),
            "-blockdev",
            json.dumps({"driver": "qcow2", "file": "file0", "node-name": "disk0"}),
            "-device",
            "virtio-blk-pci,drive=disk0,id=vda",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if self.incoming is not None:
            args += ["-incoming", f"unix:{self.incoming}"]
        self.proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(200):
            if self.qmp_path.exists():
                break
            await asyncio.sleep(0.02)
        await self.qmp.connect(str(self.qmp_path))

    async def write(self, offset: int, length: int, byte: int) -> None:
        command = (
            f'qemu-io -d /machine/peripheral/vda/virtio-backend "write -P {byte} {offset} {length}"'
        )
        out = await self.qmp.execute("human-monitor-command", {"command-line": command})
        assert not str(out).strip(), out

    async def bitmap(self, name: str) -> dict[str, Any] | None:
        for n in await self.qmp.execute("query-named-block-nodes", {"flat": True}):
            if n["node-name"] == "disk0":
                for b in n.get("dirty-bitmaps", []):
                    if b.get("name") == name:
                        return dict(b)
        return None

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.qmp.execute("quit")
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        if self.proc is not None and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def test_persistent_bitmaps_survive_a_real_qemu_live_migration(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    await images.run("qemu-img", "create", "-f", "qcow2", str(image), "16M")
    mig = tmp_path / "mig.sock"
    src = Qemu(image, tmp_path / "src.qmp")
    dst = Qemu(image, tmp_path / "dst.qmp", incoming=mig)
    nbd_sock = tmp_path / "nbd.sock"
    try:
        await src.start()
        await dst.start()
        capability = {"capabilities": [{"capability": "dirty-bitmaps", "state": True}]}
        for q in (src, dst):
            await q.qmp.execute("migrate-set-capabilities", capability)
        await src.qmp.execute(
            "block-dirty-bitmap-add", {"node": "disk0", "name": "cbt-x-000001", "persistent": True}
        )
        writes = [(1 * MIB, 4 * KIB)]
        await src.write(*writes[0], 0x11)
        # slow enough that writes land while the migration is still active
        await src.qmp.execute("migrate-set-parameters", {"max-bandwidth": 256 * KIB})
        await src.qmp.execute("migrate", {"uri": f"unix:{mig}"})
        during = [(3 * MIB, 64 * KIB), (7 * MIB + 5, 10)]
        for _ in range(500):
            status = (await src.qmp.execute("query-migrate"))["status"]
            if status != "setup":
                break
            await asyncio.sleep(0.01)
        assert status == "active", status
        for off, n in during:
            await src.write(off, n, 0x22)
        writes += during
        assert (await src.qmp.execute("query-migrate"))["status"] == "active"
        await src.qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 30})
        for _ in range(500):
            status = (await src.qmp.execute("query-migrate"))["status"]
            if status in ("completed", "failed"):
                break
            await asyncio.sleep(0.02)
        assert status == "completed"
        for _ in range(500):
            if (await dst.qmp.execute("query-status"))["status"] == "running":
                break
            await asyncio.sleep(0.02)
        await src.stop()
        after = [(12 * MIB, 64 * KIB)]
        await dst.write(*after[0], 0x33)
        writes += after
        state = await dst.bitmap("cbt-x-000001")
        assert state is not None and state["persistent"] and state["recording"]
        # the destination's bitmap holds every write: before, during and after the migration
        await dst.qmp.execute(
            "block-dirty-bitmap-disable", {"node": "disk0", "name": "cbt-x-000001"}
        )
        await dst.qmp.execute(
            "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd_sock)}}}
        )
        await dst.qmp.execute(
            "block-export-add",
            {
                "type": "nbd",
                "id": "e",
                "node-name": "disk0",
                "name": "disk0",
                "bitmaps": ["cbt-x-000001"],
            },
        )
        address = nbdio.NbdAddress(None, None, str(nbd_sock), "disk0")
        extents = await asyncio.to_thread(
            nbdio.dirty_extents, address, "qemu:dirty-bitmap:cbt-x-000001"
        )
        assert [(e.start, e.length) for e in extents if e.dirty] == expected_runs(writes, 16 * MIB)
        await dst.qmp.execute("block-export-del", {"id": "e"})
        await dst.qmp.execute("nbd-server-stop")
        await dst.stop()
        # and the destination wrote it into the image on its clean exit
        [(_file, names)] = await images.chain_bitmaps(str(image))
        assert names == {"cbt-x-000001"}
    finally:
        await src.stop()
        await dst.stop()
