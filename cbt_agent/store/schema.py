"""The database's schema: each migration is a list of statements, applied in order, one
transaction each; `PRAGMA user_version` counts those applied."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

SCHEMA_VERSION = 4

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
        # of host:port, and whether it requires TLS (1; 2: TLS with the task's pre-shared key,
        # [nbd] tls = "psk", stored in this column since)
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
    [
        # offline exports (ExportNbdVolumes of a VM that is shut off): one qemu-storage-daemon
        # per VM, recorded before it is started (its pid file and QMP socket are known then,
        # its pid once it runs), so reconcile finds it after a crash at any point. No foreign
        # key to tasks: a row outliving its task names a process that must still be stopped.
        """CREATE TABLE storage_daemons (
            vm_uuid TEXT PRIMARY KEY, task_uuid TEXT NOT NULL, pid INTEGER,
            pid_file TEXT NOT NULL, qmp_socket TEXT NOT NULL, images TEXT NOT NULL,
            phase TEXT NOT NULL, started TEXT NOT NULL)""",
        # one row per exported disk: its export in the daemon and the change set exported
        """CREATE TABLE daemon_exports (
            vm_uuid TEXT NOT NULL REFERENCES storage_daemons(vm_uuid) ON DELETE CASCADE,
            volume_uuid TEXT NOT NULL, checkpoint TEXT NOT NULL, node TEXT NOT NULL,
            image TEXT NOT NULL, export_id TEXT NOT NULL, temp_bitmap TEXT, mode TEXT NOT NULL,
            since TEXT, reason TEXT, size INTEGER NOT NULL, granularity INTEGER NOT NULL,
            PRIMARY KEY (vm_uuid, volume_uuid))""",
    ],
]


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT/ROLLBACK; nests by doing nothing inside an open transaction.
    `after_commit`: callbacks queued during the transaction, run once it committed (dropped on
    a rollback): what the process keeps in memory follows only what the database holds."""

    def __init__(
        self, conn: sqlite3.Connection, after_commit: list[Callable[[], None]] | None = None
    ) -> None:
        self.conn = conn
        self.outer = False
        self.after_commit = after_commit if after_commit is not None else []

    def __enter__(self) -> None:
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")
            self.outer = True

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self.outer:
            return
        callbacks = list(self.after_commit)
        self.after_commit.clear()
        if exc_type is None:
            self.conn.execute("COMMIT")
            for callback in callbacks:
                callback()
        else:
            self.conn.execute("ROLLBACK")
