"""The pure rules: transitions, full-vs-incremental planning, bitmap encoding, retention."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from cbt_agent.errors import OperationError
from cbt_agent.model import (
    BitmapState,
    Checkpoint,
    DirtyExtent,
    TaskStatus,
    bitmap_from_extents,
    changed_bytes,
    check_transition,
    checkpoint_name,
    full_bitmap,
    plan_disk,
    retention_victims,
)

NOW = datetime(2026, 11, 27, tzinfo=UTC)
TASK = "ab" * 16


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


def test_first_enable_is_full_and_freezes_nothing() -> None:
    plan = plan_disk("v1", [], None, {})
    assert (plan.mode, plan.since, plan.merge, plan.freeze) == ("full", None, (), None)
    assert plan.reason is not None and "first checkpoint" in plan.reason


def test_incremental_since_latest_merges_only_latest() -> None:
    cps = [cp(1, {"v1"}), cp(2, {"v1"})]
    bitmaps = {cps[0].name: bm(cps[0].name), cps[1].name: bm(cps[1].name, recording=True)}
    plan = plan_disk("v1", cps, None, bitmaps)
    assert plan.mode == "incremental"
    assert plan.since == cps[1].name
    assert plan.merge == (cps[1].name,)
    assert plan.freeze == cps[1].name


def test_incremental_since_older_checkpoint_merges_the_chain() -> None:
    cps = [cp(1, {"v1"}), cp(2, {"v1"}), cp(3, {"v1"})]
    bitmaps = {c.name: bm(c.name) for c in cps}
    bitmaps[cps[2].name] = bm(cps[2].name, recording=True)
    plan = plan_disk("v1", cps, cps[0].name, bitmaps)
    assert plan.merge == (cps[0].name, cps[1].name, cps[2].name)
    assert plan.since == cps[0].name


def test_unknown_checkpoint_is_full_with_reason() -> None:
    cps = [cp(1, {"v1"})]
    plan = plan_disk("v1", cps, "nope", {cps[0].name: bm(cps[0].name, recording=True)})
    assert plan.mode == "full"
    assert plan.reason == "checkpoint nope is unknown to this task"
    assert plan.freeze == cps[0].name  # the chain still continues from the latest


def test_removed_checkpoint_is_full_with_retention_reason() -> None:
    cps = [cp(2, {"v1"})]
    plan = plan_disk("v1", cps, "old", {cps[0].name: bm(cps[0].name)}, removed_names=["old"])
    assert plan.reason == "checkpoint old was removed by retention"


def test_missing_bitmap_is_full() -> None:
    cps = [cp(1, {"v1"}), cp(2, {"v1"})]
    plan = plan_disk("v1", cps, cps[0].name, {cps[1].name: bm(cps[1].name, recording=True)})
    assert plan.mode == "full"
    assert plan.reason == f"bitmap {cps[0].name} is missing on this disk (change tracking lost)"


def test_inconsistent_bitmap_is_full_and_not_frozen() -> None:
    cps = [cp(1, {"v1"})]
    plan = plan_disk("v1", cps, None, {cps[0].name: bm(cps[0].name, inconsistent=True)})
    assert plan.mode == "full"
    assert plan.reason is not None and "unclean shutdown" in plan.reason
    assert plan.freeze is None  # disabling an inconsistent bitmap fails the transaction


def test_disk_added_after_checkpoint_is_full() -> None:
    cps = [cp(1, {"v1"}), cp(2, {"v1", "v2"})]
    bitmaps = {cps[1].name: bm(cps[1].name, recording=True)}
    plan = plan_disk("v2", cps, cps[0].name, bitmaps)
    assert plan.mode == "full"
    assert plan.reason == f"disk was added after checkpoint {cps[0].name}"
    assert plan.freeze == cps[1].name


def test_resized_disk_is_full_with_both_sizes() -> None:
    c = Checkpoint(TASK, 1, checkpoint_name(TASK, 1), frozenset({"v1"}), NOW, (("v1", 1 << 20),))
    bitmaps = {c.name: bm(c.name, recording=True)}
    plan = plan_disk("v1", [c], None, bitmaps, size=2 << 20)
    assert plan.mode == "full"
    assert plan.reason == f"disk was resized since checkpoint {c.name} (1048576 -> 2097152 bytes)"
    assert plan_disk("v1", [c], None, bitmaps, size=1 << 20).mode == "incremental"


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
