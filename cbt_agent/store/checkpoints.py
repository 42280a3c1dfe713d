"""Checkpoints (one per Enable: the bitmaps cut on every disk) and the export plan of an
Enable, recorded before QEMU is touched."""

from __future__ import annotations

import json
from typing import Any

from cbt_agent.errors import NotFound
from cbt_agent.model import Checkpoint
from cbt_agent.store.records import NbdServer, VolumeExport, _dt, _ts, utcnow
from cbt_agent.store.rows import Rows

# tasks.nbd_tls: 0 plain, 1 TLS (x509), 2 TLS with the task's pre-shared key. An agent from
# before pre-shared keys reads 2 as "TLS" too; no new column, so no schema change.
NBD_TLS_PSK = 2


def tls_column(server: NbdServer) -> int:
    return NBD_TLS_PSK if server.psk else int(server.tls)


class CheckpointRows(Rows):
    """Checkpoints and exports."""

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

    def mark_handed_out(self, task_uuid: str, name: str, handed_out: bool = True) -> None:
        """A checkpoint whose Enable reached Running is a default base; one whose export broke
        before the backup could finish is not any more (`handed_out=False`)."""
        self.db.execute(
            "UPDATE checkpoints SET handed_out = ? WHERE task_uuid = ? AND name = ?",
            (int(handed_out), task_uuid, name),
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
            (server.host, server.port, server.socket, tls_column(server), task_uuid),
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
            psk=row.get("nbd_tls") == NBD_TLS_PSK,
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
