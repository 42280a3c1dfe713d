"""The pure rules: transitions, full-vs-incremental planning, bitmap encoding, retention."""

from __future__ import annotations

import base64
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from cbt_agent.dirtymap import DirtyExtent, bitmap_from_extents, changed_bytes, full_bitmap
from cbt_agent.errors import OperationError
from cbt_agent.model import (
    BitmapState,
    Checkpoint,
    Layer,
    TaskStatus,
    check_transition,
    checkpoint_name,
    checkpoint_seq,
    found_checkpoints,
    plan_disk,
    retention_victims,
    temp_bitmap_name,
    tracking_break,
)
from cbt_agent.reasons import (
    FULL_BROKEN,
    FULL_INCONSISTENT,
    FULL_LAYER_SIZE,
    FULL_NEW_TOP,
    FULL_NONE_HANDED_OUT,
)

NOW = datetime(2026, 11, 27, tzinfo=UTC)
TASK = "ab" * 16
SIZE = 16 << 20


def cp(seq: int, volumes: set[str]) -> Checkpoint:
    return Checkpoint(TASK, seq, checkpoint_name(TASK, seq), frozenset(volumes), NOW)


def bm(name: str, *, recording: bool = False, inconsistent: bool = False) -> BitmapState:
    return BitmapState(name, recording, True, inconsistent, False, 65536, 0)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (TaskStatus.CREATED, TaskStatus.STARTING),
        (TaskStatus.STARTING, TaskStatus.RUNNING),
        (TaskStatus.RUNNING, TaskStatus.STOPPED),
        (TaskStatus.STOPPED, TaskStatus.STARTING),
        (TaskStatus.FAILED, TaskStatus.STARTING),
        (TaskStatus.RUNNING, TaskStatus.FAILED),
    ],
)
def test_allowed_transitions(old: TaskStatus, new: TaskStatus) -> None:
    check_transition(old, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (TaskStatus.CREATED, TaskStatus.RUNNING),
        (TaskStatus.RUNNING, TaskStatus.STARTING),
        (TaskStatus.STOPPED, TaskStatus.RUNNING),
        (TaskStatus.CREATED, TaskStatus.STOPPED),
    ],
)
def test_refused_transitions(old: TaskStatus, new: TaskStatus) -> None:
    with pytest.raises(OperationError, match=f"from {old} to {new}"):
        check_transition(old, new)


def top(bitmaps: dict[str, BitmapState], name: str = "/img/top.qcow2") -> list[Layer]:
    """A disk whose chain is one image."""
    return [Layer("top", name, SIZE, bitmaps)]


def test_first_enable_is_full_and_freezes_nothing() -> None:
    plan = plan_disk("v1", [], None, top({}))
    assert (plan.mode, plan.since, plan.merge, plan.freeze) == ("full", None, (), None)
    assert plan.reason is not None and "first checkpoint" in plan.reason


def test_incremental_since_latest_merges_only_latest() -> None:
    cps = [cp(1, {"v1"}), cp(2, {"v1"})]
    bitmaps = {cps[0].name: bm(cps[0].name), cps[1].name: bm(cps[1].name, recording=True)}
    plan = plan_disk("v1", cps, None, top(bitmaps))
    assert plan.mode == "incremental"
    assert plan.since == cps[1].name
    assert plan.merge == (("top", cps[1].name),)
    assert plan.freeze == cps[1].name


def test_incremental_since_older_checkpoint_merges_the_chain() -> None:
    cps = [cp(1, {"v1"}), cp(2, {"v1"}), cp(3, {"v1"})]
    bitmaps = {c.name: bm(c.name) for c in cps}
    bitmaps[cps[2].name] = bm(cps[2].name, recording=True)
    plan = plan_disk("v1", cps, cps[0].name, top(bitmaps))
    assert plan.merge == tuple(("top", c.name) for c in reversed(cps))
    assert plan.since == cps[0].name


