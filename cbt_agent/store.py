"""SQLite state through sqlite-utils: tasks, resource refs, checkpoints, export plans, status
transitions and api jobs.

All access runs on one dedicated thread (`Store`'s executor): sqlite3 connections are not to be
shared across threads, and serialising writes there keeps every operation one transaction.
`SyncStore` is the same API without the thread, for the `status` command and for tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import sqlite_utils

from cbt_agent.errors import NotFound, OperationError
from cbt_agent.model import CbtTask, Checkpoint, TaskStatus, check_transition

SCHEMA_VERSION = 3

P = ParamSpec("P")
T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(text: str) -> datetime:
    return datetime.fromisoformat(text)


@dataclass(frozen=True)
class ResourceRef:
    id: int
    task_uuid: str
    resource_uuid: str
    resource_type: str
    create_date: datetime
    last_op_date: datetime


@dataclass(frozen=True)
class VolumeExport:
    """The plan and state of one disk's point-in-time export, recorded before QEMU is touched."""

    task_uuid: str
    volume_uuid: str
    checkpoint: str  # the checkpoint this Enable cut
    device_node: str  # the disk's format node (bitmaps live here)
    scratch_node: str
    scratch_path: str
    job_id: str
    export_id: str
    temp_bitmap: str | None  # merged change set, removed at Disable
    mode: str
    since: str | None
    reason: str | None
    size: int
    granularity: int
    phase: str  # planned | exported


@dataclass(frozen=True)
class NbdServer:
    """Where a task's NBD server listens: host and port, or a unix socket; and whether it
    requires TLS."""

    host: str | None = None
    port: int | None = None
    socket: str | None = None
    tls: bool = False


@dataclass(frozen=True)
class ApiJob:
    uuid: str
    api: str
    task_uuid: str | None
    state: str  # Running | Succeeded | Failed
    want_schema: bool
    webhook: str | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    created: datetime
    finished: datetime | None


_MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE tasks (
            uuid TEXT PRIMARY KEY, name TEXT NOT NULL, description TEXT,
            vm_uuid TEXT NOT NULL UNIQUE, status TEXT NOT NULL, reason TEXT,
            create_date TEXT NOT NULL, last_op_date TEXT NOT NULL,
            next_seq INTEGER NOT NULL DEFAULT 1,
            nbd_host TEXT, nbd_port INTEGER, operation TEXT,
            tracking_lost TEXT)""",
        """CREATE TABLE resource_refs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            task_uuid TEXT NOT NULL REFERENCES tasks(uuid) ON DELETE CASCADE,
            resource_uuid TEXT NOT NULL, resource_type TEXT NOT NULL,
            create_date TEXT NOT NULL, last_op_date TEXT NOT NULL)""",
        "CREATE INDEX resource_refs_task ON resource_refs(task_uuid)",
        """CREATE TABLE checkpoints (
            task_uuid TEXT NOT NULL REFERENCES tasks(uuid) ON DELETE CASCADE,
            seq INTEGER NOT NULL, name TEXT NOT NULL UNIQUE, volumes TEXT NOT NULL,
            sizes TEXT NOT NULL DEFAULT '{}',
            created TEXT NOT NULL, removed TEXT,
            PRIMARY KEY (task_uuid, seq))""",
        """CREATE TABLE exports (
            task_uuid TEXT NOT NULL REFERENCES tasks(uuid) ON DELETE CASCADE,
            volume_uuid TEXT NOT NULL, checkpoint TEXT NOT NULL, device_node TEXT NOT NULL,
            scratch_node TEXT NOT NULL, scratch_path TEXT NOT NULL, job_id TEXT NOT NULL,
            export_id TEXT NOT NULL, temp_bitmap TEXT, mode TEXT NOT NULL, since TEXT,
            reason TEXT, size INTEGER NOT NULL, granularity INTEGER NOT NULL,
            phase TEXT NOT NULL,
            PRIMARY KEY (task_uuid, volume_uuid))""",
        """CREATE TABLE transitions (
            id INTEGER PRIMARY KEY AUTOINCREMENT, task_uuid TEXT NOT NULL,
            from_status TEXT, to_status TEXT NOT NULL, reason TEXT NOT NULL, at TEXT NOT NULL)""",
        "CREATE INDEX transitions_task ON transitions(task_uuid, id)",
        """CREATE TABLE api_jobs (
            uuid TEXT PRIMARY KEY, api TEXT NOT NULL, task_uuid TEXT,
            state TEXT NOT NULL, result TEXT, error TEXT, want_schema INTEGER NOT NULL DEFAULT 0,
            webhook TEXT,
            created TEXT NOT NULL, finished TEXT)""",
        "CREATE INDEX api_jobs_finished ON api_jobs(finished)",
    ],
    [
        # [nbd] transport = "unix" and tls_cert_dir: where the VM's NBD server listens instead
        # of host:port, and whether it requires TLS
        "ALTER TABLE tasks ADD COLUMN nbd_socket TEXT",
        "ALTER TABLE tasks ADD COLUMN nbd_tls INTEGER NOT NULL DEFAULT 0",
    ],
    [
        # handed_out: the checkpoint's Enable reached Running (only those are default bases);
        # tops: each disk's top image when it was cut (names what changed when it is replaced)
        "ALTER TABLE checkpoints ADD COLUMN handed_out INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE checkpoints ADD COLUMN tops TEXT NOT NULL DEFAULT '{}'",
        # breaks: disks whose change tracking was interrupted before this checkpoint (a top
        # without tracking): no incremental of theirs may span it. pending_breaks: seen at a VM
        # start, recorded in the next checkpoint
        "ALTER TABLE checkpoints ADD COLUMN breaks TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE tasks ADD COLUMN pending_breaks TEXT NOT NULL DEFAULT '{}'",
        # released: why the disks are no longer this host's to change (the VM migrated away or
        # was undefined here): Delete then removes only the local record
        "ALTER TABLE tasks ADD COLUMN released TEXT",
        """UPDATE checkpoints SET handed_out = 1 WHERE EXISTS (
            SELECT 1 FROM transitions t WHERE t.task_uuid = checkpoints.task_uuid
            AND t.to_status = 'Running'
            AND t.reason LIKE 'checkpoint ' || checkpoints.name || ' %')""",
    ],
]


class SyncStore:
    """The database, used from one thread at a time."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        if readonly:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # the database holds tokens' effects and VM names: owner only
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA busy_timeout = 5000")
        self.db = sqlite_utils.Database(conn)
        if not readonly:
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            self._migrate()

    def close(self) -> None:
        self.db.conn.close()

    # -- schema --------------------------------------------------------------------------------

    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise OperationError(
                f"database {self.path} has schema {current}, newer than this agent's "
                f"{SCHEMA_VERSION}: upgrade the agent"
            )
        for version in range(current, SCHEMA_VERSION):
            with self._tx():
                for statement in _MIGRATIONS[version]:
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {version + 1}")

    def _tx(self) -> Any:
        return _Transaction(self.db.conn)

    # -- tasks ---------------------------------------------------------------------------------

    @staticmethod
    def _task(row: dict[str, Any]) -> CbtTask:
        return CbtTask(
            uuid=row["uuid"],
            name=row["name"],
            description=row["description"],
            vm_uuid=row["vm_uuid"],
            status=TaskStatus(row["status"]),
            create_date=_dt(row["create_date"]),
            last_op_date=_dt(row["last_op_date"]),
            reason=row["reason"],
            operation=row["operation"],
            released=row.get("released"),
        )

    def _row(self, sql: str, params: tuple[Any, ...]) -> dict[str, Any] | None:
        cur = self.db.execute(sql, params)
        row = cur.fetchone()
        if row is None:
            return None
        return dict(zip([c[0] for c in cur.description], row, strict=True))

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        cur = self.db.execute(sql, params)
        names = [c[0] for c in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def get_task(self, uuid: str) -> CbtTask | None:
        row = self._row("SELECT * FROM tasks WHERE uuid = ?", (uuid,))
        return self._task(row) if row else None

    def require_task(self, uuid: str) -> CbtTask:
        task = self.get_task(uuid)
        if task is None:
            raise NotFound(f"CbtTask [uuid: {uuid}] is not found", field="uuid")
        return task

    def task_for_vm(self, vm_uuid: str) -> CbtTask | None:
        row = self._row("SELECT * FROM tasks WHERE vm_uuid = ?", (vm_uuid,))
        return self._task(row) if row else None

    def list_tasks(self) -> list[CbtTask]:
        return [self._task(r) for r in self._rows("SELECT * FROM tasks ORDER BY create_date")]

    def create_task(
        self,
        uuid: str,
        name: str,
        description: str | None,
        vm_uuid: str,
        volumes: list[str],
        adopted: list[Checkpoint] | None = None,
        reason: str = "created",
    ) -> CbtTask:
        """Insert a task, its resource refs, the checkpoints adopted from its disks (a task
        arriving from another host) and its first transition, in one transaction."""
        now = _ts(utcnow())
        with self._tx():
            existing = self.task_for_vm(vm_uuid)
            if existing is not None:
                raise OperationError(
                    f"VM [uuid: {vm_uuid}] have been protected by task: {existing.uuid}",
                    field="vmInstanceUuid",
                )
            if self.get_task(uuid) is not None:
                raise OperationError(f"CbtTask [uuid: {uuid}] already exists", field="resourceUuid")
            self.db.table("tasks").insert(
                {
                    "uuid": uuid,
                    "name": name,
                    "description": description,
                    "vm_uuid": vm_uuid,
                    "status": TaskStatus.CREATED.value,
                    "reason": reason,
                    "create_date": now,
                    "last_op_date": now,
                    "next_seq": max((c.seq for c in adopted or []), default=0) + 1,
                }
            )
            for c in adopted or []:
                self._insert_found(c)
            refs = [(vm_uuid, "VmInstanceVO")] + [(v, "VolumeVO") for v in volumes]
            for resource_uuid, kind in refs:
                self.db.table("resource_refs").insert(
                    {
                        "task_uuid": uuid,
                        "resource_uuid": resource_uuid,
                        "resource_type": kind,
                        "create_date": now,
                        "last_op_date": now,
                    }
                )
            self._add_transition(uuid, None, TaskStatus.CREATED, reason, now)
        return self.require_task(uuid)

    def _add_transition(
        self, task_uuid: str, old: str | None, new: str, reason: str, at: str
    ) -> None:
        self.db.table("transitions").insert(
            {
                "task_uuid": task_uuid,
                "from_status": old,
                "to_status": new,
                "reason": reason,
                "at": at,
            }
        )

    def set_status(
        self,
        task_uuid: str,
        new: TaskStatus,
        reason: str,
        *,
        expect: set[TaskStatus] | None = None,
        operation: str | None = None,
    ) -> CbtTask:
        """Move a task to `new`, recording the transition row, in one transaction.

        `expect`: refuse (OperationError) unless the task is in one of these statuses.
        A transition to the status the task already has records nothing.
        """
        now = _ts(utcnow())
        with self._tx():
            task = self.require_task(task_uuid)
            if expect is not None and task.status not in expect:
                raise OperationError(
                    f"CbtTask [uuid: {task_uuid}] is {task.status}, "
                    f"expected {' or '.join(sorted(s.value for s in expect))}"
                )
            if task.status is not new:
                check_transition(task.status, new)
                self._add_transition(task_uuid, task.status.value, new.value, reason, now)
            self.db.execute(
                "UPDATE tasks SET status = ?, reason = ?, last_op_date = ?, operation = ? "
                "WHERE uuid = ?",
                (new.value, reason, now, operation, task_uuid),
            )
        return self.require_task(task_uuid)

    def tracking_lost(self, task_uuid: str) -> str | None:
        row = self._row("SELECT tracking_lost FROM tasks WHERE uuid = ?", (task_uuid,))
        return None if row is None else row["tracking_lost"]

    def set_released(self, task_uuid: str, reason: str) -> None:
        self.db.execute("UPDATE tasks SET released = ? WHERE uuid = ?", (reason, task_uuid))

    def pending_breaks(self, task_uuid: str) -> dict[str, str]:
        """Disks whose tracking was seen interrupted (at a VM start), by volume: why."""
        row = self._row("SELECT pending_breaks FROM tasks WHERE uuid = ?", (task_uuid,))
        return {} if row is None else dict(json.loads(row["pending_breaks"] or "{}"))

    def add_pending_breaks(self, task_uuid: str, breaks: dict[str, str]) -> None:
        with self._tx():
            current = self.pending_breaks(task_uuid)
            current.update({k: v for k, v in breaks.items() if k not in current})
            self.db.execute(
                "UPDATE tasks SET pending_breaks = ? WHERE uuid = ?",
                (json.dumps(current, sort_keys=True), task_uuid),
            )

    def clear_pending_breaks(self, task_uuid: str) -> None:
        self.db.execute("UPDATE tasks SET pending_breaks = '{}' WHERE uuid = ?", (task_uuid,))

    def set_tracking_lost(self, task_uuid: str, reason: str | None) -> None:
        """Mark (or clear) that the task's bitmaps can no longer be trusted, and why."""
        self.db.execute("UPDATE tasks SET tracking_lost = ? WHERE uuid = ?", (reason, task_uuid))

    def set_operation(self, task_uuid: str, operation: str | None) -> None:
        """Record the operation about to touch QEMU (the intent), or clear it."""
        self.db.execute("UPDATE tasks SET operation = ? WHERE uuid = ?", (operation, task_uuid))

    def delete_task(self, task_uuid: str, reason: str) -> None:
        """Remove the task and what hangs off it; its transition history stays, ending 'Deleted'."""
        now = _ts(utcnow())
        with self._tx():
            task = self.get_task(task_uuid)
            if task is None:
                return
            self._add_transition(task_uuid, task.status.value, "Deleted", reason, now)
            self.db.execute("DELETE FROM tasks WHERE uuid = ?", (task_uuid,))

    def history_rows(self, task_uuid: str) -> list[dict[str, Any]]:
        """Transitions as plain rows (statuses as text, 'Deleted' included)."""
        return self._rows(
            "SELECT from_status, to_status, reason, at FROM transitions "
            "WHERE task_uuid = ? ORDER BY id",
            (task_uuid,),
        )

    @staticmethod
    def _ref(r: dict[str, Any]) -> ResourceRef:
        return ResourceRef(
            id=r["id"],
            task_uuid=r["task_uuid"],
            resource_uuid=r["resource_uuid"],
            resource_type=r["resource_type"],
            create_date=_dt(r["create_date"]),
            last_op_date=_dt(r["last_op_date"]),
        )

    def resource_refs(self, task_uuid: str) -> list[ResourceRef]:
        rows = self._rows(
            "SELECT * FROM resource_refs WHERE task_uuid = ? ORDER BY id", (task_uuid,)
        )
        return [self._ref(r) for r in rows]

    def all_resource_refs(self) -> dict[str, list[ResourceRef]]:
        """Every task's resource refs in one query (a query of all tasks is not N+1 reads)."""
        refs: dict[str, list[ResourceRef]] = {}
        for r in self._rows("SELECT * FROM resource_refs ORDER BY id"):
            refs.setdefault(r["task_uuid"], []).append(self._ref(r))
        return refs

    def sync_volume_refs(self, task_uuid: str, volumes: list[str]) -> None:
        """Make the task's VolumeVO refs exactly `volumes` (disks plugged or unplugged since)."""
        now = _ts(utcnow())
        with self._tx():
            have = {
                r.resource_uuid
                for r in self.resource_refs(task_uuid)
                if r.resource_type == "VolumeVO"
            }
            for v in volumes:
                if v not in have:
                    self.db.table("resource_refs").insert(
                        {
                            "task_uuid": task_uuid,
                            "resource_uuid": v,
                            "resource_type": "VolumeVO",
                            "create_date": now,
                            "last_op_date": now,
                        }
                    )
            for v in have - set(volumes):
                self.db.execute(
                    "DELETE FROM resource_refs WHERE task_uuid = ? AND resource_uuid = ? "
                    "AND resource_type = 'VolumeVO'",
                    (task_uuid, v),
                )

    # -- checkpoints -----------------------------------------------------------------------------

    @staticmethod
    def _checkpoint(r: dict[str, Any]) -> Checkpoint:
        return Checkpoint(
            task_uuid=r["task_uuid"],
            seq=r["seq"],
            name=r["name"],
            volumes=frozenset(json.loads(r["volumes"])),
            created=_dt(r["created"]),
            sizes=tuple(sorted(json.loads(r["sizes"]).items())),
            # a read-only view of a database not yet migrated to schema 3 has neither column
            handed_out=bool(r.get("handed_out", 1)),
            tops=tuple(sorted(json.loads(r.get("tops") or "{}").items())),
            breaks=tuple(sorted(json.loads(r.get("breaks") or "{}").items())),
        )

    def checkpoints(self, task_uuid: str) -> list[Checkpoint]:
        """The task's live checkpoints, oldest first."""
        return [
            self._checkpoint(r)
            for r in self._rows(
                "SELECT * FROM checkpoints WHERE task_uuid = ? AND removed IS NULL ORDER BY seq",
                (task_uuid,),
            )
        ]

    def removed_checkpoint_names(self, task_uuid: str) -> list[str]:
        return [
            r["name"]
            for r in self._rows(
                "SELECT name FROM checkpoints WHERE task_uuid = ? AND removed IS NOT NULL",
                (task_uuid,),
            )
        ]

    def next_checkpoint_seq(self, task_uuid: str) -> int:
        """Reserve the next checkpoint number of a task (never reused, even after a failure)."""
        with self._tx():
            row = self._row("SELECT next_seq FROM tasks WHERE uuid = ?", (task_uuid,))
            if row is None:
                raise NotFound(f"CbtTask [uuid: {task_uuid}] is not found", field="uuid")
            seq = int(row["next_seq"])
            self.db.execute("UPDATE tasks SET next_seq = ? WHERE uuid = ?", (seq + 1, task_uuid))
        return seq

    def add_checkpoint(
        self,
        task_uuid: str,
        seq: int,
        name: str,
        volumes: list[str],
        sizes: dict[str, int],
        tops: dict[str, str] | None = None,
        breaks: dict[str, str] | None = None,
    ) -> None:
        self.db.table("checkpoints").insert(
            {
                "task_uuid": task_uuid,
                "seq": seq,
                "name": name,
                "volumes": json.dumps(sorted(volumes)),
                "sizes": json.dumps(sizes, sort_keys=True),
                "tops": json.dumps(tops or {}, sort_keys=True),
                "breaks": json.dumps(breaks or {}, sort_keys=True),
                "created": _ts(utcnow()),
                "removed": None,
                "handed_out": 0,
            }
        )

    def mark_handed_out(self, task_uuid: str, name: str) -> None:
        self.db.execute(
            "UPDATE checkpoints SET handed_out = 1 WHERE task_uuid = ? AND name = ?",
            (task_uuid, name),
        )

    def known_checkpoint_names(self, task_uuid: str) -> set[str]:
        """Every checkpoint name the task has recorded, live or removed by retention."""
        return {
            r["name"]
            for r in self._rows("SELECT name FROM checkpoints WHERE task_uuid = ?", (task_uuid,))
        }

    def _insert_found(self, cp: Checkpoint) -> None:
        self.add_checkpoint(
            cp.task_uuid, cp.seq, cp.name, sorted(cp.volumes), dict(cp.sizes), dict(cp.tops)
        )

    def adopt_checkpoint(self, cp: Checkpoint) -> None:
        """Record a checkpoint found on the disks but not here (an Enable whose outcome was
        lost): it joins the chain, not handed out; later seqs are never reused."""
        with self._tx():
            self._insert_found(cp)
            self.db.execute(
                "UPDATE tasks SET next_seq = MAX(next_seq, ?) WHERE uuid = ?",
                (cp.seq + 1, cp.task_uuid),
            )

    def mark_checkpoint_removed(self, task_uuid: str, name: str) -> None:
        self.db.execute(
            "UPDATE checkpoints SET removed = ? WHERE task_uuid = ? AND name = ?",
            (_ts(utcnow()), task_uuid, name),
        )

    def drop_checkpoint(self, task_uuid: str, name: str) -> None:
        """Forget a checkpoint that never took effect (its transaction did not run)."""
        self.db.execute(
            "DELETE FROM checkpoints WHERE task_uuid = ? AND name = ?", (task_uuid, name)
        )

    # -- exports (the Enable plan) ----------------------------------------------------------------

    def save_exports(
        self,
        exports: list[VolumeExport],
        nbd_host: str | None,
        nbd_port: int | None,
        server: NbdServer | None = None,
    ) -> None:
        """Record the whole plan of an Enable (names of nodes, jobs, exports, port) at once.
        `server`, when given, is recorded as the task's NBD server instead of host and port."""
        if not exports:
            return
        task_uuid = exports[0].task_uuid
        with self._tx():
            self.db.execute("DELETE FROM exports WHERE task_uuid = ?", (task_uuid,))
            for e in exports:
                self.db.table("exports").insert(dict(e.__dict__))
            self.set_server(task_uuid, server or NbdServer(nbd_host, nbd_port))

    def set_export_phase(self, task_uuid: str, phase: str) -> None:
        self.db.execute("UPDATE exports SET phase = ? WHERE task_uuid = ?", (phase, task_uuid))

    def set_server(self, task_uuid: str, server: NbdServer) -> None:
        """Record where the task's NBD server listens (before it is started)."""
        self.db.execute(
            "UPDATE tasks SET nbd_host = ?, nbd_port = ?, nbd_socket = ?, nbd_tls = ? "
            "WHERE uuid = ?",
            (server.host, server.port, server.socket, int(server.tls), task_uuid),
        )

    def nbd_endpoint(self, task_uuid: str) -> tuple[str | None, int | None]:
        server = self.nbd_server(task_uuid)
        return server.host, server.port

    def nbd_server(self, task_uuid: str) -> NbdServer:
        # SELECT *: `status` reads a database read-only, possibly one an older agent made
        row = self._row("SELECT * FROM tasks WHERE uuid = ?", (task_uuid,))
        if row is None:
            return NbdServer()
        return NbdServer(
            host=row["nbd_host"],
            port=row["nbd_port"],
            socket=row.get("nbd_socket"),
            tls=bool(row.get("nbd_tls") or 0),
        )

    def exports(self, task_uuid: str) -> list[VolumeExport]:
        return [
            VolumeExport(**r)
            for r in self._rows(
                "SELECT * FROM exports WHERE task_uuid = ? ORDER BY rowid", (task_uuid,)
            )
        ]

    def clear_exports(self, task_uuid: str) -> None:
        with self._tx():
            self.db.execute("DELETE FROM exports WHERE task_uuid = ?", (task_uuid,))
            self.set_server(task_uuid, NbdServer())

    def used_nbd_ports(self) -> set[int]:
        return {
            int(r["nbd_port"])
            for r in self._rows("SELECT nbd_port FROM tasks WHERE nbd_port IS NOT NULL")
        }

    # -- api jobs --------------------------------------------------------------------------------

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

    def running_jobs(self) -> list[ApiJob]:
        return [self._job(r) for r in self._rows("SELECT * FROM api_jobs WHERE state = 'Running'")]

    def expire_jobs(self, older_than: datetime) -> int:
        cur = self.db.execute(
            "DELETE FROM api_jobs WHERE finished IS NOT NULL AND finished < ?", (_ts(older_than),)
        )
        return int(cur.rowcount)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT/ROLLBACK; nests by doing nothing inside an open transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.outer = False

    def __enter__(self) -> None:
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")
            self.outer = True

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self.outer:
            return
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")


class Store:
    """The async face of SyncStore: every call runs on the store's own single thread."""

    def __init__(self, path: Path) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbt-store")
        self.path = path
        self.sync: SyncStore | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self.sync = await loop.run_in_executor(self._executor, SyncStore, self.path)

    async def close(self) -> None:
        if self.sync is not None:
            await self.run(SyncStore.close)
            self.sync = None
        self._executor.shutdown(wait=True)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(sync_store, *args, **kwargs)` on the store thread."""
        assert self.sync is not None, "store is not open"
        sync = self.sync
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(sync, *args, **kwargs))
