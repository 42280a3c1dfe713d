"""Validated commands: API parameters checked and turned into plain values. Pure, no I/O.

Every error names the field (ZStack SYS.1007), so a caller knows what to fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cbt_agent.errors import InvalidArgument

_UUID = re.compile(r"^[0-9a-fA-F]{32}$")
_BITMAP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$")


def require_uuid(value: object, field: str) -> str:
    if not isinstance(value, str) or not _UUID.match(value):
        raise InvalidArgument(
            f"{field} must be a uuid of 32 hex characters without dashes, got {value!r:.80}",
            field=field,
        )
    return value.lower()


def _text(params: dict[str, Any], field: str, limit: int, *, required: bool) -> str | None:
    value = params.get(field)
    if value is None:
        if required:
            raise InvalidArgument(f"missing mandatory field [{field}]", field=field)
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f"field [{field}] must be a string", field=field)
    if required and not value.strip():
        raise InvalidArgument(f"field [{field}] must not be empty", field=field)
    if len(value) > limit:
        raise InvalidArgument(
            f"field [{field}] is {len(value)} characters, more than the maximum {limit}",
            field=field,
        )
    return value


def _bool(params: dict[str, Any], field: str, default: bool) -> bool:
    value = params.get(field, default)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InvalidArgument(f"field [{field}] must be true or false", field=field)


def _string_list(params: dict[str, Any], field: str) -> list[str]:
    value = params.get(field)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"field [{field}] must be a list of strings", field=field)
    return list(value)


def _params(body: object, field: str = "params") -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object", field="body")
    params = body.get(field, {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidArgument("field [params] must be a JSON object", field="params")
    return params


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


QUIESCE_TAG = "quiesce::"


@dataclass(frozen=True)
class DisableTask:
    task_uuid: str
    force: bool


@dataclass(frozen=True)
class DeleteTask:
    task_uuid: str
    force: bool
    enforcing: bool


def create_task(body: object) -> CreateTask:
    """CreateCbtTask: `{"params": {name, description?, vmInstanceUuid | resourceUuids[0],
    resourceUuid?, tagUuids?}, systemTags?, userTags?}`; unknown keys are ignored as in ZStack."""
    params = _params(body)
    name = _text(params, "name", 255, required=True)
    assert name is not None
    description = _text(params, "description", 2048, required=False)
    vm = params.get("vmInstanceUuid")
    field = "vmInstanceUuid"
    if vm is None:
        resources = params.get("resourceUuids")
        if resources is not None:
            if not isinstance(resources, list) or len(resources) != 1:
                raise InvalidArgument(
                    "field [resourceUuids] must hold exactly one VM uuid", field="resourceUuids"
                )
            vm, field = resources[0], "resourceUuids"
    if vm is None:
        raise InvalidArgument("missing mandatory field [vmInstanceUuid]", field="vmInstanceUuid")
    vm_uuid = require_uuid(vm, field)
    resource_uuid = params.get("resourceUuid")
    if resource_uuid is not None:
        resource_uuid = require_uuid(resource_uuid, "resourceUuid")
    for tags in ("tagUuids",):
        for tag in _string_list(params, tags):
            require_uuid(tag, tags)
    assert isinstance(body, dict)
    for tags in ("systemTags", "userTags"):
        _string_list(body, tags)
    return CreateTask(name, description, vm_uuid, resource_uuid)


def enable_task(task_uuid: str, body: object) -> EnableTask:
    params = _params(body)
    bitmap = params.get("bitmapName")
    if bitmap is not None and (not isinstance(bitmap, str) or not _BITMAP.match(bitmap)):
        raise InvalidArgument(
            "field [bitmapName] must be a checkpoint name returned by an earlier Enable "
            "(letters, digits, '.', '_', ':', '-'; at most 255)",
            field="bitmapName",
        )
    quiesce: str | None = None
    assert isinstance(body, dict)
    for tag in _string_list(body, "systemTags"):
        if tag.startswith(QUIESCE_TAG):
            value = tag[len(QUIESCE_TAG) :].lower()
            if value not in ("true", "false"):
                raise InvalidArgument(
                    f"system tag [{tag:.60}] must be quiesce::true or quiesce::false",
                    field="systemTags",
                )
            quiesce = "always" if value == "true" else "never"
    return EnableTask(require_uuid(task_uuid, "uuid"), bitmap or None, quiesce)


def disable_task(task_uuid: str, body: object) -> DisableTask:
    params = _params(body)
    return DisableTask(require_uuid(task_uuid, "uuid"), _bool(params, "force", False))


def delete_task(task_uuid: str, force: bool, delete_mode: str | None) -> DeleteTask:
    mode = delete_mode or "Permissive"
    if mode not in ("Permissive", "Enforcing"):
        raise InvalidArgument(
            f"deleteMode must be Permissive or Enforcing, got {mode!r:.40}", field="deleteMode"
        )
    return DeleteTask(require_uuid(task_uuid, "uuid"), force, mode == "Enforcing")
