"""API jobs: every asynchronous call (Create, Enable, Disable, Delete) runs as a job recorded in
SQLite, its result or ZStack ErrorCode kept for polling and for its X-Web-Hook.

The engine's operations return plain results and raise the CbtError tree; turning those into
ZStack's JSON and ErrorCodes happens here, at the boundary, never in the engine.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cbt_agent import logctx
from cbt_agent.api import zstack
from cbt_agent.config import Config
from cbt_agent.errors import CbtError
from cbt_agent.metrics import Metrics
from cbt_agent.store import ApiJob, Store, SyncStore

log = logging.getLogger(__name__)

Result = dict[str, Any]  # a reply in ZStack's JSON form, as the API built it
RESTART_ERROR = "the agent restarted before this job finished; see the task's status history"


Render = Callable[[ApiJob, bool], tuple[int, bytes]]  # (job, schema asked) -> status, body


@dataclass
class _Finished:
    job: ApiJob
    bodies: dict[bool, tuple[int, bytes]]  # by "the poll asked for the schema"
    size: int


class FinishedJobs:
    """The poll replies of finished jobs, kept in memory: a finished job never changes, it is
    only forgotten when it expires (a job finished longer ago than `keep_seconds` is never
    answered from here). The least recently polled go first past `max_bytes`."""

    def __init__(self, keep_seconds: float, max_bytes: int = 64 << 20) -> None:
        self.keep = timedelta(seconds=keep_seconds)
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[str, _Finished] = collections.OrderedDict()
        self._bytes = 0

    def add(self, job: ApiJob) -> None:
        if job.state == "Running" or job.finished is None:
            return
        self._drop(job.uuid)
        size = 512 + len(json.dumps(job.result)) + len(json.dumps(job.error))
        if size > self.max_bytes // 8:
            return  # a huge result is read from the database each time
        self._entries[job.uuid] = _Finished(job, {}, size)
        self._bytes += size
        self._trim()

    def reply(self, uuid: str, schema: bool, render: Render) -> tuple[int, bytes] | None:
        """The poll reply of a finished job kept here (rendered once per variant), or None."""
        entry = self._entries.get(uuid)
        if entry is None:
            return None
        assert entry.job.finished is not None
        if entry.job.finished < datetime.now(UTC) - self.keep:
            self._drop(uuid)
            return None
        self._entries.move_to_end(uuid)
        got = entry.bodies.get(schema)
        if got is None:
            got = entry.bodies[schema] = render(entry.job, schema)
            entry.size += len(got[1])
            self._bytes += len(got[1])
            self._trim()
        return got

    def forget_older(self, cutoff: datetime) -> None:
        for uuid in [
            u for u, e in self._entries.items() if e.job.finished and e.job.finished < cutoff
        ]:
            self._drop(uuid)

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, uuid: str) -> None:
        entry = self._entries.pop(uuid, None)
        if entry is not None:
            self._bytes -= entry.size

    def _trim(self) -> None:
        while self._bytes > self.max_bytes and self._entries:
            _uuid, entry = self._entries.popitem(last=False)
            self._bytes -= entry.size


class Jobs:
    """Runs operations as api jobs in the background and records how each ended."""

    def __init__(self, config: Config, store: Store, metrics: Metrics | None = None) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.finished = FinishedJobs(config.jobs.keep_seconds)
        self._running_uuids: set[str] = set()  # jobs of this process not finished yet
        # called with each finished job (the app delivers X-Web-Hook results with it)
        self.on_done: Callable[[ApiJob], Awaitable[None]] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._per_caller: collections.Counter[str] = collections.Counter()

    async def submit(
        self,
        job_uuid: str,
        api: str,
        operation: Callable[[], Awaitable[Result]],
        task_uuid: str | None = None,
        want_schema: bool = False,
        webhook: str | None = None,
        caller: str = "",
    ) -> bool:
        """Record a job and run `operation` in the background; False if the job uuid is taken.
        `caller` (who asked, e.g. a digest of the token) is counted while the job runs."""
        if not await self.store.run(
            SyncStore.create_job, job_uuid, api, task_uuid, want_schema, webhook
        ):
            return False
        job = asyncio.create_task(
            self._run(job_uuid, api, operation, task_uuid), name=f"job-{job_uuid}"
        )
        self._running.add(job)
        self._running_uuids.add(job_uuid)
        self._per_caller[caller] += 1

        def done(task: asyncio.Task[None]) -> None:
            self._running.discard(task)
            self._per_caller[caller] -= 1
            if self._per_caller[caller] <= 0:
                del self._per_caller[caller]

        job.add_done_callback(done)
        return True

    def is_running(self, job_uuid: str) -> bool:
        """The job runs in this process and has not recorded its end yet."""
        return job_uuid in self._running_uuids

    def running_for(self, caller: str) -> int:
        """Jobs of `caller` not finished yet."""
        return self._per_caller.get(caller, 0)

    async def _run(
        self,
        job_uuid: str,
        api: str,
        operation: Callable[[], Awaitable[Result]],
        task_uuid: str | None,
    ) -> None:
        # this asyncio task's own context: every line logged for the job names it
        logctx.JOB.set(job_uuid)
        logctx.TASK.set(task_uuid)
        started = time.monotonic()
        try:
            try:
                result = await operation()
            except CbtError as e:
                log.info("job %s %s failed: %s", job_uuid, api, e.message)
                outcome = "failed"
                await self.store.run(
                    SyncStore.finish_job, job_uuid, error=zstack.error_from_exception(e)
                )
            except Exception as e:
                log.exception("job %s %s failed unexpectedly", job_uuid, api)
                outcome = "internal_error"
                error = zstack.error_code(
                    zstack.SYS_INTERNAL, "An internal error happened", f"{type(e).__name__}: {e}"
                )
                await self.store.run(SyncStore.finish_job, job_uuid, error=error)
            else:
                outcome = "succeeded"
                await self.store.run(SyncStore.finish_job, job_uuid, result=result)
        finally:
            # recorded (or the job was cancelled): polls read the database from now on
            self._running_uuids.discard(job_uuid)
        if self.metrics is not None:
            self.metrics.job_done(api, outcome, time.monotonic() - started)
        # what was recorded, read back: polls are answered from it, the webhook gets it
        job = await self.store.run(SyncStore.get_job, job_uuid)
        if job is not None:
            self.finished.add(job)
            if self.on_done is not None:
                await self.on_done(job)

    async def fail_unfinished(self) -> int:
        """At start, before the API listens: jobs still marked running can never finish (the
        agent that ran them is gone); they fail with a clear error. Returns how many."""
        unfinished = await self.store.run(SyncStore.running_jobs)
        for job in unfinished:
            await self.store.run(
                SyncStore.finish_job,
                job.uuid,
                error=zstack.error_code(zstack.SYS_OPERATION, "An operation failed", RESTART_ERROR),
            )
        return len(unfinished)

    async def expire(self) -> int:
        """Forget finished jobs older than `[jobs] keep_seconds`; returns how many."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.config.jobs.keep_seconds)
        self.finished.forget_older(cutoff)
        return await self.store.run(SyncStore.expire_jobs, cutoff)

    async def expire_forever(self) -> None:
        interval = min(3600.0, self.config.jobs.keep_seconds / 10)
        while True:
            removed = await self.expire()
            if removed:
                log.info("expired %d finished api jobs", removed)
            await asyncio.sleep(interval)

    async def drain(self) -> None:
        """Wait for running jobs (graceful shutdown)."""
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
