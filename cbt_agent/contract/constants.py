"""The facts of the wire contract that more than one place needs, each defined once."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal, get_args

from cbt_agent.contract.patterns import (
    BITMAP_PATTERN,
    CHECKPOINT_PATTERN,
    DATE_PATTERN,
    PSK_IDENTITY_PATTERN,
    PSK_KEY_PATTERN,
    UUID_PATTERN,
)
from cbt_agent.model import DEFAULT_GRANULARITY, TaskStatus

BackupMode = Literal["full", "incremental"]
DeleteMode = Literal["Permissive", "Enforcing"]
ResourceType = Literal["VmInstanceVO", "VolumeVO"]
TASK_STATUSES: Final = tuple(s.value for s in TaskStatus)
BACKUP_MODES: Final[tuple[str, ...]] = get_args(BackupMode)
DELETE_MODES: Final[tuple[str, ...]] = get_args(DeleteMode)
RESOURCE_TYPES: Final[tuple[str, ...]] = get_args(ResourceType)

MAX_NAME: Final = 255
MAX_DESCRIPTION: Final = 2048
QUERY_LIMIT: Final = 1000  # ZStack's default `limit`
QUIESCE_TAG: Final = "quiesce::"  # the system tag of EnableCbtTask: quiesce::true|false
BITMAP_TAG: Final = "bitmapName::"  # ExportNbdVolumes' base as a system tag: bitmapName::<name>

# What QueryCbtTask can filter and sort on, with each field's kind (the query engine's table).
QUERY_FIELDS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "uuid": "str",
        "name": "str",
        "description": "str",
        "status": "str",
        "createDate": "date",
        "lastOpDate": "date",
        "resourceRefs.resourceUuid": "str",
        "resourceRefs.resourceType": "str",
        "resourceRefs.taskUuid": "str",
        "resourceRefs.id": "int",
    }
)

__all__ = [
    "BACKUP_MODES",
    "BITMAP_PATTERN",
    "BITMAP_TAG",
    "CHECKPOINT_PATTERN",
    "DATE_PATTERN",
    "DEFAULT_GRANULARITY",
    "DELETE_MODES",
    "MAX_DESCRIPTION",
    "MAX_NAME",
    "PSK_IDENTITY_PATTERN",
    "PSK_KEY_PATTERN",
    "QUERY_FIELDS",
    "QUERY_LIMIT",
    "QUIESCE_TAG",
    "RESOURCE_TYPES",
    "TASK_STATUSES",
    "UUID_PATTERN",
    "BackupMode",
    "DeleteMode",
    "ResourceType",
]
