"""API jobs: ZStack's async calls, kept so a caller can poll the result after a restart."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from typing import Any

from cbt_agent.store.records import ApiJob, _dt, _ts, utcnow
from cbt_agent.store.rows import Rows


class JobRows(Rows):
    """API jobs."""

    @staticmethod
    def _job(r: dict[str, Any]) -> ApiJob:
        return ApiJob(
            uuid=r["uuid"],
            api=r["api"],
            task_uuid=r["task_uuid"],
            state=r["state"],
            want_schema=bool(r["want_schema"]),
            webhook=r["webhook"],
            result=json.loads(r["result"]) if r["result"] else None,
            error=json.loads(r["error"]) if r["error"] else None,
            created=_dt(r["created"]),
            finished=_dt(r["finished"]) if r["finished"] else None,
        )

    def create_job(
        self,
        uuid: str,
        api: str,
        task_uuid: str | None,
        want_schema: bool = False,
        webhook: str | None = None,
    ) -> bool:
        """Record a new running job; False if the uuid is already taken."""
        try:
            self.db.execute(
                "INSERT INTO api_jobs (uuid, api, task_uuid, state, created, want_schema, "
                "webhook) VALUES (?, ?, ?, 'Running', ?, ?, ?)",
                (uuid, api, task_uuid, _ts(utcnow()), int(want_schema), webhook),
            )
        except sqlite3.IntegrityError:
            return False
        return True

    def finish_job(
        self,
        uuid: str,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        self.db.execute(
            "UPDATE api_jobs SET state = ?, result = ?, error = ?, finished = ? WHERE uuid = ?",
            (
                "Failed" if error is not None else "Succeeded",
                json.dumps(result) if result is not None else None,
                json.dumps(error) if error is not None else None,
                _ts(utcnow()),
                uuid,
            ),
        )

    def get_job(self, uuid: str) -> ApiJob | None:
        row = self._row("SELECT * FROM api_jobs WHERE uuid = ?", (uuid,))
        return self._job(row) if row else None

    def latest_job(self, task_uuid: str, api: str) -> ApiJob | None:
        """The task's most recently finished, successful job of `api` still kept (None: none
        succeeded, or it expired after `[jobs] keep_seconds`)."""
        row = self._row(
            "SELECT * FROM api_jobs WHERE task_uuid = ? AND api = ? AND state = 'Succeeded' "
            "ORDER BY finished DESC LIMIT 1",
            (task_uuid, api),
        )
        return self._job(row) if row else None

    def running_jobs(self) -> list[ApiJob]:
        return [self._job(r) for r in self._rows("SELECT * FROM api_jobs WHERE state = 'Running'")]

    def expire_jobs(self, older_than: datetime) -> int:
        cur = self.db.execute(
            "DELETE FROM api_jobs WHERE finished IS NOT NULL AND finished < ?", (_ts(older_than),)
        )
        return int(cur.rowcount)
