"""The pure Enable plan: names, the checkpoint transaction's actions, the change sets' merges
and the bitmaps to clear, decided from plain data (no QEMU, no SQLite)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cbt_agent.engine.plan import DiskView, Merge, StaleBitmap, plan_enable, refuse_untrackable
from cbt_agent.errors import OperationError
from cbt_agent.hypervisor.libvirt import DiskInfo
from cbt_agent.model import BitmapState, Checkpoint, Layer, checkpoint_name, temp_bitmap_name
from cbt_agent.qemu.blockdev import BlockDevice
from cbt_agent.qemu.fleece import access_node_name, filter_node_name
from cbt_agent.reasons import FULL_FIRST, TRACKING_LOST

TASK = "ab" * 16
V0, V1 = "10" * 16, "20" * 16
SIZE = 1 << 30
SCRATCH = Path("/state/scratch")
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def bm(name: str, recording: bool = True, **kw: bool | int) -> BitmapState:
    fields: dict[str, bool | int] = {
        "persistent": True,
        "inconsistent": False,
        "busy": False,
        "granularity": 65536,
        "count": 0,
    }
    fields.update(kw)
    return BitmapState(name, recording, **fields)  # type: ignore[arg-type]


def view(i: int, volume: str, *layers: Layer) -> DiskView:
    disk = DiskInfo(
        volume, f"virtio-disk{i}", f"vd{'ab'[i]}", i, f"/img/{volume}", "qcow2", "virtio"
    )
    top = layers[0]
    dev = BlockDevice(disk.alias, top.node, "qcow2", SIZE, top.filename)
    return DiskView(disk, dev, list(layers))


def layer(node: str, *bitmaps: BitmapState, filename: str | None = None) -> Layer:
    return Layer(node, filename or f"/img/{node}.qcow2", SIZE, {b.name: b for b in bitmaps})


def cp(seq: int, *volumes: str, handed_out: bool = True) -> Checkpoint:
    return Checkpoint(
        TASK,
        seq,
        checkpoint_name(TASK, seq),
        frozenset(volumes),
        T0,
        sizes=tuple((v, SIZE) for v in volumes),
        handed_out=handed_out,
    )


C1, C2, C3 = (checkpoint_name(TASK, s) for s in (1, 2, 3))


def test_first_enable_is_a_full_on_every_disk_with_names_qemu_accepts() -> None:
    views = [view(0, V0, layer("libvirt-2-format")), view(1, V1, layer("libvirt-1-format"))]
    plan = plan_enable(TASK, 1, views, [], scratch_dir=SCRATCH)

    assert plan.checkpoint == C1
    assert [(d.volume_uuid, d.mode, d.reason) for d in plan.disks] == [
        (V0, "full", FULL_FIRST),
        (V1, "full", FULL_FIRST),
    ]
    e0 = plan.exports[0]
    assert (e0.device_node, e0.checkpoint, e0.temp_bitmap, e0.phase) == (
        "libvirt-2-format",
        C1,
        None,
        "planned",
    )
    assert e0.scratch_path == str(SCRATCH / f"{TASK}-{V0}.qcow2")
    for e in plan.exports:
        # node names at most 31 characters; ids and node names start with a letter
        assert len(e.scratch_node) <= 31
        assert all(x[0].isalpha() for x in (e.scratch_node, e.job_id, e.export_id))
    assert len({e.scratch_node for e in plan.exports}) == 2
    # the filter node names derived from the volume uuid fit QEMU's limit too
    for e in plan.exports:
        for name in (filter_node_name(e.volume_uuid), access_node_name(e.volume_uuid)):
            assert len(name) <= 31 and name[0].isalpha()
    # per disk: add the new recording bitmap (the filters go in beside the transaction, with
    # the VM paused); nothing to freeze yet
    assert list(plan.actions) == [
        {
            "type": "block-dirty-bitmap-add",
            "data": {"node": "libvirt-2-format", "name": C1, "persistent": True},
        },
        {
            "type": "block-dirty-bitmap-add",
            "data": {"node": "libvirt-1-format", "name": C1, "persistent": True},
        },
    ]
    assert plan.merges == ()
    assert plan.stale == ()
    assert plan.volumes == [V0, V1] and plan.sizes == {V0: SIZE, V1: SIZE}
    assert plan.tops == {V0: "/img/libvirt-2-format.qcow2", V1: "/img/libvirt-1-format.qcow2"}
    assert not plan.clears_pending and plan.superseded == ()


def test_incremental_freezes_the_latest_and_merges_since_the_asked_checkpoint() -> None:
    top = layer("fmt", bm(C1, recording=False), bm(C2, granularity=131072))
    plan = plan_enable(
        TASK, 3, [view(0, V0, top)], [cp(1, V0), cp(2, V0)], scratch_dir=SCRATCH, since_name=C1
    )

    (disk,) = plan.disks
    assert (disk.mode, disk.since, disk.freeze) == ("incremental", C1, C2)
    (e,) = plan.exports
    assert e.temp_bitmap == temp_bitmap_name(TASK, 3)
    assert e.granularity == 131072  # the newest merged bitmap's
    assert [a["type"] for a in plan.actions] == [
        "block-dirty-bitmap-disable",
        "block-dirty-bitmap-add",
    ]
    assert plan.actions[0]["data"] == {"node": "fmt", "name": C2}
    assert plan.actions[1]["data"]["name"] == C3
    assert plan.merges == (Merge("fmt", e.temp_bitmap, 131072, (("fmt", C2), ("fmt", C1))),)


def test_default_base_is_the_latest_handed_out() -> None:
    top = layer("fmt", bm(C1, recording=False), bm(C2))
    checkpoints = [cp(1, V0), cp(2, V0, handed_out=False)]  # 2's Enable failed after the cut
    plan = plan_enable(TASK, 3, [view(0, V0, top)], checkpoints, scratch_dir=SCRATCH)

    assert plan.disks[0].since == C1
    assert plan.merges[0].sources == (("fmt", C2), ("fmt", C1))  # merged through, not a base


def test_changes_are_merged_over_every_layer_of_the_chain() -> None:
    # a snapshot after checkpoint 1: libvirt put an empty C1 on the overlay; the writes from
    # before it stay in the base's C1
    top = layer("overlay", bm(C1), filename="/img/overlay.qcow2")
    base = layer("base", bm(C1), filename="/img/base.qcow2")
    plan = plan_enable(TASK, 2, [view(0, V0, top, base)], [cp(1, V0)], scratch_dir=SCRATCH)

    assert plan.disks[0].mode == "incremental"
    assert plan.merges[0].node == "overlay"
    assert set(plan.merges[0].sources) == {("overlay", C1), ("base", C1)}
    assert plan.exports[0].device_node == "overlay"  # the new bitmap goes on the top


def test_an_adopted_checkpoint_still_recording_is_frozen_too() -> None:
    # checkpoint 2's transaction ran but its reply was lost and nothing froze it afterwards:
    # both 1 (the latest handed out) and 2 must stop recording, only 3 may record
    top = layer("fmt", bm(C1), bm(C2))
    checkpoints = [cp(1, V0), cp(2, V0, handed_out=False)]
    plan = plan_enable(TASK, 3, [view(0, V0, top)], checkpoints, scratch_dir=SCRATCH)

    frozen = [a["data"]["name"] for a in plan.actions if a["type"] == "block-dirty-bitmap-disable"]
    assert sorted(frozen) == [C1, C2]


def test_inconsistent_and_left_over_bitmaps_are_cleared_first() -> None:
    other_task = checkpoint_name("cd" * 16, 1)
    top = layer(
        "fmt",
        bm(C1, inconsistent=True),
        bm(temp_bitmap_name(TASK, 1), recording=False),  # left by an interrupted Enable
        bm(temp_bitmap_name(TASK, 2), recording=False, busy=True),  # exported: not ours to take
        bm(other_task, inconsistent=True),  # another task's
    )
    plan = plan_enable(TASK, 2, [view(0, V0, top)], [cp(1, V0)], scratch_dir=SCRATCH)

    assert plan.stale == (
        StaleBitmap("fmt", C1, "inconsistent"),
        StaleBitmap("fmt", temp_bitmap_name(TASK, 1), "left over"),
    )
    assert plan.disks[0].mode == "full"
    # never a disable of an inconsistent bitmap in the transaction (it would fail it whole)
    assert all(a["type"] != "block-dirty-bitmap-disable" for a in plan.actions)


def test_lost_tracking_makes_every_disk_full_and_starts_a_fresh_chain() -> None:
    views = [view(0, V0, layer("a", bm(C1, recording=False), bm(C2))), view(1, V1, layer("b"))]
    plan = plan_enable(
        TASK, 3, views, [cp(1, V0), cp(2, V0)], scratch_dir=SCRATCH, lost=TRACKING_LOST
    )

    assert [(d.mode, d.reason) for d in plan.disks] == [("full", TRACKING_LOST)] * 2
    assert plan.superseded == (C1, C2)
    assert plan.merges == ()
    assert plan.actions[0] == {
        "type": "block-dirty-bitmap-disable",
        "data": {"node": "a", "name": C2},
    }


def test_a_disk_added_since_is_full_the_others_incremental() -> None:
    views = [view(0, V0, layer("a", bm(C1))), view(1, V1, layer("b"))]
    plan = plan_enable(TASK, 2, views, [cp(1, V0)], scratch_dir=SCRATCH)

    assert [d.mode for d in plan.disks] == ["incremental", "full"]
    assert plan.disks[1].reason == f"disk was added after checkpoint {C1}"
    assert [m.sources for m in plan.merges] == [(("a", C1),)]
    assert [e.temp_bitmap is None for e in plan.exports] == [False, True]


def test_a_pending_break_is_recorded_in_the_checkpoint_and_cleared() -> None:
    why = "the disk's top image changed (seen at VM start)"
    views = [view(0, V0, layer("a", bm(C1)))]
    plan = plan_enable(TASK, 2, views, [cp(1, V0)], scratch_dir=SCRATCH, pending={V0: why})

    assert plan.disks[0].mode == "full" and plan.disks[0].reason == why
    assert plan.breaks == {V0: why}
    assert plan.clears_pending


def test_disks_that_cannot_hold_bitmaps_are_refused_by_name() -> None:
    good = view(0, V0, layer("a-top"))
    raw = view(1, V1, dataclasses.replace(layer("b-top"), driver="raw"))
    refuse_untrackable([good])  # a qcow2 v3 top: nothing to say
    with pytest.raises(OperationError) as caught:
        refuse_untrackable([good, raw])
    assert caught.value.message.startswith(
        f"disk {V1} (/img/b-top.qcow2) is a raw image: it cannot hold persistent dirty "
        "bitmaps, so its changes cannot be tracked."
    )
    v2 = view(0, V0, dataclasses.replace(layer("a-top"), compat="0.10"), layer("a-base"))
    with pytest.raises(OperationError, match=r"is a qcow2 v2 image \(compat=0\.10\).*amend"):
        refuse_untrackable([v2])
    # only the top takes new bitmaps: an old v2 backing file is no obstacle
    old_base = view(0, V0, layer("a-top"), dataclasses.replace(layer("a-b"), compat="0.10"))
    refuse_untrackable([old_base])
