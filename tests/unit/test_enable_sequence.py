"""Enable and Disable as command sequences over the fake QMP endpoint (a model of QEMU's block
layer behind a real QMP socket, the agent's own SocketQmp in front): what is sent in which
order, and the failure paths — a refused transaction, and a reply lost in the middle of it,
after which the agent reads QEMU's state back and keeps the checkpoint only if it ran."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fakeblock import FakeBlockLayer
from fakeqmp import FakeQmp

from cbt_agent.api import replies
from cbt_agent.config import Config, parse_config
from cbt_agent.dirtymap import DirtyMap
from cbt_agent.engine import checkpoints
from cbt_agent.engine.checkpoints import EnableContext
from cbt_agent.engine.exports import teardown_exports
from cbt_agent.errors import QmpCommandError, QmpInterrupted
from cbt_agent.hypervisor.libvirt import DiskInfo, VmInfo
from cbt_agent.model import checkpoint_name, temp_bitmap_name
from cbt_agent.qemu import nbd as nbdio
from cbt_agent.qemu.fleece import access_node_name, filter_node_name
from cbt_agent.qemu.qmp import QmpChannel, SocketQmp
from cbt_agent.reasons import FULL_FIRST
from cbt_agent.store import Store, SyncStore

VM, TASK = "0f" * 16, "ab" * 16
V0, V1 = "10" * 16, "20" * 16
NODES = {V0: "libvirt-2-format", V1: "libvirt-1-format"}
MIB = 1 << 20
C1, C2, C3 = (checkpoint_name(TASK, s) for s in (1, 2, 3))

FIRST_ENABLE = [
    "query-block-jobs",  # a commit/stream/copy running: refused; in one round trip with
    "query-block",  # the disks' top nodes
    "query-named-block-nodes",  # their chains and bitmaps
    "add-fd",  # the scratch file of disk 0, opened by the agent, handed to QEMU
    "add-fd",  # disk 1's; then every disk's nodes in one round trip:
    "blockdev-add",  # scratch of disk 0 (on /dev/fdset/N)
    "blockdev-add",  # its copy-before-write filter over the disk, into the scratch
    "blockdev-add",  # scratch of disk 1
    "blockdev-add",  # its filter
    "migrate-set-capabilities",  # bitmaps follow a live migration
    "query-status",  # a running VM is paused for the cut:
    "stop",
    "qom-set",  # disk 0's device onto its filter
    "qom-set",  # disk 1's
    "transaction",  # the bitmaps, at the same instant for both disks
    "cont",
    "blockdev-add",  # disk 0's snapshot-access node (what the export serves), in one round
    "blockdev-add",  # trip with disk 1's,
    "query-named-block-nodes",  # the new bitmaps' granularity (and the change sets, if any)
    "nbd-server-start",
    "block-export-add",  # both exports in one round trip
    "block-export-add",
]
TEARDOWN = [
    "block-export-del",  # both exports in one round trip (one gone already: "not found")
    "block-export-del",
    "query-block-exports",  # until QEMU let go of them
    "nbd-server-stop",
    # what is left, in one round trip:
    "query-jobs",  # an older agent's fleecing jobs: none
    "query-named-block-nodes",  # the nodes
    "query-block",  # which devices are on a filter
    "query-named-block-nodes",  # and what is under each filter now
    "query-fdsets",  # the task's descriptors in QEMU
    # then all of this in one round trip, in the order QEMU allows:
    "blockdev-del",  # disk 0's snapshot-access node
    "blockdev-del",  # disk 1's
    "qom-set",  # disk 0's device back onto its own node
    "qom-set",
    "blockdev-del",  # disk 0's filter, its scratch, then disk 1's
    "blockdev-del",
    "blockdev-del",
    "blockdev-del",
    "remove-fd",  # scratch of disk 0
    "remove-fd",  # scratch of disk 1
]


@dataclass
class Rig:
    fake: FakeQmp
    qemu: FakeBlockLayer
    config: Config
    store: Store
    vm: VmInfo
    channels: list[SocketQmp]

    async def channel(self) -> QmpChannel:
        chan = SocketQmp(VM, str(self.fake.path))
        await chan.connect()
        self.channels.append(chan)
        return chan

    async def context(self) -> EnableContext:
        return EnableContext(
            self.config, self.store, await self.channel(), self.vm, TASK, reconnect=self.channel
        )

    async def enable(self, since: str | None = None) -> list[dict[str, Any]]:
        """An Enable that reaches Running: its checkpoint is handed out."""
        volumes = await checkpoints.enable(await self.context(), since)
        await self.store.run(SyncStore.mark_handed_out, TASK, volumes[0].export.checkpoint)
        # what the API replies, in ZStack's JSON form
        infos: list[dict[str, Any]] = replies.enable_reply(volumes)["volumeCbtBackupInfos"]
        return infos

    async def disable(self) -> None:
        await teardown_exports(self.config, self.store, await self.channel(), TASK, force=False)

    def sent(self) -> list[str]:
        """The commands sent since the last call."""
        out = self.fake.commands()
        self.fake.received.clear()
        return out

    def bitmaps(self, volume: str) -> dict[str, bool]:
        """name -> recording, on the disk's top."""
        return {n: b.recording for n, b in self.qemu.bitmaps(NODES[volume]).items()}

    async def checkpoint_names(self) -> list[str]:
        return [c.name for c in await self.store.run(SyncStore.checkpoints, TASK)]

    def leftovers(self) -> dict[str, Any]:
        s = self.qemu.state
        return {
            "exports": sorted(s.exports),
            "jobs": sorted(s.jobs),
            "nodes": sorted(set(s.nodes) - set(NODES.values())),
            "nbd": s.nbd,
            "scratch": sorted(p.name for p in self.config.scratch_dir.glob("*")),
            "fdsets": sorted(s.fdsets.values()),
        }


