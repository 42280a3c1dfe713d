"""The reply objects of the CBT task API, as the agent writes them and the client reads them.

Field order is the order on the wire. A field without a default is always present (null
included); one with a default is left out when it is None, as ZStack's Gson does.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, WithJsonSchema

from cbt_agent.contract.constants import (
    BITMAP_PATTERN,
    DEFAULT_GRANULARITY,
    MAX_DESCRIPTION,
    MAX_NAME,
    PSK_IDENTITY_PATTERN,
    PSK_KEY_PATTERN,
    BackupMode,
    ResourceType,
)
from cbt_agent.contract.wire import Uuid, WireModel, ZStackDate
from cbt_agent.model import TaskStatus

__all__ = [
    "ApiJobResult",
    "CbtTaskInventory",
    "CbtTaskResourceRefInventory",
    "ChangedArea",
    "ChangedAreasPage",
    "EnableCbtTaskReply",
    "ErrorCode",
    "ErrorReply",
    "ExportNbdVolumesReply",
    "Health",
    "InventoryReply",
    "JobLocation",
    "QueryCbtTaskReply",
    "UnexportNbdVolumesReply",
    "VolumeCbtBackupInfo",
    "VolumeTO",
]

SchemaMap = Annotated[
    dict[str, str],
    Field(description="ZStack's `schema` map: JSON path of each object -> its Java class"),
]
NbdPort = Annotated[str, Field(pattern="^[1-9][0-9]{0,4}$")]


class ErrorCode(WireModel):
    """ZStack's ErrorCode. Bad input is SYS.1007 naming the field; an unknown session token
    ID.1001; an internal fault SYS.1000."""

    code: str = Field(examples=["SYS.1007"])
    description: str
    details: str
    elaboration: str | None = None
    location: str | None = None
    cost: str | None = None
    opaque: dict[str, Any] | None = None
    cause: ErrorCode | None = None


class ErrorReply(WireModel):
    error: ErrorCode


class JobLocation(WireModel):
    location: str = Field(description="<base URL>/zstack/v1/api-jobs/<job uuid>: poll it")
    api_timeout: int | None = None


class CbtTaskResourceRefInventory(WireModel):
    """One resource a task covers (its VM, or a volume)."""

    java_class: ClassVar[str | None] = "org.zstack.header.cbt.CbtTaskResourceRefInventory"

    id: int
    task_uuid: Uuid
    resource_uuid: Uuid = Field(description="the VM or volume")
    resource_type: ResourceType
    create_date: ZStackDate
    last_op_date: ZStackDate


class CbtTaskInventory(WireModel):
    """A CBT task (org.zstack.header.cbt.CbtTaskInventory)."""

    java_class: ClassVar[str | None] = "org.zstack.header.cbt.CbtTaskInventory"

    uuid: Uuid
    name: str = Field(max_length=MAX_NAME)
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION)
    status: TaskStatus
    create_date: ZStackDate
    last_op_date: ZStackDate = Field(description="last status change")
    resource_refs: list[CbtTaskResourceRefInventory]


# The keys of an inventory (what `fields=` may name).
INVENTORY_FIELDS: tuple[str, ...] = tuple(
    f.alias or name for name, f in CbtTaskInventory.model_fields.items()
)


class VolumeTO(WireModel):
    """The disk (org.zstack.kvm.VolumeTO)."""

    java_class: ClassVar[str | None] = "org.zstack.kvm.VolumeTO"

    volume_uuid: Uuid = Field(description="the volume (the disk's <serial>)")
    install_path: str
    device_id: int
    device_type: str = Field(examples=["file"])
    format: str = Field(examples=["qcow2"])
    use_virtio: bool


class VolumeCbtBackupInfo(WireModel):
    """One disk's export after an Enable (org.zstack.header.cbt.VolumeCbtBackupInfo plus
    extension fields, which `metadata` repeats as a JSON string for ZStack's Java SDK)."""

    java_class: ClassVar[str | None] = "org.zstack.header.cbt.VolumeCbtBackupInfo"
    # what ZStack's SDK drops, so `metadata` repeats it
    EXTENSION: ClassVar[frozenset[str]] = frozenset(
        {
            "export_name",
            "dirty_bitmap_context",
            "since_bitmap_name",
            "reason",
            "granularity",
            "size",
            "changed_bytes",
            "quiesced",
            "nbd_socket",
            "nbd_tls",
            "nbd_tls_psk_identity",
            "nbd_tls_psk",
            "scratch_budget",
        }
    )

    volume: VolumeTO
    mode: BackupMode
    bitmap_name: str = Field(
        pattern=BITMAP_PATTERN,
        description="the checkpoint this Enable cut (the same on every disk); pass it as "
        "bitmapName to a later Enable for the changes since it",
    )
    export_name: str = Field(description="NBD export name (= volumeUuid)")
    dirty_bitmap_context: str | None = Field(
        description="NBD meta context of the changes, e.g. qemu:dirty-bitmap:<name>; null for "
        "full (use base:allocation)"
    )
    since_bitmap_name: str | None = Field(
        description="the checkpoint the changes are counted from; null for full"
    )
    reason: str | None = Field(description="why full; null for incremental")
    granularity: int = Field(default=DEFAULT_GRANULARITY, ge=1, description="bytes per bit")
    size: int = Field(ge=0, description="virtual disk size, bytes")
    changed_bytes: int = Field(ge=0)
    quiesced: bool = Field(
        default=False,
        description="the guest's filesystems were frozen through its guest agent for the "
        "checkpoint (application-consistent); false: crash-consistent",
    )
    scratch_budget: int | None = Field(
        default=None,
        ge=0,
        description="bytes of scratch this disk's export may fill with the old data of what the "
        "guest overwrites while it is open (checkpoints.scratch_budget); past it, or with the "
        "scratch filesystem down to its reserve, the export breaks: its reads fail and the task "
        "goes Stopped saying why. A client that trims each range after reading it frees its "
        "scratch. Absent from an offline export (nothing writes to a shut-off VM's disks)",
    )
    nbd_socket: str | None = Field(
        default=None,
        description='NBD unix socket, owner-only (with [nbd] transport = "unix", instead of '
        "nbdServer and nbdPort; absent otherwise)",
    )
    nbd_tls: Literal[True] | None = Field(
        default=None,
        description="the NBD server requires TLS: with nbdTlsPsk, prove the pre-shared key; "
        "without, x509 (verify the server against the CA that signed its certificate); absent "
        "when it does not",
    )
    nbd_tls_psk_identity: str | None = Field(
        default=None,
        pattern=PSK_IDENTITY_PATTERN,
        description='with [nbd] tls = "psk": the TLS-PSK identity (username) a client presents '
        "(libnbd set_tls_username); made fresh by each Enable; absent otherwise",
    )
    nbd_tls_psk: str | None = Field(
        default=None,
        pattern=PSK_KEY_PATTERN,
        description='with [nbd] tls = "psk": the TLS pre-shared key, hex, for this Enable\'s '
        "exports only (a keys file line `identity:key` for libnbd set_tls_psk_file); void once "
        "the task is disabled or enabled again; absent otherwise",
    )
    nbd_server: str | None = Field(default=None, description="NBD host; absent with nbdSocket")
    nbd_port: NbdPort | None = Field(
        default=None,
        description="NBD TCP port, as a string (ZStack's SDK types it String); absent with "
        "nbdSocket",
        examples=["10501"],
    )
    bitmap_base64: str = Field(
        description="bit i set = cluster i changed, LSB first within each byte"
    )
    target: str = Field(description="scratch file behind the view")
    scratch_node_name: str
    metadata: str = Field(
        description="JSON object text repeating exportName, dirtyBitmapContext, "
        "sinceBitmapName, reason, granularity, size, changedBytes, quiesced, and nbdSocket, "
        "nbdTls, nbdTlsPskIdentity and nbdTlsPsk when present"
    )

    @classmethod
    def build(cls, **fields: Any) -> VolumeCbtBackupInfo:
        """An info from its fields (Python names), `metadata` made from them."""
        info = cls(**fields, metadata="")
        extension = info.model_dump(mode="json", include=set(cls.EXTENSION))
        return info.model_copy(update={"metadata": json.dumps(extension, separators=(",", ":"))})


