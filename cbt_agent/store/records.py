"""The store's records: what a row of resource_refs, exports, the NBD server columns and api_jobs
reads back as; and how dates are written (UTC ISO-8601 with microseconds)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cbt_agent.model import CbtTask


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
class TaskRow:
    """A task as QueryCbtTask lists it: the task, its resource refs, and its place in the default
    order (`create_date` as written, then rowid: insertion order among equal dates)."""

    task: CbtTask
    refs: list[ResourceRef]
    order: tuple[str, int]


@dataclass(frozen=True)
class TaskChanges:
    """What changed in the tasks and their refs since the last `task_changes()` call.
    `full`: anything may have changed (the first call, or another connection committed):
    `rows` is then every task in the default order, else the changed tasks that still exist,
    and `gone` the changed ones that no longer do."""

    full: bool
    rows: list[TaskRow]
    gone: frozenset[str]


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
    """Where a task's NBD server listens: host and port, or a unix socket; whether it requires
    TLS, and whether a client proves itself with the task's pre-shared key (`psk`, TLS too)."""

    host: str | None = None
    port: int | None = None
    socket: str | None = None
    tls: bool = False
    psk: bool = False


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