def test_unknown_checkpoint_is_full_with_reason() -> None:
    cps = [cp(1, {"v1"})]
    plan = plan_disk("v1", cps, "nope", top({cps[0].name: bm(cps[0].name, recording=True)}))
    assert plan.mode == "full"
    assert plan.reason == "checkpoint nope is unknown to this task"
    assert plan.freeze == cps[0].name  # the chain still continues from the latest


def test_removed_checkpoint_is_full_with_retention_reason() -> None:
    cps = [cp(2, {"v1"})]
    plan = plan_disk("v1", cps, "old", top({cps[0].name: bm(cps[0].name)}), removed_names=["old"])
    assert plan.reason == "checkpoint old was removed by retention"


def test_missing_bitmap_is_full() -> None:
    cps = [cp(1, {"v1"}), cp(2, {"v1"})]
    plan = plan_disk("v1", cps, cps[0].name, top({cps[1].name: bm(cps[1].name, recording=True)}))
    assert plan.mode == "full"
    assert plan.reason == f"bitmap {cps[0].name} is missing on this disk (change tracking lost)"


def test_inconsistent_bitmap_is_full_and_not_frozen() -> None:
    cps = [cp(1, {"v1"})]
    plan = plan_disk("v1", cps, None, top({cps[0].name: bm(cps[0].name, inconsistent=True)}))
    assert plan.mode == "full"
    assert plan.reason is not None and "unclean shutdown" in plan.reason
    assert plan.freeze is None  # disabling an inconsistent bitmap fails the transaction


def test_disk_added_after_checkpoint_is_full() -> None:
    cps = [cp(1, {"v1"}), cp(2, {"v1", "v2"})]
    bitmaps = {cps[1].name: bm(cps[1].name, recording=True)}
    plan = plan_disk("v2", cps, cps[0].name, top(bitmaps))
    assert plan.mode == "full"
    assert plan.reason == f"disk was added after checkpoint {cps[0].name}"
    assert plan.freeze == cps[1].name


def test_resized_disk_is_full_with_both_sizes() -> None:
    c = Checkpoint(TASK, 1, checkpoint_name(TASK, 1), frozenset({"v1"}), NOW, (("v1", 1 << 20),))
    bitmaps = top({c.name: bm(c.name, recording=True)})
    plan = plan_disk("v1", [c], None, bitmaps, size=2 << 20)
    assert plan.mode == "full"
    assert plan.reason == f"disk was resized since checkpoint {c.name} (1048576 -> 2097152 bytes)"
    assert plan_disk("v1", [c], None, bitmaps, size=1 << 20).mode == "incremental"


# -- backing chains ----------------------------------------------------------------------------
# Names: c1..c5 are checkpoints in order; a layer "made during cJ" (a libvirt snapshot) holds an
# empty copy of cJ and every later one; the layer below keeps c1..cJ.


def chain_cps(n: int) -> list[Checkpoint]:
    return [cp(i, {"v1"}) for i in range(1, n + 1)]


def layer(node: str, cps: list[Checkpoint], *, size: int = SIZE, **states: bool) -> Layer:
    bitmaps = {c.name: bm(c.name, **states) for c in cps}
    return Layer(node, f"/img/{node}.qcow2", size, bitmaps)


def test_snapshot_merges_the_old_top_below_the_new_one() -> None:
    # c1, c2 on the base; a snapshot during c2 copied c2 onto the overlay; c3 cut later
    cps = chain_cps(3)
    chain = [layer("ov", cps[1:]), layer("base", cps[:2])]
    plan = plan_disk("v1", cps, cps[1].name, chain)
    assert plan.mode == "incremental"
    assert plan.merge == (("ov", cps[2].name), ("ov", cps[1].name), ("base", cps[1].name))
    since_first = plan_disk("v1", cps, cps[0].name, chain)
    assert since_first.merge == (
        ("ov", cps[2].name),
        ("ov", cps[1].name),
        ("base", cps[1].name),
        ("base", cps[0].name),
    )
    # since c3: the overlay alone holds everything (it existed before c3 was cut)
    assert plan_disk("v1", cps, cps[2].name, chain).merge == (("ov", cps[2].name),)


