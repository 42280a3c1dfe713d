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


class Rows:
    """One connection to the database, used from one thread at a time; the row helpers the
    tables' classes share."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.metrics: Metrics | None = None  # set by the agent's Store: figures for /metrics
        self._after_commit: list[Callable[[], None]] = []
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
