"""The facts of the wire contract that more than one place needs, each defined once."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal, get_args

from cbt_agent.model import DEFAULT_GRANULARITY, TaskStatus

# A ZStack uuid: 32 hex digits, either case, no dashes (tasks, VMs, volumes, jobs, tags).
UUID_PATTERN: Final = "^[0-9a-fA-F]{32}$"
# A checkpoint (bitmap) name as a caller may pass it back to Enable.
BITMAP_PATTERN: Final = "^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$"
# A checkpoint name as the agent cuts it (`model.checkpoint_name`): "cbt-", the first 12 hex
# digits of the task uuid, "-", the sequence number (at least 6 digits). Clients may build file
# names from it; anything else in a reply's bitmapName is not the agent's.
CHECKPOINT_PATTERN: Final = "^cbt-[0-9a-f]{12}-[0-9]{6,}$"
# ZStack's (Gson's default) date form, e.g. "Nov 7, 2026 9:05:03 PM" (server-local time).
DATE_PATTERN: Final = r"^[A-Z][a-z]{2} \d{1,2}, \d{4} \d{1,2}:\d{2}:\d{2} (AM|PM)$"
# An NBD TLS pre-shared key handed out by Enable: the identity (TLS username) and the 256-bit
# key in lower-case hex, as a keys.psk line `identity:key` holds them.
PSK_IDENTITY_PATTERN: Final = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
PSK_KEY_PATTERN: Final = "^[0-9a-f]{64}$"

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
