"""Offline exports: the qemu-storage-daemon that exports the disks of a shut-off VM, and its
exports. A row is written before the daemon starts (its pid file and QMP socket are chosen
then), its pid as soon as it runs: reconcile finds the process after a crash at any point.
Where the daemon's NBD server listens is the task's NBD server (`set_server`), as for a running
VM's exports."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cbt_agent.store.records import _dt, _ts
from cbt_agent.store.rows import Rows


@dataclass(frozen=True)
class StorageDaemon:
    """One VM's qemu-storage-daemon, holding its disks' images read-only (and their locks)."""

    vm_uuid: str
    task_uuid: str
    pid: int | None  # None until it has started (then its pid file tells)
    pid_file: str
    qmp_socket: str
    images: tuple[str, ...]  # every file it opens: the image locks it holds
    phase: str  # planned | started | exported
    started: datetime


@dataclass(frozen=True)
class DaemonExport:
    """One disk exported by a VM's qemu-storage-daemon: the change set since `since`."""

    vm_uuid: str
    volume_uuid: str
    checkpoint: str  # the checkpoint cut (offline) for this export
    node: str  # the disk's top format node in the daemon (bitmaps live here)
    image: str  # the top image file (what the export reads through its chain)
    export_id: str
    temp_bitmap: str | None  # the merged change set (incremental); None for a full
    mode: str
    since: str | None
    reason: str | None
    size: int
    granularity: int


class DaemonRows(Rows):
    """storage_daemons and daemon_exports."""

    @staticmethod
    def _daemon(r: dict[str, Any]) -> StorageDaemon:
        return StorageDaemon(
            vm_uuid=r["vm_uuid"],
            task_uuid=r["task_uuid"],
            pid=r["pid"],
            pid_file=r["pid_file"],
            qmp_socket=r["qmp_socket"],
            images=tuple(json.loads(r["images"])),
            phase=r["phase"],
            started=_dt(r["started"]),
        )

    def record_daemon(self, daemon: StorageDaemon, exports: list[DaemonExport]) -> None:
        """Record a daemon about to start and the exports it will serve (replacing any rows
        of the VM), in one transaction."""
        with self._tx():
            self.db.execute("DELETE FROM storage_daemons WHERE vm_uuid = ?", (daemon.vm_uuid,))
            self.db.table("storage_daemons").insert(
                {
                    **daemon.__dict__,
                    "images": json.dumps(list(daemon.images)),
                    "started": _ts(daemon.started),
                }
            )
            for e in exports:
                self.db.table("daemon_exports").insert(dict(e.__dict__))

    def storage_daemon(self, vm_uuid: str) -> StorageDaemon | None:
        # a database not yet at schema 4 (`status` reads one read-only) has no such table
        if not self.db["storage_daemons"].exists():
            return None
        row = self._row("SELECT * FROM storage_daemons WHERE vm_uuid = ?", (vm_uuid,))
        return self._daemon(row) if row else None

    def storage_daemons(self) -> list[StorageDaemon]:
        if not self.db["storage_daemons"].exists():
            return []
        return [self._daemon(r) for r in self._rows("SELECT * FROM storage_daemons")]

    def daemon_exports(self, vm_uuid: str) -> list[DaemonExport]:
        if not self.db["daemon_exports"].exists():
            return []
        return [
            DaemonExport(**r)
            for r in self._rows(
                "SELECT * FROM daemon_exports WHERE vm_uuid = ? ORDER BY rowid", (vm_uuid,)
            )
        ]

    def set_daemon_pid(self, vm_uuid: str, pid: int) -> None:
        self.db.execute(
            "UPDATE storage_daemons SET pid = ?, phase = 'started' WHERE vm_uuid = ?",
            (pid, vm_uuid),
        )

    def set_daemon_phase(self, vm_uuid: str, phase: str) -> None:
        self.db.execute("UPDATE storage_daemons SET phase = ? WHERE vm_uuid = ?", (phase, vm_uuid))

    def forget_daemon(self, vm_uuid: str) -> None:
        """The daemon is stopped: its rows go (its exports with it)."""
        self.db.execute("DELETE FROM storage_daemons WHERE vm_uuid = ?", (vm_uuid,))