def test_the_issue_case_snapshot_right_after_a_checkpoint() -> None:
    # Enable (c1), write at 2 MiB, snapshot (overlay gets an empty c1), write at 9 MiB:
    # both layers' c1 make the change set
    cps = chain_cps(1)
    chain = [layer("ov", cps, recording=True), layer("base", cps, recording=True)]
    plan = plan_disk("v1", cps, None, chain)
    assert plan.merge == (("ov", cps[0].name), ("base", cps[0].name))
    assert plan.freeze == cps[0].name  # the copy on the top records: it is frozen


def test_three_layers_two_snapshots() -> None:
    cps = chain_cps(5)
    chain = [layer("l2", cps[3:]), layer("l1", cps[1:4]), layer("l0", cps[:2])]
    plan = plan_disk("v1", cps, cps[0].name, chain)
    assert plan.merge == (
        ("l2", cps[4].name),
        ("l2", cps[3].name),
        ("l1", cps[3].name),
        ("l1", cps[2].name),
        ("l1", cps[1].name),
        ("l0", cps[1].name),
        ("l0", cps[0].name),
    )


def test_a_top_without_the_latest_bitmap_is_full_naming_old_and_new_top() -> None:
    # a snapshot behind libvirt's back: the new top has none of the task's bitmaps
    c = Checkpoint(
        TASK, 1, checkpoint_name(TASK, 1), frozenset({"v1"}), NOW, tops=(("v1", "/img/a.qcow2"),)
    )
    chain = [Layer("new", "/img/b.qcow2", SIZE, {}), Layer("old", "/img/a.qcow2", SIZE, {})]
    chain[1] = Layer("old", "/img/a.qcow2", SIZE, {c.name: bm(c.name, recording=True)})
    plan = plan_disk("v1", [c], None, chain)
    assert plan.mode == "full" and plan.freeze is None
    assert plan.reason == (
        "the disk's top image changed from /img/a.qcow2 to /img/b.qcow2 without change "
        f"tracking (bitmap {c.name} is not on it: a snapshot or copy made outside libvirt, "
        "or offline)"
    )


def test_a_gap_in_a_backing_layer_is_full() -> None:
    # the overlay was made during c3 but the base lacks c3: writes of c3's time are untracked
    cps = chain_cps(3)
    chain = [layer("ov", cps[2:]), layer("base", cps[:2])]
    plan = plan_disk("v1", cps, cps[0].name, chain)
    assert plan.mode == "full"
    assert plan.reason == (
        f"bitmap {cps[2].name} is missing on backing image /img/base.qcow2: changes made while "
        "it was the top are not tracked"
    )
    # since c3 too: the overlay lacks c2, so it was made while c3 recorded, after c3's cut
    assert plan_disk("v1", cps, cps[2].name, chain).mode == "full"
    # an overlay that holds c2 was there before c3 was cut: since c3 it alone is enough
    chain = [layer("ov", cps[1:]), layer("base", cps[:1])]
    assert plan_disk("v1", cps, cps[2].name, chain).merge == (("ov", cps[2].name),)


def test_an_inconsistent_bitmap_on_any_needed_layer_is_full() -> None:
    cps = chain_cps(2)
    base = Layer(
        "base",
        "/img/base.qcow2",
        SIZE,
        {cps[0].name: bm(cps[0].name, inconsistent=True), cps[1].name: bm(cps[1].name)},
    )
    chain = [layer("ov", cps[1:]), base]
    assert plan_disk("v1", cps, cps[1].name, chain).mode == "incremental"
    plan = plan_disk("v1", cps, cps[0].name, chain)
    assert plan.reason == FULL_INCONSISTENT.format(bitmap=cps[0].name)


