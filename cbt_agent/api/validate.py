"""Requests in, commands out: a body (and path and query values) validated by the contract's
models and turned into the engine's typed command. Refusals are `InvalidArgument` naming the
field (ZStack SYS.1007), raised inside the api job as ZStack does."""

from __future__ import annotations

from cbt_agent import commands
from cbt_agent.contract.requests import (
    CreateCbtTaskRequest,
    DisableCbtTaskRequest,
    EnableCbtTaskRequest,
    ExportNbdVolumesRequest,
    parse_delete_mode,
    require_uuid,
    validate,
)
from cbt_agent.errors import InvalidArgument

__all__ = [
    "create_task",
    "delete_task",
    "disable_task",
    "enable_task",
    "export_volumes",
    "require_uuid",
    "unexport_volumes",
]


def create_task(body: object) -> commands.CreateTask:
    """CreateCbtTask: `{"params": {name, description?, vmInstanceUuid | resourceUuids[0],
    resourceUuid?, tagUuids?}, systemTags?, userTags?}`; unknown keys are ignored as in ZStack."""
    params = validate(CreateCbtTaskRequest, body).params
    assert params.vm_instance_uuid is not None  # the model refuses a body without a VM
    return commands.CreateTask(
        params.name, params.description, params.vm_instance_uuid, params.resource_uuid
    )


def enable_task(task_uuid: str, body: object) -> commands.EnableTask:
    """EnableCbtTask: `{"params": {bitmapName?}, systemTags?: ["quiesce::true|false"]}`."""
    request = validate(EnableCbtTaskRequest, body)
    return commands.EnableTask(
        require_uuid(task_uuid, "uuid"), request.params.bitmap_name, request.quiesce
    )


def disable_task(task_uuid: str, body: object) -> commands.DisableTask:
    """DisableCbtTask: `{"params": {force?}}`."""
    uuid = require_uuid(task_uuid, "uuid")
    return commands.DisableTask(uuid, validate(DisableCbtTaskRequest, body).params.force)


def delete_task(task_uuid: str, force: bool, delete_mode: str | None) -> commands.DeleteTask:
    """DeleteCbtTask: `force` and `deleteMode` (Permissive, the default, or Enforcing) come
    from the query string."""
    mode = parse_delete_mode(delete_mode)
    return commands.DeleteTask(require_uuid(task_uuid, "uuid"), force, mode == "Enforcing")


def _volumes_request(body: object) -> tuple[ExportNbdVolumesRequest, str]:
    request = validate(ExportNbdVolumesRequest, body)
    vm_uuid = request.params.vm_instance_uuid
    if vm_uuid is None:
        raise InvalidArgument("missing mandatory field [vmInstanceUuid]", field="vmInstanceUuid")
    return request, vm_uuid


def export_volumes(body: object) -> commands.ExportVolumes:
    """ExportNbdVolumes: `{"params": {vmInstanceUuid, volumeUuids?, force?, bitmapName?},
    systemTags?: ["bitmapName::<name>"]}`."""
    request, vm_uuid = _volumes_request(body)
    return commands.ExportVolumes(
        vm_uuid,
        tuple(dict.fromkeys(request.params.volume_uuids)),
        request.since,
        bool(request.params.force),
    )


def unexport_volumes(body: object) -> commands.UnexportVolumes:
    """UnexportNbdVolumes: `{"params": {vmInstanceUuid, volumeUuids?}}`."""
    request, vm_uuid = _volumes_request(body)
    return commands.UnexportVolumes(vm_uuid, tuple(dict.fromkeys(request.params.volume_uuids)))
