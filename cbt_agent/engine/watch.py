"""The watcher of open exports' scratch: one asyncio task per task with exports, looking every
`checkpoints.scratch_poll` seconds at each disk's scratch file and at the filesystem, and calling
`on_break(task_uuid, reason)` once when the export must end (`scratch.why_break`). The files are
looked at in a thread (a stat and a statvfs each time)."""

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
        self._tasks: dict[str, asyncio.Task[None]] = {}

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
        self._tasks[task_uuid] = asyncio.create_task(
            self._loop(task_uuid), name=f"scratch-watch-{task_uuid}"
        )

    def stop(self, task_uuid: str) -> None:
        """Stop watching (not from inside the watch itself: its break ends it)."""
        task = self._tasks.pop(task_uuid, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self.disks.pop(task_uuid, None)
        self.use.pop(task_uuid, None)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()

    def totals(self) -> tuple[int, int]:
        """(bytes used, bytes of budget) over every watched export."""
        used = sum(sum(u) for u in self.use.values())
        budget = sum(d.budget for disks in self.disks.values() for d in disks)
        return used, budget

    async def look(self, task_uuid: str) -> str | None:
        """One look: the use is recorded; the reason to break, if there is one."""
        disks = self.disks.get(task_uuid)
        if not disks:
            return None
        use = await asyncio.to_thread(lambda: [scratch.used(d.path) for d in disks])
        self.use[task_uuid] = use
        return scratch.why_break(self.config.checkpoints, disks, use, await self.room())

    async def _loop(self, task_uuid: str) -> None:
        poll = self.config.checkpoints.scratch_poll
        try:
            while task_uuid in self.disks:
                await asyncio.sleep(poll)
                try:
                    why = await self.look(task_uuid)
                except OSError as e:
                    log.warning("task %s: cannot look at the scratch: %s", task_uuid, e)
                    continue
                if why is not None:
                    log.warning("task %s: export breaks: %s", task_uuid, why)
                    try:
                        await self.on_break(task_uuid, why)
                    except Exception:
                        # the export may be half ended: a Disable (or the next start) finishes it
                        log.exception("task %s: breaking the export failed", task_uuid)
                    return
        finally:
            if self._tasks.get(task_uuid) is asyncio.current_task():
                self._tasks.pop(task_uuid, None)
