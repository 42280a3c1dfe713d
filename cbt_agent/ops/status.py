"""`cbt-agent status`: every task from the database alone (opened read-only, the agent may be
down): its VM, status, last transition and why, disks, latest checkpoint, and what the last
Enable changed (read from its kept api-job result; "-" once that job has expired), and for an
open export the scratch it takes now and its budget."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from cbt_agent.contract.replies import EnableCbtTaskReply
from cbt_agent.model import CbtTask
from cbt_agent.ops import table
from cbt_agent.store import SyncStore

ENABLE_API = "EnableCbtTask"  # the api name its jobs are recorded under


@dataclass(frozen=True)
class VolumeChange:
    volume_uuid: str
    mode: str
    changed_bytes: int
    scratch_budget: int | None = None


@dataclass(frozen=True)
class LastEnable:
    """The last successful Enable whose job is still kept."""

    job_uuid: str
    finished: datetime | None
    bitmap_name: str | None
    volumes: tuple[VolumeChange, ...]

    @property
    def changed_bytes(self) -> int:
        return sum(v.changed_bytes for v in self.volumes)


@dataclass(frozen=True)
class TaskSummary:
    task: CbtTask
    volumes: tuple[str, ...]
    checkpoints: int
    latest_checkpoint: str | None
    nbd: str | None
    last_transition: dict[str, Any] | None  # from_status, to_status, reason, at
    last_enable: LastEnable | None
    scratch: tuple[int, int | None] | None = None  # open exports: (bytes used, budget)


def last_enable(store: SyncStore, task_uuid: str) -> LastEnable | None:
    job = store.latest_job(task_uuid, ENABLE_API)
    if job is None or job.result is None:
        return None
    try:
        reply = EnableCbtTaskReply.model_validate(job.result)
    except ValidationError:
        return None  # not a result this agent can read (written by another version)
    infos = reply.volume_cbt_backup_infos
    return LastEnable(
        job_uuid=job.uuid,
        finished=job.finished,
        bitmap_name=infos[0].bitmap_name if infos else None,
        volumes=tuple(
            VolumeChange(i.volume.volume_uuid, i.mode, i.changed_bytes, i.scratch_budget)
            for i in infos
        ),
    )


def summaries(store: SyncStore) -> list[TaskSummary]:
    out: list[TaskSummary] = []
    for t in store.list_tasks():
        cps = store.checkpoints(t.uuid)
        server = store.nbd_server(t.uuid)
        nbd = f"{server.host}:{server.port}" if server.port else server.socket
        if nbd and server.tls:
            nbd += " (TLS)"
        history = store.history_rows(t.uuid)
        last = last_enable(store, t.uuid)
        exports = store.exports(t.uuid)
        scratch = None
        if exports:
            budgets = [v.scratch_budget for v in last.volumes] if last else []
            budget = sum(b for b in budgets if b) if budgets and all(budgets) else None
            scratch = (sum(_allocated(e.scratch_path) for e in exports), budget)
        out.append(
            TaskSummary(
                task=t,
                volumes=tuple(
                    r.resource_uuid
                    for r in store.resource_refs(t.uuid)
                    if r.resource_type == "VolumeVO"
                ),
                checkpoints=len(cps),
                latest_checkpoint=cps[-1].name if cps else None,
                nbd=nbd,
                last_transition=history[-1] if history else None,
                last_enable=last,
                scratch=scratch,
            )
        )
    return out


def _allocated(path: str) -> int:
    """Bytes a scratch file takes on disk (0 when it is gone)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def to_json(s: TaskSummary) -> dict[str, Any]:
    t, h, e = s.task, s.last_transition, s.last_enable
    return {
        "uuid": t.uuid,
        "name": t.name,
        "vmInstanceUuid": t.vm_uuid,
        "status": t.status.value,
        "reason": t.reason,
        "lastOpDate": t.last_op_date.isoformat(timespec="seconds"),
        "lastTransition": None
        if h is None
        else {"from": h["from_status"], "to": h["to_status"], "reason": h["reason"], "at": h["at"]},
        "disks": len(s.volumes),
        "volumes": list(s.volumes),
        "checkpoints": s.checkpoints,
        "latestCheckpoint": s.latest_checkpoint,
        "nbd": s.nbd,
        "changedBytes": None if e is None else e.changed_bytes,
        "scratch": None
        if s.scratch is None
        else {"usedBytes": s.scratch[0], "budgetBytes": s.scratch[1]},
        "lastEnable": None
        if e is None
        else {
            "jobUuid": e.job_uuid,
            "finished": e.finished.isoformat(timespec="seconds") if e.finished else None,
            "bitmapName": e.bitmap_name,
            "volumes": [
                {"volumeUuid": v.volume_uuid, "mode": v.mode, "changedBytes": v.changed_bytes}
                for v in e.volumes
            ],
        },
    }


HEADERS = [
    "TASK",
    "VM",
    "STATUS",
    "SINCE",
    "DISKS",
    "LATEST CHECKPOINT",
    "CHANGED",
    "NBD",
    "SCRATCH",
    "LAST TRANSITION",
]


def lines(rows: list[TaskSummary]) -> list[str]:
    """One line per task; the last transition (from -> to: reason) last, as it may be long."""
    cells = []
    for s in rows:
        h = s.last_transition
        cells.append(
            [
                s.task.uuid,
                s.task.vm_uuid,
                s.task.status.value,
                h["at"][:19] if h else "-",
                str(len(s.volumes)),
                s.latest_checkpoint or "-",
                table.size(s.last_enable.changed_bytes if s.last_enable else None),
                s.nbd or "-",
                "-"
                if s.scratch is None
                else f"{table.size(s.scratch[0])}/{table.size(s.scratch[1])}",
                f"{h['from_status'] or '-'} -> {h['to_status']}: {h['reason']}" if h else "-",
            ]
        )
    return table.render(HEADERS, cells, right=(4, 6))
