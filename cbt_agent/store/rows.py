"""The connection and the helpers every table's rows use."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlite_utils

from cbt_agent.errors import OperationError
from cbt_agent.model import CbtTask, TaskStatus
from cbt_agent.store.records import _dt
from cbt_agent.store.schema import _MIGRATIONS, SCHEMA_VERSION, _Transaction

if TYPE_CHECKING:
    from cbt_agent.metrics import Metrics


# Each names the task whose listed inventory changed: its columns QueryCbtTask shows, its refs.
_TASK_COLUMNS = "uuid, name, description, status, create_date, last_op_date"
_CHANGE_TRIGGERS = (
    "CREATE TEMP TRIGGER IF NOT EXISTS cbt_task_ins AFTER INSERT ON main.tasks "
    "BEGIN SELECT cbt_task_changed(NEW.uuid); END",
    f"CREATE TEMP TRIGGER IF NOT EXISTS cbt_task_upd AFTER UPDATE OF {_TASK_COLUMNS} "
    "ON main.tasks BEGIN SELECT cbt_task_changed(OLD.uuid), cbt_task_changed(NEW.uuid); END",
    "CREATE TEMP TRIGGER IF NOT EXISTS cbt_task_del AFTER DELETE ON main.tasks "
    "BEGIN SELECT cbt_task_changed(OLD.uuid); END",
    "CREATE TEMP TRIGGER IF NOT EXISTS cbt_ref_ins AFTER INSERT ON main.resource_refs "
    "BEGIN SELECT cbt_task_changed(NEW.task_uuid); END",
    "CREATE TEMP TRIGGER IF NOT EXISTS cbt_ref_upd AFTER UPDATE ON main.resource_refs "
    "BEGIN SELECT cbt_task_changed(OLD.task_uuid), cbt_task_changed(NEW.task_uuid); END",
    "CREATE TEMP TRIGGER IF NOT EXISTS cbt_ref_del AFTER DELETE ON main.resource_refs "
    "BEGIN SELECT cbt_task_changed(OLD.task_uuid); END",
)


class Rows:
    """One connection to the database, used from one thread at a time; the row helpers the
    tables' classes share."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.metrics: Metrics | None = None  # set by the agent's Store: figures for /metrics
        self._after_commit: list[Callable[[], None]] = []
        # the change feed of QueryCbtTask's inventories (`track_task_changes`)
        self._tracking = False
        self._changed_tasks: set[str] = set()
        self._seen_version: int | None = None
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

    # -- what changed (QueryCbtTask's inventories in memory) -----------------------------------

    def track_task_changes(self) -> None:
        """From now on every write to a task's listed columns or to its resource refs, through
        this connection, names the task in the change feed (`take_changed_tasks`). Temporary
        triggers (this connection only, nothing in the schema) catch every write path, the
        ones to come included, and the refs removed by ON DELETE CASCADE with their task."""
        conn = self.db.conn
        conn.create_function("cbt_task_changed", 1, self._changed_tasks.add)
        for statement in _CHANGE_TRIGGERS:
            conn.execute(statement)
        self._tracking = True

    def has_changed_tasks(self) -> bool:
        """A task was written through this connection since the last `take_changed_tasks`
        (true from the write's statement on, before its commit). Safe to ask from any thread."""
        return bool(self._changed_tasks)

    def take_changed_tasks(self) -> tuple[bool, set[str]]:
        """(everything, tasks): the tasks written through this connection since the last call
        (committed: calls run between transactions), and whether anything may have changed
        besides: no tracking, the first call, or another connection committed since (SQLite's
        `data_version` tells; it ignores this connection's own commits)."""
        version = int(self.db.execute("PRAGMA data_version").fetchall()[0][0])
        everything = not self._tracking or version != self._seen_version
        self._seen_version = version
        changed = set(self._changed_tasks)
        self._changed_tasks.clear()  # the same set: the SQL function adds to it
        return everything, changed

    def _tx(self) -> Any:
        return _Transaction(self.db.conn, self._after_commit)

    def _on_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once the open transaction commits (now, outside one)."""
        if self.db.conn.in_transaction:
            self._after_commit.append(callback)
        else:
            callback()

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