class InventoryReply(WireModel):
    """CreateCbtTask's and DisableCbtTask's result."""

    inventory: CbtTaskInventory
    schema_map: SchemaMap | None = Field(default=None, alias="schema")


class EnableCbtTaskReply(WireModel):
    volume_cbt_backup_infos: list[VolumeCbtBackupInfo]
    schema_map: SchemaMap | None = Field(default=None, alias="schema")


class ExportNbdVolumesReply(WireModel):
    """ExportNbdVolumes' result: one info per exported disk, as an Enable's (`target` is the
    disk's top image, `scratchNodeName` its node in the VM's qemu-storage-daemon)."""

    volume_infos: list[VolumeCbtBackupInfo]
    schema_map: SchemaMap | None = Field(default=None, alias="schema")


class UnexportNbdVolumesReply(WireModel):
    """UnexportNbdVolumes' result: ZStack's `{}`, with what ended when an export was open
    (extension fields, absent otherwise)."""

    volume_uuids: list[Uuid] | None = Field(default=None, description="the volumes unexported")
    storage_daemon_pid: int | None = Field(
        default=None, description="the qemu-storage-daemon stopped (absent: it had exited)"
    )
    released_images: list[str] | None = Field(
        default=None, description="the image files whose locks it held: the VM can start"
    )
    start_refused: str | None = Field(
        default=None,
        description="QEMU's error when a start of the VM failed while the images were held "
        '(e.g. Failed to get "write" lock): start it again now',
    )
    message: str | None = Field(default=None, description="the same, as the task's history says")


