"""SQLite state through sqlite-utils: tasks, resource refs, checkpoints, export plans, status
transitions, api jobs, and the storage daemons of offline exports.

All access runs on one dedicated thread (`Store`'s executor): sqlite3 connections are not to be
shared across threads, and serialising writes there keeps every operation one transaction.
`SyncStore` is the same API without the thread, for the `status` command and for tests.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cbt_agent.store.daemons import DaemonExport, DaemonRows, StorageDaemon
from cbt_agent.store.jobs import JobRows
from cbt_agent.store.records import (
    ApiJob,
    NbdServer,
    ResourceRef,
    TaskChanges,
    TaskRow,
    VolumeExport,
    utcnow,
)
from cbt_agent.store.schema import SCHEMA_VERSION
from cbt_agent.store.tasks import TaskRows

if TYPE_CHECKING:
    from cbt_agent.metrics import Metrics

__all__ = [
    "SCHEMA_VERSION",
    "ApiJob",
    "DaemonExport",
    "NbdServer",
    "ResourceRef",
    "StorageDaemon",
    "Store",
    "SyncStore",
    "TaskChanges",
    "TaskRow",
    "VolumeExport",
    "utcnow",
]

T = TypeVar("T")


class SyncStore(TaskRows, JobRows, DaemonRows):
    """The database, used from one thread at a time: every table's rows."""


class Store:
    """The async face of SyncStore: every call runs on the store's own single thread."""

    def __init__(self, path: Path, metrics: Metrics | None = None) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbt-store")
        self.path = path
        self.metrics = metrics
        self.sync: SyncStore | None = None
        self._watch: sqlite3.Connection | None = None
        self._watch_cursor: sqlite3.Cursor | None = None

    async def open(self) -> None:
        def open_store() -> SyncStore:
            sync = SyncStore(self.path)
            sync.track_task_changes()
            self._watch = sqlite3.connect(self.path, check_same_thread=False, timeout=0)
            self._watch.execute("PRAGMA query_only = ON")
            self._watch_cursor = self._watch.cursor()
            if self.metrics is not None:
                sync.metrics = self.metrics
                self.metrics.tasks_counted(sync.counts()[0])  # then kept current by commits
            return sync

        loop = asyncio.get_running_loop()
        self.sync = await loop.run_in_executor(self._executor, open_store)

    def tasks_written(self) -> bool:
        """A task's listed columns or refs were written by this store since its change feed was
        last read (`SyncStore.task_changes`): a plain read of memory, no SQL, no thread hop."""
        sync = self.sync
        return sync is not None and sync.has_changed_tasks()

    def data_version(self) -> int | None:
        """A number that changes whenever anyone (this store or another process) commits to
        the database: SQLite's `data_version`, read on a connection of its own that never
        writes. No thread hop, but two system calls (SQLite's read lock): the event loop asks
        it to learn of writes by other processes. None: it could not tell (take it as a
        change)."""
        if self._watch is None or self._watch_cursor is None:
            return None
        try:
            # fetchall: the statement runs to its end, so no read transaction stays open
            return int(self._watch_cursor.execute("PRAGMA data_version").fetchall()[0][0])
        except sqlite3.Error:
            return None

    async def close(self) -> None:
        if self.sync is not None:
            await self.run(SyncStore.close)
            self.sync = None
        if self._watch is not None:
            watch, self._watch, self._watch_cursor = self._watch, None, None
            await asyncio.get_running_loop().run_in_executor(self._executor, watch.close)
        self._executor.shutdown(wait=True)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(sync_store, *args, **kwargs)` on the store thread."""
        assert self.sync is not None, "store is not open"
        sync = self.sync
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(sync, *args, **kwargs))