CLEAN = {"exports": [], "jobs": [], "nodes": [], "nbd": None, "scratch": [], "fdsets": []}


@pytest.fixture
async def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    fake = FakeQmp(tmp_path / "qmp.sock")
    qemu = FakeBlockLayer()
    disks = []
    for i, volume in enumerate((V0, V1)):
        path = f"/img/{volume}.qcow2"
        qemu.add_disk(f"virtio-disk{i}", NODES[volume], path, 16 * MIB)
        disks.append(
            DiskInfo(volume, f"virtio-disk{i}", f"vd{'ab'[i]}", i, path, "qcow2", "virtio")
        )
    qemu.install(fake)
    await fake.start()
    config = parse_config(
        {
            "api": {"tokens": ["test-token-0123456789abcdef"]},
            "state": {"dir": str(tmp_path / "state")},
            "nbd": {"port_range": "11000:11009"},
        }
    )
    store = Store(config.db_path)
    await store.open()
    await store.run(SyncStore.create_task, TASK, "t", None, VM, [V0, V1])

    def touch(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")

    async def create_scratch(path: Path, size: int) -> None:  # no qemu-img in unit tests
        await asyncio.to_thread(touch, path)

    def no_reads(*_args: Any) -> DirtyMap:
        raise AssertionError("a full reads no dirty map")

    monkeypatch.setattr(checkpoints, "create_scratch", create_scratch)
    monkeypatch.setattr(nbdio, "read_dirty_map", no_reads)
    r = Rig(fake, qemu, config, store, VmInfo(VM, True, tuple(disks)), [])
    yield r
    for chan in r.channels:
        await chan.close()
    await store.close()
    await fake.close()


def one_dirty_cluster(*_args: Any) -> DirtyMap:
    return DirtyMap.from_runs([(0, 65536)])


async def test_first_enable_then_disable(rig: Rig) -> None:
    infos = await rig.enable()

    assert rig.sent() == FIRST_ENABLE
    assert [(i["mode"], i["reason"], i["bitmapName"]) for i in infos] == [
        ("full", FULL_FIRST, C1),
        ("full", FULL_FIRST, C1),
    ]
    assert rig.bitmaps(V0) == rig.bitmaps(V1) == {C1: True}
    assert "dirty-bitmaps" in rig.qemu.state.capabilities
    assert sorted(rig.qemu.state.exports) == [f"cbtexp-{V0}", f"cbtexp-{V1}"]
    assert {e.phase for e in await rig.store.run(SyncStore.exports, TASK)} == {"exported"}
    assert int(infos[0]["nbdPort"]) == 11000

    await rig.disable()
    assert rig.sent() == TEARDOWN
    assert rig.leftovers() == CLEAN
    assert rig.bitmaps(V0) == {C1: True}  # tracking goes on


async def test_incremental_freezes_merges_and_exports_the_change_set(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    await rig.enable()
    await rig.disable()
    rig.sent()
    monkeypatch.setattr(nbdio, "read_dirty_map", one_dirty_cluster)

    infos = await rig.enable()

    tmp = temp_bitmap_name(TASK, 2)
    sent = rig.fake.received
    transaction = next(a for c, a in sent if c == "transaction")["actions"]
    assert [(a["type"], a["data"].get("name")) for a in transaction] == [
        ("block-dirty-bitmap-disable", C1),
        ("block-dirty-bitmap-add", C2),
        ("block-dirty-bitmap-disable", C1),
        ("block-dirty-bitmap-add", C2),
    ]
    # the change set is made on each disk's snapshot-access node, from the disk's bitmaps
    merges = [a for c, a in sent if c == "block-dirty-bitmap-merge"]
    assert merges == [
        {"node": access_node_name(v), "target": tmp, "bitmaps": [{"node": NODES[v], "name": C1}]}
        for v in (V0, V1)
    ]
    exports = [a for c, a in sent if c == "block-export-add"]
    assert [(x["node-name"], x["bitmaps"], x["writable"]) for x in exports] == [
        (access_node_name(v), [{"node": access_node_name(v), "name": tmp}], True) for v in (V0, V1)
    ]
    assert [(i["mode"], i["sinceBitmapName"], i["changedBytes"]) for i in infos] == [
        ("incremental", C1, 65536)
    ] * 2
    assert rig.bitmaps(V0) == {C1: False, C2: True}  # nothing of the export's on the disk
    assert rig.qemu.bitmaps(access_node_name(V0)).keys() == {tmp}

    await rig.disable()
    assert rig.leftovers() == CLEAN
    assert rig.bitmaps(V0) == {C1: False, C2: True}  # the temporary bitmap went with the export


async def test_a_refused_transaction_leaves_nothing_and_the_chain_whole(rig: Rig) -> None:
    await rig.enable()
    await rig.disable()
    rig.fake.fail("transaction", "Bitmap 'x' is currently in use by another operation")

    with pytest.raises(QmpCommandError) as caught:
        await checkpoints.enable(await rig.context(), None)

    assert caught.value.command == "transaction"
    assert rig.leftovers() == CLEAN
    assert await rig.checkpoint_names() == [C1]  # never cut: forgotten
    assert rig.bitmaps(V0) == rig.bitmaps(V1) == {C1: True}  # still recording


async def test_a_reply_lost_after_the_transaction_ran_keeps_the_checkpoint(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    await rig.enable()
    await rig.disable()
    rig.sent()
    rig.fake.lose_reply("transaction", ran=True)
    ctx = await rig.context()
    connections = rig.fake.connections

    with pytest.raises(QmpInterrupted):
        await checkpoints.enable(ctx, None)

    sent = rig.sent()
    after = sent[sent.index("transaction") + 1 :]
    assert after == [
        # the VM was paused for the cut and the connection died with it: on a new connection
        # it runs again before anything else
        "query-status",
        "cont",
        "query-named-block-nodes",  # QEMU's state read back: did the transaction run?
        # then everything made is removed (no export yet): the server if one was left, an
        # older agent's fleecing jobs (none), each device back on its disk, the filters and
        # the scratch nodes, and the descriptors of the scratch files
        "block-export-del",  # none was made yet: both answer "not found"
        "block-export-del",
        "nbd-server-stop",
        "query-jobs",
        "query-named-block-nodes",
        "query-block",
        "query-named-block-nodes",
        "query-fdsets",
        "qom-set",
        "qom-set",
        "blockdev-del",
        "blockdev-del",
        "blockdev-del",
        "blockdev-del",
        "remove-fd",
        "remove-fd",
    ]
    assert rig.qemu.state.running and rig.qemu.state.pauses == 2
    assert rig.fake.connections == connections + 1  # on a new connection: the old one is gone
    assert rig.leftovers() == CLEAN
    # the transaction ran: C2 records, C1 is frozen; the checkpoint stays in the chain
    assert rig.bitmaps(V0) == rig.bitmaps(V1) == {C1: False, C2: True}
    assert await rig.checkpoint_names() == [C1, C2]

    # the next Enable counts from C1 (the latest handed out) and merges through C2: no write lost
    monkeypatch.setattr(nbdio, "read_dirty_map", one_dirty_cluster)
    infos = await rig.enable()
    assert [(i["mode"], i["sinceBitmapName"], i["bitmapName"]) for i in infos] == [
        ("incremental", C1, C3)
    ] * 2
    merges = [a["bitmaps"] for c, a in rig.fake.received if c == "block-dirty-bitmap-merge"]
    assert merges[0] == [{"node": NODES[V0], "name": C2}, {"node": NODES[V0], "name": C1}]
    assert rig.bitmaps(V0)[C2] is False and rig.bitmaps(V0)[C3] is True


async def test_a_connection_lost_before_the_transaction_ran_forgets_the_checkpoint(
    rig: Rig,
) -> None:
    await rig.enable()
    await rig.disable()
    rig.fake.lose_reply("transaction", ran=False)

    with pytest.raises(QmpInterrupted):
        await checkpoints.enable(await rig.context(), None)

    assert rig.leftovers() == CLEAN
    assert await rig.checkpoint_names() == [C1]
    assert rig.bitmaps(V0) == rig.bitmaps(V1) == {C1: True}  # C1 still records every write


async def test_disable_puts_the_device_on_whatever_the_filter_now_covers(rig: Rig) -> None:
    # a snapshot taken while exported: QEMU put the overlay under the filter, in place of the
    # disk's old top; Disable must not put the device back on the old top (the guest's writes
    # since would vanish from its view)
    await rig.enable()
    overlay = rig.qemu.add_disk("spare", "overlay-0", "/img/overlay-0.qcow2", 16 * MIB)
    del rig.qemu.state.devices["spare"]
    overlay.backing = NODES[V0]
    rig.qemu.state.nodes[filter_node_name(V0)].child = "overlay-0"

    await rig.disable()

    assert rig.qemu.state.devices == {"virtio-disk0": "overlay-0", "virtio-disk1": NODES[V1]}
    assert sorted(rig.qemu.state.nodes) == sorted([*NODES.values(), "overlay-0"])


async def test_a_refused_filter_swap_still_lets_the_vm_run_and_keeps_what_was_cut(
    rig: Rig,
) -> None:
    await rig.enable()
    await rig.disable()
    rig.sent()
    rig.fake.fail("qom-set", "Property 'drive' cannot be set")

    with pytest.raises(QmpCommandError) as caught:
        await checkpoints.enable(await rig.context(), None)

    assert caught.value.command == "qom-set"
    sent = rig.sent()
    # sent back to back: the VM's pause ends with the batch whatever failed inside it
    cut = sent.index("stop")
    assert sent[cut : cut + 5] == ["stop", "qom-set", "qom-set", "transaction", "cont"]
    assert rig.qemu.state.running
    # the transaction ran: its checkpoint stays in the chain (C1 frozen, C2 records)
    assert await rig.checkpoint_names() == [C1, C2]
    assert rig.bitmaps(V0) == rig.bitmaps(V1) == {C1: False, C2: True}
    rig.fake.on("qom-set", rig.qemu.qom_set)
    await rig.disable()
    assert rig.leftovers() == CLEAN
