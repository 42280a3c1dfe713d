"""The scratch's rules without QEMU: budgets, the room check before Enable, why an open export
breaks, the watcher that calls the break once, and what `cbt-agent status` shows of it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import pytest

from cbt_agent.api import replies
from cbt_agent.config import CheckpointConfig, ConfigError, Share, parse_config
from cbt_agent.engine import scratch
from cbt_agent.engine.results import VolumeBackup
from cbt_agent.engine.scratch import DiskScratch, Room
from cbt_agent.engine.watch import ScratchWatch
from cbt_agent.errors import OperationError
from cbt_agent.hypervisor.libvirt import DiskInfo
from cbt_agent.ops.status import summaries, to_json
from cbt_agent.store import NbdServer, SyncStore, VolumeExport

MIB = 1 << 20
GIB = 1 << 30
TASK, VM, VOL = "ab" * 16, "0f" * 16, "10" * 16
TOKEN = "scratch-test-token-0123"


def config(tmp_path: Path, **checkpoints: object) -> object:
    return parse_config(
        {
            "api": {"tokens": [TOKEN]},
            "state": {"dir": str(tmp_path / "state")},
            "checkpoints": checkpoints,
        }
    )


def test_budget_and_reserve_read_as_shares_or_sizes(tmp_path: Path) -> None:
    cfg = config(tmp_path, scratch_budget="10%", scratch_reserve="512M").checkpoints  # type: ignore[attr-defined]
    assert (cfg.scratch_budget, cfg.scratch_reserve) == (Share(fraction=0.1), Share(size=512 * MIB))
    assert scratch.budgets(cfg, [20 * GIB, 1 * GIB]) == [2 * GIB, GIB // 10]
    default = CheckpointConfig()
    assert scratch.budgets(default, [64 * MIB]) == [16 * MIB]
    assert (str(default.scratch_budget), str(default.scratch_reserve)) == ("25%", "5%")
    with pytest.raises(ConfigError) as caught:
        config(tmp_path, scratch_budget="lots")
    assert caught.value.field == "checkpoints.scratch_budget"


def test_an_enable_whose_budgets_do_not_fit_is_refused_saying_what_to_do() -> None:
    cfg = CheckpointConfig()  # 25 % of each disk, 5 % of the filesystem kept free
    fs = Room(free=10 * GIB, total=100 * GIB)
    scratch.refuse_unless_room(cfg, Path("/s"), fs, [2 * GIB, 3 * GIB], claimed=0)  # fits: 5 <= 5
    with pytest.raises(OperationError) as caught:
        scratch.refuse_unless_room(cfg, Path("/s"), fs, [2 * GIB, 3 * GIB], claimed=MIB)
    assert caught.value.message == (
        "not enough room for the scratch in /s: the disks' budget is 5 GiB "
        "(checkpoints.scratch_budget = 25%), 10 GiB is free, 5 GiB is kept free "
        "(checkpoints.scratch_reserve = 5%) and open exports may still claim 1 MiB: "
        "free space there or lower the budget"
    )


def test_an_export_breaks_past_its_budget_or_at_the_reserve_and_not_before() -> None:
    cfg = CheckpointConfig(scratch_budget=Share(size=4 * MIB), scratch_reserve=Share(size=MIB))
    disks = [DiskScratch("a" * 32, "/s/a", 4 * MIB), DiskScratch("b" * 32, "/s/b", 4 * MIB)]
    roomy = Room(free=100 * MIB, total=200 * MIB)
    assert scratch.why_break(cfg, disks, [4 * MIB, 0], roomy) is None
    assert scratch.why_break(cfg, disks, [0, 4 * MIB + 512], roomy) == (
        f"scratch of volume {'b' * 32} reached 4 MiB, over its budget of 4 MiB "
        "(checkpoints.scratch_budget = 4194304)"
    )
    low = Room(free=MIB, total=200 * MIB)
    assert scratch.why_break(cfg, disks, [0, 0], low) == (
        "scratch filesystem nearly full: 1 MiB free of 200 MiB, 1 MiB must stay free "
        "(checkpoints.scratch_reserve = 1048576)"
    )
    full = Room(free=4096, total=200 * MIB)
    assert (scratch.why_break(cfg, disks, [0, 0], full) or "").startswith(
        "scratch filesystem full: 4 KiB free"
    )


def export(tmp_path: Path, size: int = 64 * MIB) -> VolumeExport:
    return VolumeExport(
        TASK, VOL, "cbt-abababababab-000001", "libvirt-1-format", "cbtsc-x",
        str(tmp_path / "state" / "scratch" / f"{TASK}-{VOL}.qcow2"), "cbtjob-x", "cbtexp-x",
        None, "full", None, "first", size, 65536, "exported",
    )  # fmt: skip


async def test_the_watcher_breaks_once_when_the_scratch_passes_its_budget(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path, scratch_budget="1M", scratch_poll=0.05)
    breaks: list[tuple[str, str]] = []

    async def on_break(task: str, why: str) -> None:
        breaks.append((task, why))

    watch = ScratchWatch(cfg, on_break)  # type: ignore[arg-type]
    e = export(tmp_path)
    Path(e.scratch_path).parent.mkdir(parents=True)
    await asyncio.to_thread(Path(e.scratch_path).write_bytes, b"\x01" * (512 * 1024))
    watch.start(TASK, [e])
    await asyncio.sleep(0.2)
    assert breaks == [] and watch.totals() == (512 * 1024, MIB)
    assert watch.claimed(besides="other") == MIB - 512 * 1024

    await asyncio.to_thread(Path(e.scratch_path).write_bytes, b"\x01" * (2 * MIB))
    await asyncio.sleep(0.3)
    assert [t for t, _ in breaks] == [TASK]  # once, then the watch ends
    assert "over its budget of 1 MiB" in breaks[0][1]
    watch.stop(TASK)
    assert watch.totals() == (0, 0)
    await watch.close()


async def test_one_watcher_looks_at_every_task_and_a_break_leaves_the_others_watched(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path, scratch_budget="1M", scratch_poll=0.05)
    breaks: list[str] = []

    async def on_break(task: str, why: str) -> None:
        breaks.append(task)

    watch = ScratchWatch(cfg, on_break)  # type: ignore[arg-type]
    tasks = [f"{i:02x}" * 16 for i in range(20)]
    for i, task in enumerate(tasks):
        e = dataclasses.replace(
            export(tmp_path), task_uuid=task, scratch_path=str(tmp_path / f"s{i}.qcow2")
        )
        size = 2 * MIB if i == 3 else 4096
        await asyncio.to_thread(Path(e.scratch_path).write_bytes, b"\x01" * size)
        watch.start(task, [e])
    watchers = [t for t in asyncio.all_tasks() if t.get_name() == "scratch-watch"]
    assert len(watchers) == 1  # one loop for every task, not one each
    await asyncio.sleep(0.3)
    assert breaks == [tasks[3]]  # once
    assert watch.use[tasks[0]] == [4096] and watch.use[tasks[19]] == [4096]
    watch.stop(tasks[3])
    await asyncio.to_thread(Path(tmp_path / "s0.qcow2").write_bytes, b"\x01" * (2 * MIB))
    await asyncio.sleep(0.3)
    assert breaks == [tasks[3], tasks[0]]
    await watch.close()


def test_status_shows_an_open_exports_scratch_against_its_budget(tmp_path: Path) -> None:
    store = SyncStore(tmp_path / "db.sqlite")
    store.create_task(TASK, "nightly", None, VM, [VOL])
    e = export(tmp_path)
    Path(e.scratch_path).parent.mkdir(parents=True)
    with open(e.scratch_path, "wb") as f:
        f.write(b"\x02" * (3 * MIB))
        os.fsync(f.fileno())
    store.save_exports([e], "127.0.0.1", 10501)
    store.create_job("j" * 32, "EnableCbtTask", TASK)
    disk = DiskInfo(VOL, "virtio-disk0", "vda", 0, "/images/v.qcow2", "qcow2", "virtio")
    backup = VolumeBackup(
        disk, e, NbdServer("127.0.0.1", 10501), b"\x01", 65536, False, scratch_budget=16 * MIB
    )
    store.finish_job("j" * 32, result=replies.enable_reply([backup]))

    (row,) = summaries(store)
    assert row.scratch is not None and row.scratch[1] == 16 * MIB
    assert 3 * MIB <= row.scratch[0] < 4 * MIB
    assert to_json(row)["scratch"] == {"usedBytes": row.scratch[0], "budgetBytes": 16 * MIB}

    store.clear_exports(TASK)
    (row,) = summaries(store)
    assert row.scratch is None and to_json(row)["scratch"] is None
    store.close()


def test_the_replys_scratch_budget_is_in_metadata_and_absent_without_one(tmp_path: Path) -> None:
    disk = DiskInfo(VOL, "virtio-disk0", "vda", 0, "/images/v.qcow2", "qcow2", "virtio")
    server = NbdServer("127.0.0.1", 10501)
    e = export(tmp_path)
    with_budget = replies.backup_info(
        VolumeBackup(disk, e, server, b"\x01", 0, False, scratch_budget=MIB)
    ).wire()
    assert with_budget["scratchBudget"] == MIB
    assert '"scratchBudget":1048576' in with_budget["metadata"]
    offline = replies.backup_info(VolumeBackup(disk, e, server, b"\x01", 0, False)).wire()
    assert "scratchBudget" not in offline and "scratchBudget" not in offline["metadata"]
