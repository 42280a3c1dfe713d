"""The engine's typed commands: what each operation is asked to do, in plain values.

The API builds them from validated requests (`cbt_agent.api.validate`); the engine takes them as
given. Pure, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CreateTask:
    name: str
    description: str | None
    vm_uuid: str
    resource_uuid: str | None


@dataclass(frozen=True)
class EnableTask:
    task_uuid: str
    bitmap_name: str | None
    quiesce: str | None = None  # "always" | "never" from a quiesce:: system tag; None: config


@dataclass(frozen=True)
class DisableTask:
    task_uuid: str
    force: bool


@dataclass(frozen=True)
class DeleteTask:
    task_uuid: str
    force: bool
    enforcing: bool


@dataclass(frozen=True)
class ExportVolumes:
    """ExportNbdVolumes: the disks of a VM that is not running, exported read-only."""

    vm_uuid: str
    volume_uuids: tuple[str, ...]  # empty: every disk
    bitmap_name: str | None  # changes since this checkpoint; None: the latest handed out
    force: bool  # end an offline export already open first, instead of refusing


@dataclass(frozen=True)
class UnexportVolumes:
    vm_uuid: str
    volume_uuids: tuple[str, ...]
