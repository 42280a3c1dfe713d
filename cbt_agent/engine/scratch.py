"""The scratch an open export fills: its budget, the room for it, and the look that breaks an
export before the budget or the filesystem runs out.

While a disk is exported, the first guest write to each cluster copies the old data into the
disk's scratch file. The copy-before-write filter never fails a guest write for it (a failed or
slow copy breaks the export instead), but a scratch that fills its filesystem hurts everything
else on it. So each disk has a budget (`checkpoints.scratch_budget`, a share of its virtual size
by default), Enable refuses when the budgets do not fit in what the filesystem has free beyond
`checkpoints.scratch_reserve` (less what other open exports may still claim), and a watcher
looks every `checkpoints.scratch_poll` seconds and breaks the export cleanly when a disk is past
its budget or the filesystem is down to its reserve.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cbt_agent.config import CheckpointConfig
from cbt_agent.errors import OperationError
from cbt_agent.units import size


@dataclass(frozen=True)
class Room:
    """A filesystem's free and total bytes."""

    free: int
    total: int


def room(path: Path) -> Room:
    """statvfs of the filesystem holding `path` (blocking: run it in a thread)."""
    st = os.statvfs(path)
    return Room(free=st.f_bavail * st.f_frsize, total=st.f_blocks * st.f_frsize)


def used(path: str) -> int:
    """Bytes a scratch file takes on its filesystem (0 when it is gone). Blocking."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def budgets(cfg: CheckpointConfig, sizes: Iterable[int]) -> list[int]:
    """Each disk's scratch budget, for disks of these virtual sizes."""
    return [max(cfg.scratch_budget.of(size), 1) for size in sizes]


def reserve(cfg: CheckpointConfig, fs: Room) -> int:
    return cfg.scratch_reserve.of(fs.total)


def refuse_unless_room(
    cfg: CheckpointConfig,
    directory: Path,
    fs: Room,
    need: Sequence[int],
    claimed: int,
) -> None:
    """OperationError when budgets `need` do not fit in the free space beyond the reserve, less
    `claimed` (what other open exports may still add to their scratch)."""
    keep = reserve(cfg, fs)
    left = fs.free - keep - claimed
    if sum(need) > left:
        raise OperationError(
            f"not enough room for the scratch in {directory}: the disks' budget is "
            f"{size(sum(need))} (checkpoints.scratch_budget = {cfg.scratch_budget}), "
            f"{size(fs.free)} is free, {size(keep)} is kept free "
            f"(checkpoints.scratch_reserve = {cfg.scratch_reserve})"
            + (f" and open exports may still claim {size(claimed)}" if claimed else "")
            + ": free space there or lower the budget"
        )


@dataclass(frozen=True)
class DiskScratch:
    volume_uuid: str
    path: str
    budget: int


def why_break(
    cfg: CheckpointConfig, disks: Sequence[DiskScratch], use: Sequence[int], fs: Room
) -> str | None:
    """Why an open export must break now (None: it may go on): a disk past its budget, or
    the scratch filesystem down to its reserve (or full: then the filter has already broken
    the export, and its reads fail)."""
    for disk, n in zip(disks, use, strict=True):
        if n > disk.budget:
            return (
                f"scratch of volume {disk.volume_uuid} reached {size(n)}, over its budget of "
                f"{size(disk.budget)} (checkpoints.scratch_budget = {cfg.scratch_budget})"
            )
    keep = reserve(cfg, fs)
    if fs.free <= keep:
        full = "full" if fs.free < 1 << 20 else "nearly full"
        return (
            f"scratch filesystem {full}: {size(fs.free)} free of {size(fs.total)}, "
            f"{size(keep)} must stay free (checkpoints.scratch_reserve = {cfg.scratch_reserve})"
        )
    return None