class ApiJobResult(WireModel):
    """A finished job's result: {inventory} (Create, Disable), {volumeCbtBackupInfos} (Enable),
    {volumeInfos} (ExportNbdVolumes) or {} (Delete; UnexportNbdVolumes, with what it ended);
    `schema` when the submitting request sent X-JSON-Schema."""

    inventory: CbtTaskInventory | None = None
    volume_cbt_backup_infos: list[VolumeCbtBackupInfo] | None = None
    volume_infos: list[VolumeCbtBackupInfo] | None = None  # ExportNbdVolumes
    # UnexportNbdVolumes, when an export was open (see UnexportNbdVolumesReply)
    volume_uuids: list[Uuid] | None = None
    storage_daemon_pid: int | None = None
    released_images: list[str] | None = None
    start_refused: str | None = None
    message: str | None = None
    schema_map: SchemaMap | None = Field(default=None, alias="schema")


class QueryCbtTaskReply(WireModel):
    """{inventories, total?, schema?}; with count=true only {total}. With `fields`, each
    inventory carries only those keys."""

    model_config = ConfigDict(
        json_schema_extra={"anyOf": [{"required": ["inventories"]}, {"required": ["total"]}]}
    )

    inventories: (
        Annotated[
            list[CbtTaskInventory],
            WithJsonSchema(
                {
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/CbtTaskInventoryFields"},
                }
            ),
        ]
        | None
    ) = None
    total: int | None = Field(default=None, ge=0)
    schema_map: SchemaMap | None = Field(default=None, alias="schema")


class ChangedArea(WireModel):
    start: int = Field(ge=0)
    length: int = Field(ge=1)


class ChangedAreasPage(WireModel):
    """One page of a disk's changed areas (maximal runs) in the current checkpoint; continue at
    nextOffset (null: done)."""

    volume_uuid: Uuid
    size: int = Field(ge=0)
    granularity: int = Field(ge=1)
    mode: BackupMode
    bitmap_name: str
    since_bitmap_name: str | None
    start_offset: int = Field(ge=0)
    length: int = Field(ge=0)
    changed_areas: list[ChangedArea]
    next_offset: int | None = Field(ge=0)


class Health(WireModel):
    status: Literal["ok"]
    version: str
