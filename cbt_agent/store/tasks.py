"""Tasks, their resource refs and their status history."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from cbt_agent.errors import NotFound, OperationError
from cbt_agent.model import CbtTask, Checkpoint, TaskStatus, check_transition
from cbt_agent.store.checkpoints import CheckpointRows
from cbt_agent.store.records import ResourceRef, TaskChanges, TaskRow, _dt, _ts, utcnow


class TaskRows(CheckpointRows):
    """Tasks, resource refs and transitions."""

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
        """Every task, oldest first (equal dates in the order they were written)."""
        return [
            self._task(r) for r in self._rows("SELECT * FROM tasks ORDER BY create_date, rowid")
        ]

    def task_rows(self, uuids: Collection[str] | None = None) -> list[TaskRow]:
        """Tasks with their refs and their place in `list_tasks`' order: all of them (in that
        order), or those of `uuids` that exist (in no particular order)."""
        select = "SELECT rowid AS _rowid, * FROM tasks"
        if uuids is None:
            rows = self._rows(f"{select} ORDER BY create_date, rowid")
            refs = self.all_resource_refs()
        else:
            rows, refs = [], {}
            wanted = list(uuids)
            for at in range(0, len(wanted), 500):  # SQLite's bound on parameters
                chunk = tuple(wanted[at : at + 500])
                marks = ", ".join("?" * len(chunk))
                rows += self._rows(f"{select} WHERE uuid IN ({marks})", chunk)
                for r in self._rows(
                    f"SELECT * FROM resource_refs WHERE task_uuid IN ({marks}) ORDER BY id", chunk
                ):
                    refs.setdefault(r["task_uuid"], []).append(self._ref(r))
        return [
            TaskRow(self._task(r), refs.get(r["uuid"], []), (r["create_date"], r["_rowid"]))
            for r in rows
        ]

    def task_changes(self) -> TaskChanges:
        """The tasks changed since the last call (see `take_changed_tasks`), read back."""
        everything, changed = self.take_changed_tasks()
        if everything:
            return TaskChanges(True, self.task_rows(), frozenset())
        rows = self.task_rows(changed) if changed else []
        return TaskChanges(False, rows, frozenset(changed - {r.task.uuid for r in rows}))

    def counts(self) -> tuple[dict[str, int], int]:
        """Tasks by status, and how many tasks have exports open (a running VM's or a shut-off
        one's): aggregate reads."""
        by_status = {
            r["status"]: r["n"]
            for r in self._rows("SELECT status, COUNT(*) AS n FROM tasks GROUP BY status")
        }
        # a task's exports: through its running VM's QEMU, or a shut-off VM's storage daemon
        row = self._row(
            "SELECT (SELECT COUNT(DISTINCT task_uuid) FROM exports)"
            " + (SELECT COUNT(*) FROM storage_daemons WHERE phase = 'exported') AS n",
            (),
        )
        return by_status, int(row["n"]) if row else 0

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
        metrics = self.metrics
        if metrics is not None:
            before, after = getattr(old, "value", old), str(getattr(new, "value", new))
            self._on_commit(lambda: metrics.task_moved(before, after))
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
