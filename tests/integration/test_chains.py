"""Tracked disks whose image chain changes: no change is lost, and a full always says why.

On the real stack (libvirt 9.0, QEMU 7.2 TCG, libnbd, SQLite). The chain operations are done
the way ZStack does them (tests/chainops.py: libvirt snapshots, commits, streams, copies), or
behind libvirt's back where the point is that the agent notices. Each test checks the exact
dirty clusters over NBD and the data there.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import chainops
import pytest
import stack
from agentproc import AgentProcess, cli, restored_disks
from cbtharness import Agent, by_volume, dirty_runs, expected_runs, read_export

from cbt_agent.api import validate
from cbt_agent.dirtymap import DirtyExtent, bitmap_from_extents
from cbt_agent.errors import CbtError, QmpInterrupted
from cbt_agent.hypervisor.libvirt import VmEvent, VmEventKind
from cbt_agent.model import TaskStatus, checkpoint_name
from cbt_agent.qemu.qmp import QmpChannel
from cbt_agent.reasons import FULL_BROKEN, FULL_NEW_TOP
from cbt_agent.store import SyncStore

pytestmark = pytest.mark.stack

KIB = 1024
MIB = 1 << 20
G = 64 * KIB


def task_bitmaps(vm: stack.TestVm) -> dict[str, list[str]]:
    """Every node of the VM that holds a cbt- bitmap, with their names."""
    out: dict[str, list[str]] = {}
    for n in vm.qmp("query-named-block-nodes", {"flat": True}):
        names = sorted(b["name"] for b in n.get("dirty-bitmaps", []) if b.get("name"))
        if names:
            out[n["node-name"]] = names
    return out


def dirty_bits(runs: list[tuple[int, int]], size: int) -> bytes:
    return bitmap_from_extents([DirtyExtent(s, n, True) for s, n in runs], size, G)


# ---- the case first: a ZStack volume snapshot between two backups --------------------


async def test_snapshot_between_backups_loses_nothing_api_and_client(
    vm_factory: Callable[..., stack.TestVm],
    tmp_path: Path,
    agent_process: Callable[..., AgentProcess],
) -> None:
    """Full backup; guest writes at 2 MiB; ZStack snapshots disk 0 only (libvirt, DISK_ONLY |
    NO_METADATA, disk 1 snapshot='no'); guest writes at 9 MiB. The incremental holds both
    writes, over the API and through `cbt-agent backup`/`restore`."""
    vm = vm_factory(disks_mib=[16, 16])
    (v0, _, size0), (v1, _, size1) = vm.volumes
    agent = agent_process("11300:11349")
    dest, out = tmp_path / "backup", tmp_path / "restored"
    await agent.start()
    model = {v0: bytearray(size0), v1: bytearray(size1)}

    async def write(vol: str, off: int, n: int, byte: int) -> None:
        await vm.write(vol, off, n, byte)
        model[vol][off : off + n] = bytes([byte]) * n

    await write(v0, 0, MIB, 0x10)
    first = await backup(agent, vm, dest)
    before = {v: bytes(d) for v, d in model.items()}
    await write(v0, 2 * MIB, 64 * KIB, 0xA2)
    await write(v1, 5 * MIB + 100, 10, 0xB5)
    overlays = await asyncio.to_thread(chainops.snapshot, vm, [v0], tmp_path / "snaps")
    assert chainops.chain_files(vm, v0)[0] == overlays[v0]
    await write(v0, 9 * MIB, 64 * KIB, 0xA9)

    # over the API: since the full, both writes on disk 0, the other disk's one
    status, reply = await agent.call(
        "POST",
        f"/cbt-task/enable/{first['taskUuid']}",
        {"params": {"bitmapName": first["name"]}},
    )
    assert status == 200, reply
    infos = by_volume(reply["volumeCbtBackupInfos"])
    want0 = [(2 * MIB, G), (9 * MIB, G)]
    want1 = [(5 * MIB, G)]
    for vol, want, size in ((v0, want0, size0), (v1, want1, size1)):
        meta = json.loads(infos[vol]["metadata"])
        assert infos[vol]["mode"] == "incremental", meta["reason"]
        assert meta["sinceBitmapName"] == first["name"]
        assert base64.b64decode(infos[vol]["bitmapBase64"]) == dirty_bits(want, size)
        assert meta["changedBytes"] == sum(n for _, n in want)
        url = f"{agent.base}/zstack/v1/cbt-task/{first['taskUuid']}/volumes/{vol}"
        async with agent.session.get(f"{url}/changed-areas") as r:
            assert r.status == 200
            areas = await r.json()
        assert [(a["start"], a["length"]) for a in areas["changedAreas"]] == want
    status, _ = await agent.call("POST", f"/cbt-task/disable/{first['taskUuid']}", {})
    assert status == 200

    # through the reference client: its next backup is since the full it holds
    second = await backup(agent, vm, dest)
    assert {d["mode"] for d in second["disks"]} == {"incremental"}
    for name, want_data in ((first["name"], before), (second["name"], model)):
        got = await restored_disks(dest, name, out)
        assert got == {v: bytes(d) for v, d in want_data.items()}, name


async def backup(agent: AgentProcess, vm: stack.TestVm, dest: Path) -> dict[str, Any]:
    await cli("backup", "--url", agent.base, "--vm", vm.vm_uuid, "--dest", str(dest))
    manifest = json.loads((dest / "manifest.json").read_text())
    cp = dict(manifest["checkpoints"][-1])
    cp["taskUuid"] = manifest["taskUuid"]
    return cp


# ---- libvirt's block jobs keep the change set exact --------------------------------------------


async def test_commit_stream_and_copy_keep_increments_exact(
    vm_factory: Callable[..., stack.TestVm],
    make_agent: Callable[..., Awaitable[Agent]],
    tmp_path: Path,
) -> None:
    vm = vm_factory(disks_mib=[16])
    v0, _, size = vm.volumes[0]
    files = tmp_path / "chain"
    agent = await make_agent()
    task = await agent.create(vm)

    async def cycle(writes: list[tuple[int, int]], chain_op: Callable[[], object]) -> list[Any]:
        """Enable (since the latest), Disable; writes, the chain operation, more writes; the
        next Enable must hold exactly the writes (and what the operation itself wrote)."""
        half = len(writes) // 2
        for off, n in writes[:half]:
            await vm.write(v0, off, n, 0x5C)
        await asyncio.to_thread(chain_op)
        for off, n in writes[half:]:
            await vm.write(v0, off, n, 0x5D)
        info = (await agent.enable(task))[0]
        assert info["mode"] == "incremental", info["reason"]
        runs = dirty_runs(info)
        assert read_export(info, writes[-1][0], writes[-1][1]) == b"\x5d" * writes[-1][1]
        await agent.disable(task)
        return runs

    await vm.write(v0, 0, 3 * MIB, 0x01)
    await agent.enable(task)
    await agent.disable(task)
    # snapshot, then active commit (pivot back to the base)
    writes = [(2 * MIB, 4 * KIB), (7 * MIB + 1, 100 * KIB)]
    assert await cycle(writes, lambda: chainops.snapshot(vm, [v0], files)) == expected_runs(
        writes, size
    )
    writes = [(4 * MIB, 64 * KIB), (11 * MIB, 64 * KIB)]
    assert await cycle(writes, lambda: chainops.commit_active(vm, v0)) == expected_runs(
        writes, size
    )
    assert len(chainops.chain_files(vm, v0)) == 1
    # two snapshots, then an inactive commit of the middle layer
    await asyncio.to_thread(chainops.snapshot, vm, [v0], files)
    writes = [(1 * MIB, 64 * KIB), (12 * MIB, 64 * KIB)]
    assert await cycle(writes, lambda: chainops.snapshot(vm, [v0], files)) == expected_runs(
        writes, size
    )
    writes = [(5 * MIB, 512), (13 * MIB, 512)]
    assert await cycle(writes, lambda: chainops.commit_inactive(vm, v0)) == expected_runs(
        writes, size
    )
    assert len(chainops.chain_files(vm, v0)) == 2
    # stream the backing into the top: the stream's own copying may show as changed, the
    # writes must
    writes = [(6 * MIB, 64 * KIB), (14 * MIB, 64 * KIB)]
    runs = await cycle(writes, lambda: chainops.stream(vm, v0))
    assert set(expected_runs(writes, size)) <= set(runs)
    assert len(chainops.chain_files(vm, v0)) == 1
    # copy to new storage with pivot (a storage migration)
    writes = [(8 * MIB, 64 * KIB), (15 * MIB, 64 * KIB)]
    runs = await cycle(writes, lambda: chainops.copy(vm, v0, files / "copy.qcow2"))
    assert set(expected_runs(writes, size)) <= set(runs)
    assert chainops.chain_files(vm, v0) == [files / "copy.qcow2"]
    # and after all that, a plain increment is exact again
    await vm.write(v0, 10 * MIB, 10, 0x77)
    info = (await agent.enable(task))[0]
    assert dirty_runs(info) == [(10 * MIB, G)]
    await agent.disable(task)


# ---- chains changed where libvirt cannot help -------------------------------------------------


async def test_snapshot_behind_libvirts_back_is_full_for_that_disk_only(
    vm_factory: Callable[..., stack.TestVm],
    make_agent: Callable[..., Awaitable[Agent]],
    tmp_path: Path,
) -> None:
    vm = vm_factory(disks_mib=[16, 16])
    (v0, path0, _), (v1, _, size1) = vm.volumes
    agent = await make_agent()
    task = await agent.create(vm)
    first = (await agent.enable(task))[0]["bitmapName"]
    await agent.disable(task)
    await vm.write(v0, 2 * MIB, 4096, 0x21)
    await vm.write(v1, 3 * MIB, 4096, 0x22)
    overlay = tmp_path / "behind.qcow2"
    vm.qmp(
        "blockdev-snapshot-sync",
        {
            "node-name": vm.node_name(v0),
            "snapshot-file": str(overlay),
            "snapshot-node-name": "behind-top",
            "format": "qcow2",
        },
    )
    await vm.write(v0, 9 * MIB, 4096, 0x23)
    infos = by_volume(await agent.enable(task))
    assert infos[v0]["mode"] == "full"
    assert infos[v0]["reason"] == FULL_NEW_TOP.format(old=path0, new=overlay, bitmap=first)
    assert infos[v1]["mode"] == "incremental"
    assert dirty_runs(infos[v1]) == expected_runs([(3 * MIB, 4096)], size1)
    second = infos[v0]["bitmapName"]
    assert read_export(infos[v0], 2 * MIB, 4096) == b"\x21" * 4096
    await agent.disable(task)
    # tracking goes on on the new top: the next one is exact
    await vm.write(v0, 11 * MIB, 4096, 0x24)
    infos = by_volume(await agent.enable(task))
    assert infos[v0]["mode"] == "incremental" and infos[v0]["sinceBitmapName"] == second
    assert dirty_runs(infos[v0]) == [(11 * MIB, G)]
    await agent.disable(task)
    # since the first checkpoint: the new top's writes before `second` were never tracked
    infos = by_volume(await agent.enable(task, since=first))
    assert infos[v0]["mode"] == "full"
    assert infos[v0]["reason"] == FULL_BROKEN.format(
        name=second, why=FULL_NEW_TOP.format(old=path0, new=overlay, bitmap=first)
    )
    assert infos[v1]["mode"] == "incremental"
    await agent.disable(task)


async def test_offline_snapshot_with_qemu_img_is_full_for_that_disk_only(
    vm_factory: Callable[..., stack.TestVm],
    make_agent: Callable[..., Awaitable[Agent]],
    tmp_path: Path,
) -> None:
    vm = vm_factory(disks_mib=[16, 16])
    (v0, path0, _), (v1, _, _) = vm.volumes
    agent = await make_agent()
    task = await agent.create(vm)
    first = (await agent.enable(task))[0]["bitmapName"]
    await agent.disable(task)
    await vm.write(v0, 1 * MIB, 512, 0x31)
    await vm.write(v1, 2 * MIB, 512, 0x32)
    await asyncio.to_thread(vm.shutdown)  # clean: bitmaps saved in the qcow2 files
    overlay = tmp_path / "offline.qcow2"
    await asyncio.to_thread(chainops.offline_snapshot, vm, v0, overlay)
    await asyncio.to_thread(vm.start)
    await vm.write(v0, 3 * MIB, 512, 0x33)
    infos = by_volume(await agent.enable(task))
    assert infos[v0]["mode"] == "full"
    assert infos[v0]["reason"] == FULL_NEW_TOP.format(old=path0, new=overlay, bitmap=first)
    assert infos[v1]["mode"] == "incremental"
    assert dirty_runs(infos[v1]) == [(2 * MIB, G)]
    assert read_export(infos[v0], 1 * MIB, 512) == b"\x31" * 512
    assert read_export(infos[v0], 3 * MIB, 512) == b"\x33" * 512
    await agent.disable(task)


async def test_a_block_job_at_enable_is_refused_naming_it(
    vm_factory: Callable[..., stack.TestVm],
    make_agent: Callable[..., Awaitable[Agent]],
    tmp_path: Path,
) -> None:
    vm = vm_factory(disks_mib=[16])
    v0 = vm.volumes[0].volume_uuid
    agent = await make_agent()
    task = await agent.create(vm)
    await agent.enable(task)
    await agent.disable(task)
    await vm.write(v0, 0, 8 * MIB, 0x41)
    await asyncio.to_thread(chainops.snapshot, vm, [v0], tmp_path / "snaps")
    # a stream held at 1 byte/s never finishes by itself
    chainops.virsh("blockpull", vm.vm_uuid, "vda", "--bandwidth", "1", "--bytes")
    jobs = vm.qmp("query-block-jobs")
    assert len(jobs) == 1
    with pytest.raises(CbtError) as err:
        await agent.enable(task)
    assert err.value.message == (
        f"VM [uuid: {vm.vm_uuid}] has a block job running (stream job {jobs[0]['device']}): "
        "retry when it has ended"
    )
    t = await agent.store.run(SyncStore.require_task, task)
    assert t.status is TaskStatus.FAILED
    assert vm.qmp("query-block-exports") == []
    chainops.virsh("blockjob", vm.vm_uuid, "vda", "--abort")
    await vm.write(v0, 9 * MIB, 512, 0x42)
    info = (await agent.enable(task))[0]
    assert info["mode"] == "incremental"
    assert dirty_runs(info) == [(0, 8 * MIB), (9 * MIB, G)]
    await agent.disable(task)


# ---- uncertain outcomes -----------------------------------------------------------------------


class LoseReplyOnce:
    """Every QMP channel the agent gets is real, but the reply to the first `command` is lost:
    QEMU runs the command, the agent gets QmpInterrupted (as on a timeout or a dropped
    connection)."""

    def __init__(self, agent: Agent, command: str) -> None:
        self.command = command
        self.fired = False
        real = agent.router.channel

        async def channel(vm_uuid: str) -> QmpChannel:
            return _Lossy(await real(vm_uuid), self)

        agent.router.channel = channel  # type: ignore[method-assign]


class _Lossy:
    def __init__(self, inner: QmpChannel, owner: LoseReplyOnce) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.owner = owner

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        result = await self.inner.execute(command, arguments)
        if command == self.owner.command and not self.owner.fired:
            self.owner.fired = True
            raise QmpInterrupted(f"QMP {command}: reply lost (injected)")
        return result

    async def execute_with_fd(
        self, command: str, arguments: Mapping[str, object] | None, fd: int
    ) -> Any:
        return await self.inner.execute_with_fd(command, arguments, fd)

    async def close(self) -> None:
        await self.inner.close()


async def test_lost_transaction_reply_keeps_the_checkpoint(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[16, 16])
    (v0, _, _), (v1, _, _) = vm.volumes
    agent = await make_agent()
    task = await agent.create(vm)
    first = (await agent.enable(task))[0]["bitmapName"]
    await agent.disable(task)
    await vm.write(v0, 1 * MIB, 512, 0x51)
    lost = LoseReplyOnce(agent, "transaction")
    with pytest.raises(QmpInterrupted):
        await agent.enable(task)
    assert lost.fired
    # QEMU ran it: the new checkpoint records on both disks and stays in the chain
    second = checkpoint_name(task, 2)
    names = [c.name for c in await agent.store.run(SyncStore.checkpoints, task)]
    assert names == [first, second]
    assert vm.qmp("query-block-exports") == [] and vm.qmp("query-jobs") == []
    await vm.write(v0, 2 * MIB, 512, 0x52)
    await vm.write(v1, 3 * MIB, 512, 0x53)
    infos = by_volume(await agent.enable(task))  # default base: the one handed out
    assert infos[v0]["sinceBitmapName"] == first
    assert dirty_runs(infos[v0]) == [(1 * MIB, G), (2 * MIB, G)]
    assert dirty_runs(infos[v1]) == [(3 * MIB, G)]
    await agent.disable(task)


async def test_unknown_checkpoint_bitmap_on_the_disks_is_adopted(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    """As if an Enable's transaction ran but the database forgot it (reply lost and the agent
    killed before it could read back): the bitmap records on, the next Enable merges it."""
    vm = vm_factory(disks_mib=[16])
    v0 = vm.volumes[0].volume_uuid
    agent = await make_agent()
    task = await agent.create(vm)
    first = (await agent.enable(task))[0]["bitmapName"]
    await agent.disable(task)
    await vm.write(v0, 1 * MIB, 512, 0x61)
    lost = checkpoint_name(task, 7)
    node = vm.node_name(v0)
    # the lost Enable froze nothing here (say its previous one was already frozen): both record
    vm.qmp("block-dirty-bitmap-add", {"node": node, "name": lost, "persistent": True})
    await vm.write(v0, 2 * MIB, 512, 0x62)
    info = (await agent.enable(task))[0]
    assert info["mode"] == "incremental" and info["sinceBitmapName"] == first
    assert dirty_runs(info) == [(1 * MIB, G), (2 * MIB, G)]
    assert info["bitmapName"] == checkpoint_name(task, 8)  # seqs are never reused
    # the export runs: read the disk's format node itself (query-block shows the filter)
    recording = [
        b["name"]
        for n in vm.qmp("query-named-block-nodes", {"flat": True})
        if n["node-name"] == node
        for b in n.get("dirty-bitmaps", [])
        if b.get("recording")
    ]
    assert recording == [checkpoint_name(task, 8)]  # the adopted one is frozen too
    rows = await agent.store.run(SyncStore.history_rows, task)
    assert rows[-1]["reason"].endswith(f"; adopted checkpoint {lost} found on the disks")
    await agent.disable(task)
    await vm.write(v0, 3 * MIB, 512, 0x63)
    info = (await agent.enable(task, since=lost))[0]  # adopted: usable when asked for by name
    assert dirty_runs(info) == [(2 * MIB, G), (3 * MIB, G)]
    await agent.disable(task)


async def test_lost_reply_during_disable_is_settled_by_reading_back(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[16])
    agent = await make_agent()
    task = await agent.create(vm)
    await agent.enable(task)
    lost = LoseReplyOnce(agent, "qom-set")  # the device back onto its disk
    await agent.disable(task)
    assert lost.fired
    assert vm.qmp("query-block-exports") == [] and vm.qmp("query-jobs") == []
    assert os_listdir(agent.config.scratch_dir) == []
    t = await agent.store.run(SyncStore.require_task, task)
    assert t.status is TaskStatus.STOPPED


def os_listdir(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


async def test_default_base_skips_a_checkpoint_kept_after_a_failed_enable(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[16])
    v0 = vm.volumes[0].volume_uuid
    fail: list[str] = []

    async def hook(name: str) -> None:
        if name in fail:
            raise RuntimeError(f"injected at {name}")

    agent = await make_agent(step=hook)
    task = await agent.create(vm)
    first = (await agent.enable(task))[0]["bitmapName"]
    await agent.disable(task)
    await vm.write(v0, 1 * MIB, 512, 0x71)
    fail.append("enable:exported")  # after the transaction: the checkpoint stays, unseen
    with pytest.raises(RuntimeError):
        await agent.enable(task)
    fail.clear()
    cps = await agent.store.run(SyncStore.checkpoints, task)
    assert [(c.name, c.handed_out) for c in cps] == [(first, True), (cps[1].name, False)]
    await vm.write(v0, 2 * MIB, 512, 0x72)
    info = (await agent.enable(task))[0]
    assert info["sinceBitmapName"] == first  # not the checkpoint nobody was given
    assert dirty_runs(info) == [(1 * MIB, G), (2 * MIB, G)]
    await agent.disable(task)


# ---- Delete ---------------------------------------------------------------------------------


async def test_delete_removes_bitmaps_from_every_layer(
    vm_factory: Callable[..., stack.TestVm],
    make_agent: Callable[..., Awaitable[Agent]],
    tmp_path: Path,
) -> None:
    running = vm_factory(disks_mib=[16, 16])
    stopped = vm_factory(disks_mib=[16])
    agent = await make_agent()
    for vm in (running, stopped):
        task = await agent.create(vm)
        await agent.enable(task)
        await agent.disable(task)
        await asyncio.to_thread(
            chainops.snapshot, vm, [v.volume_uuid for v in vm.volumes], tmp_path / vm.vm_uuid
        )
        await agent.enable(task)
        await agent.disable(task)
    assert len(task_bitmaps(running)) == 4  # two layers of two disks
    await asyncio.to_thread(stopped.shutdown)
    for vm in (running, stopped):
        t = await agent.store.run(SyncStore.task_for_vm, vm.vm_uuid)
        assert t is not None
        await agent.service.delete(validate.delete_task(t.uuid, False, None))
    assert task_bitmaps(running) == {}
    # the backing layers are read-only again
    ro = {n["node-name"]: n["ro"] for n in running.qmp("query-named-block-nodes", {"flat": True})}
    assert sorted(v for k, v in ro.items() if k.endswith("-format")) == [False, False, True, True]
    for path in chainops.chain_files(stopped, stopped.volumes[0].volume_uuid):
        info = await asyncio.to_thread(
            chainops._run, ["qemu-img", "info", "--output=json", str(path)], 30
        )
        assert '"bitmaps"' not in info, path
    assert await agent.store.run(SyncStore.list_tasks) == []


async def test_retention_removes_old_checkpoints_from_backing_layers_too(
    vm_factory: Callable[..., stack.TestVm],
    make_agent: Callable[..., Awaitable[Agent]],
    tmp_path: Path,
) -> None:
    vm = vm_factory(disks_mib=[16])
    v0, _, size = vm.volumes[0]
    agent = await make_agent(keep=2)
    task = await agent.create(vm)
    names = []
    for i in range(4):
        names.append((await agent.enable(task))[0]["bitmapName"])
        await agent.disable(task)
        await vm.write(v0, i * MIB, 512, 0x80 + i)
        await asyncio.to_thread(chainops.snapshot, vm, [v0], tmp_path / "snaps")
    # five layers; only the two newest checkpoints are left anywhere
    assert len(chainops.chain_files(vm, v0)) == 5
    left = {name for names_on in task_bitmaps(vm).values() for name in names_on}
    assert left == set(names[2:])
    ro = [n["ro"] for n in vm.qmp("query-named-block-nodes", {"flat": True})]
    assert ro.count(True) == 4  # the backing layers' format nodes are read-only again
    info = (await agent.enable(task, since=names[2]))[0]
    assert info["mode"] == "incremental"
    assert dirty_runs(info) == expected_runs([(2 * MIB, 512), (3 * MIB, 512)], size)
    await agent.disable(task)


async def test_an_interruption_seen_at_vm_start_is_never_spanned(
    vm_factory: Callable[..., stack.TestVm],
    make_agent: Callable[..., Awaitable[Agent]],
    tmp_path: Path,
) -> None:
    """qemu-img snapshot while the VM is off, start, writes on the untracked top, then a copy
    of the disk before the next Enable. The interruption is noted at the VM start (and at each
    cut) and recorded in the next checkpoint: no incremental of that disk ever spans it, even
    if a later chain operation left a top that holds older bitmaps (libvirt 9.0 carries only
    the bitmaps the top has through a copy or stream, but the rule does not rely on it)."""
    vm = vm_factory(disks_mib=[16, 16])
    (v0, path0, size0), (v1, _, _) = vm.volumes
    agent = await make_agent()
    task = await agent.create(vm)
    first = (await agent.enable(task))[0]["bitmapName"]
    await agent.disable(task)
    await vm.write(v0, 1 * MIB, 512, 0x91)
    await asyncio.to_thread(vm.shutdown)
    overlay = tmp_path / "offline.qcow2"
    await asyncio.to_thread(chainops.offline_snapshot, vm, v0, overlay)
    await asyncio.to_thread(vm.start)
    # libvirt tells the agent the VM started (the harness has no event subscription)
    await agent.service.on_vm_event(VmEvent(vm.vm_uuid, VmEventKind.STARTED, "2/0"))
    await vm.write(v0, 3 * MIB, 512, 0x92)  # on the untracked top
    pending = await agent.store.run(SyncStore.pending_breaks, task)
    assert list(pending) == [v0]
    await asyncio.to_thread(chainops.copy, vm, v0, tmp_path / "copy.qcow2")
    await vm.write(v1, 5 * MIB, 512, 0x93)
    infos = by_volume(await agent.enable(task))
    why = FULL_NEW_TOP.format(old=path0, new=overlay, bitmap=first) + " (seen at VM start)"
    assert (infos[v0]["mode"], infos[v0]["reason"]) == ("full", why)
    assert infos[v1]["mode"] == "incremental" and dirty_runs(infos[v1]) == [(5 * MIB, G)]
    assert read_export(infos[v0], 3 * MIB, 512) == b"\x92" * 512
    second = infos[v0]["bitmapName"]
    assert await agent.store.run(SyncStore.pending_breaks, task) == {}
    await agent.disable(task)
    await vm.write(v0, 7 * MIB, 512, 0x94)
    infos = by_volume(await agent.enable(task))
    assert dirty_runs(infos[v0]) == expected_runs([(7 * MIB, 512)], size0)  # exact again
    await agent.disable(task)
    infos = by_volume(await agent.enable(task, since=first))
    assert infos[v0]["reason"] == FULL_BROKEN.format(name=second, why=why)
    assert infos[v1]["mode"] == "incremental"
    await agent.disable(task)