def test_a_backing_layer_of_another_size_is_full() -> None:
    cps = chain_cps(2)
    chain = [layer("ov", cps[1:]), layer("base", cps, size=SIZE // 2)]
    plan = plan_disk("v1", cps, cps[0].name, chain)
    assert plan.reason == FULL_LAYER_SIZE.format(image="/img/base.qcow2", old=SIZE // 2, new=SIZE)


def test_default_base_is_the_latest_checkpoint_handed_out() -> None:
    # c2's Enable failed after its transaction ran: c2 stays in the chain, c1 is the base
    cps = [cp(1, {"v1"}), replace(cp(2, {"v1"}), handed_out=False)]
    chain = top({cps[0].name: bm(cps[0].name), cps[1].name: bm(cps[1].name, recording=True)})
    plan = plan_disk("v1", cps, None, chain)
    assert plan.since == cps[0].name
    assert plan.merge == (("top", cps[1].name), ("top", cps[0].name))
    only_failed = plan_disk("v1", cps[1:], None, top({cps[1].name: bm(cps[1].name)}))
    assert (only_failed.mode, only_failed.reason) == ("full", FULL_NONE_HANDED_OUT)


def test_checkpoint_seq_parses_only_this_tasks_checkpoints() -> None:
    assert checkpoint_seq(TASK, checkpoint_name(TASK, 7)) == 7
    assert checkpoint_seq(TASK, temp_bitmap_name(TASK, 7)) is None
    assert checkpoint_seq(TASK, checkpoint_name("cd" * 16, 7)) is None
    assert checkpoint_seq(TASK, checkpoint_name(TASK, 7) + "x") is None


def test_bitmap_bits_are_lsb_first_per_cluster() -> None:
    g = 65536
    size = 20 * g + 100  # 21 clusters, the last one partial
    extents = [
        DirtyExtent(0, 1, True),
        DirtyExtent(9 * g + 5, g, True),
        DirtyExtent(20 * g, 1, True),
    ]
    bits = bitmap_from_extents(extents, size, g)
    assert bits == bytes([0b0000_0001, 0b0000_0110, 0b0001_0000])
    assert changed_bytes(extents, size, g) == 3 * g + 100


def test_bitmap_of_large_run_fills_whole_bytes() -> None:
    g = 65536
    size = 1 << 40  # 1 TiB: 16 Mi clusters; must not loop per cluster
    bits = bitmap_from_extents([DirtyExtent(3 * g, (1 << 30), True)], size, g)
    assert len(bits) == (size // g) // 8
    assert bits[0] == 0b1111_1000
    assert bits[1:2048] == b"\xff" * 2047
    assert bits[2048] == 0b0000_0111
    assert bits[2049:] == bytes(len(bits) - 2049)
    assert changed_bytes([DirtyExtent(3 * g, 1 << 30, True)], size, g) == 1 << 30


def test_full_bitmap_sets_exactly_every_cluster() -> None:
    bits = full_bitmap(10 * 65536 + 1, 65536)
    assert bits == bytes([0xFF, 0b0000_0111])
    assert base64.b64encode(full_bitmap(16 * 65536, 65536)) == b"//8="


def test_retention_removes_oldest_first() -> None:
    cps = [cp(i, {"v1"}) for i in range(1, 6)]
    assert [c.seq for c in retention_victims(cps, 2)] == [1, 2, 3]
    assert retention_victims(cps, 5) == []


def test_a_new_top_that_was_the_top_when_the_base_was_cut_needs_nothing_below() -> None:
    # c1 on the old top; a snapshot behind libvirt's back; c2 cut on the new top (a full):
    # since c2 the new top alone holds every change, although it never had c1
    c1 = replace(cp(1, {"v1"}), tops=(("v1", "/img/old.qcow2"),))
    c2 = replace(cp(2, {"v1"}), tops=(("v1", "/img/new.qcow2"),))
    chain = [
        Layer("new", "/img/new.qcow2", SIZE, {c2.name: bm(c2.name, recording=True)}),
        Layer("old", "/img/old.qcow2", SIZE, {c1.name: bm(c1.name, recording=True)}),
    ]
    assert plan_disk("v1", [c1, c2], None, chain).merge == (("new", c2.name),)
    # without the recorded top it cannot tell when the new top was made: a full, never a guess
    bare = [replace(c, tops=()) for c in (c1, c2)]
    assert plan_disk("v1", bare, None, chain).mode == "full"


def test_found_checkpoints_rebuild_the_chain_from_every_layer_of_every_disk() -> None:
    names = [checkpoint_name(TASK, i) for i in (1, 2, 3)]
    other = checkpoint_name("cd" * 16, 9)
    disks = {
        # a snapshot during c2: c1, c2 below, c2, c3 on the top
        "v1": [("/img/ov.qcow2", names[1:]), ("/img/base.qcow2", [*names[:2], other])],
        "v2": [("/img/v2.qcow2", [names[0], names[2], temp_bitmap_name(TASK, 3)])],
        "v3": [("/img/v3.qcow2", [])],  # no tracking of this task: not covered
    }
    found = found_checkpoints(TASK, disks, {"v1": SIZE, "v2": 2 * SIZE, "v3": SIZE}, NOW)
    assert [(c.seq, c.name, c.handed_out) for c in found] == [
        (1, names[0], False),
        (2, names[1], False),
        (3, names[2], False),
    ]
    assert {c.volumes for c in found} == {frozenset({"v1", "v2"})}
    assert found[0].sizes == (("v1", SIZE), ("v2", 2 * SIZE))
    # the latest sits on both tops: recorded, so a later swap of a top is named
    assert [c.tops for c in found] == [(), (), (("v1", "/img/ov.qcow2"), ("v2", "/img/v2.qcow2"))]
    # v2 lacks c2: since c1 it is a full naming the bitmap, v1 is exact over both layers
    chain_v2 = [
        Layer("v2", "/img/v2.qcow2", 2 * SIZE, {n: bm(n) for n in (names[0], names[2])}),
    ]
    assert plan_disk("v2", found, names[0], chain_v2, size=2 * SIZE).reason == (
        f"bitmap {names[1]} is missing on this disk (change tracking lost)"
    )
    chain_v1 = [
        Layer("ov", "/img/ov.qcow2", SIZE, {n: bm(n) for n in names[1:]}),
        Layer("base", "/img/base.qcow2", SIZE, {n: bm(n) for n in names[:2]}),
    ]
    plan = plan_disk("v1", found, names[0], chain_v1, size=SIZE)
    assert plan.mode == "incremental"
    # none was handed out here: without bitmapName a full that says what to pass
    assert plan_disk("v1", found, None, chain_v1).reason == FULL_NONE_HANDED_OUT


def test_an_interruption_recorded_in_a_checkpoint_is_never_spanned() -> None:
    cps = chain_cps(3)
    cps[1] = replace(cps[1], breaks=(("v1", "top changed"),))
    chain = [layer("top", cps)]
    assert plan_disk("v1", cps, cps[1].name, chain).mode == "incremental"  # from it: fine
    assert plan_disk("v1", cps, cps[2].name, chain).mode == "incremental"
    plan = plan_disk("v1", cps, cps[0].name, chain)
    assert plan.reason == FULL_BROKEN.format(name=cps[1].name, why="top changed")
    assert plan_disk("v2", cps, cps[0].name, chain).reason != plan.reason  # other disks: own
    # a pending one (seen at a VM start) makes the next Enable of that disk a full, whatever
    # the base
    plan = plan_disk("v1", cps, None, chain, pending_break="seen at start")
    assert (plan.mode, plan.reason) == ("full", "seen at start")


def test_tracking_break_is_a_top_without_the_latest_bitmap() -> None:
    c1 = replace(cp(1, {"v1"}), tops=(("v1", "/img/old.qcow2"),))
    tracked = [Layer("old", "/img/old.qcow2", SIZE, {c1.name: bm(c1.name, recording=True)})]
    assert tracking_break("v1", [c1], tracked) is None
    untracked = [Layer("new", "/img/new.qcow2", SIZE, {}), *tracked]
    assert tracking_break("v1", [c1], untracked) == FULL_NEW_TOP.format(
        old="/img/old.qcow2", new="/img/new.qcow2", bitmap=c1.name
    )
    # a libvirt snapshot copied the bitmap onto the new top: continuous
    copied = [Layer("new", "/img/new.qcow2", SIZE, {c1.name: bm(c1.name)}), *tracked]
    assert tracking_break("v1", [c1], copied) is None
    assert tracking_break("v2", [c1], untracked) is None  # not a disk of any checkpoint
