"""The watcher of open exports' scratch: one asyncio task for every task with exports, looking
every `checkpoints.scratch_poll` seconds at each disk's scratch file and at the filesystem, and
calling `on_break(task_uuid, reason)` once when a task's export must end (`scratch.why_break`).
The files are looked at in one thread hop per look (a stat per scratch file, one statvfs): a
host with a hundred open exports costs the agent one wake-up a poll, not a hundred.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from cbt_agent.config import Config
from cbt_agent.engine import scratch
from cbt_agent.engine.scratch import DiskScratch, Room
from cbt_agent.store import VolumeExport

log = logging.getLogger(__name__)

OnBreak = Callable[[str, str], Awaitable[None]]


def existing(path: Path) -> Path:
    """`path` or its nearest existing parent (a statvfs needs something that exists)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class ScratchWatch:
    def __init__(self, config: Config, on_break: OnBreak) -> None:
        self.config = config
        self.on_break = on_break
        self.disks: dict[str, list[DiskScratch]] = {}  # task -> its exported disks
        self.use: dict[str, list[int]] = {}  # task -> bytes each disk's scratch takes now
        self._broken: set[str] = set()  # tasks whose break was called (looked at no more)
        self._loop_task: asyncio.Task[None] | None = None
        self._breaks: set[asyncio.Task[None]] = set()

    def disks_of(self, exports: list[VolumeExport]) -> list[DiskScratch]:
        budgets = scratch.budgets(self.config.checkpoints, (e.size for e in exports))
        return [
            DiskScratch(e.volume_uuid, e.scratch_path, b)
            for e, b in zip(exports, budgets, strict=True)
        ]

    def claimed(self, *, besides: str) -> int:
        """What the other watched exports may still add to their scratch."""
        return sum(
            max(d.budget - n, 0)
            for task, disks in self.disks.items()
            if task != besides
            for d, n in zip(disks, self.use.get(task, [0] * len(disks)), strict=True)
        )

    async def room(self) -> Room:
        return await asyncio.to_thread(scratch.room, existing(self.config.scratch_dir))

    def start(self, task_uuid: str, exports: list[VolumeExport]) -> None:
        """Watch the task's exports (replacing an earlier watch of it)."""
        self.stop(task_uuid)
        self.disks[task_uuid] = self.disks_of(exports)
        self.use[task_uuid] = [0] * len(exports)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._loop(), name="scratch-watch")

    def stop(self, task_uuid: str) -> None:
        """Stop watching the task (its break, if running, goes on)."""
        self.disks.pop(task_uuid, None)
        self.use.pop(task_uuid, None)
        self._broken.discard(task_uuid)

    async def close(self) -> None:
        tasks = [t for t in (self._loop_task, *self._breaks) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._loop_task = None
        self._breaks.clear()

    def totals(self) -> tuple[int, int]:
        """(bytes used, bytes of budget) over every watched export."""
        used = sum(sum(u) for u in self.use.values())
        budget = sum(d.budget for disks in self.disks.values() for d in disks)
        return used, budget

    async def look_all(self) -> dict[str, str]:
        """One look at every watched task: the use is recorded; the tasks that must break now,
        with why (those already broken are left out)."""
        watched = {t: d for t, d in self.disks.items() if t not in self._broken}
        if not watched:
            return {}
        where = existing(self.config.scratch_dir)

        def measure() -> tuple[dict[str, list[int]], Room]:
            use = {t: [scratch.used(d.path) for d in disks] for t, disks in watched.items()}
            return use, scratch.room(where)

        use, fs = await asyncio.to_thread(measure)
        out: dict[str, str] = {}
        for task_uuid, disks in watched.items():
            if task_uuid not in self.disks:  # stopped while the thread looked
                continue
            self.use[task_uuid] = use[task_uuid]
            why = scratch.why_break(self.config.checkpoints, disks, use[task_uuid], fs)
            if why is not None:
                out[task_uuid] = why
        return out

    async def _break(self, task_uuid: str, why: str) -> None:
        log.warning("task %s: export breaks: %s", task_uuid, why)
        try:
            await self.on_break(task_uuid, why)
        except Exception:
            # the export may be half ended: a Disable (or the next start) finishes it
            log.exception("task %s: breaking the export failed", task_uuid)

    async def _loop(self) -> None:
        poll = self.config.checkpoints.scratch_poll
        while self.disks:
            await asyncio.sleep(poll)
            try:
                broken = await self.look_all()
            except OSError as e:
                log.warning("cannot look at the scratch: %s", e)
                continue
            for task_uuid, why in broken.items():
                # once per export; each break on its own (it takes the VM's lock and tears
                # the export down), the others still watched meanwhile
                self._broken.add(task_uuid)
                task = asyncio.create_task(self._break(task_uuid, why), name=f"break-{task_uuid}")
                self._breaks.add(task)
                task.add_done_callback(self._breaks.discard)
