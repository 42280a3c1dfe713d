"""The OpenAPI 3.0.3 description of the HTTP API (served at ``<prefix>/openapi.json``).

A pure function of the prefix: every route `cbt_agent.api.app` registers, with its parameters,
request bodies, the security scheme and every status a route can answer (202 ``{"location"}``,
200 bodies, plain-text 400/404/405/413 REST-layer faults, 503 ``{"error": ErrorCode}``).
``/healthz`` and ``/metrics`` live at the root, whatever the prefix.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from cbt_agent import __version__

__all__ = ["OPENAPI_VERSION", "openapi_document"]

OPENAPI_VERSION: Final = "3.0.3"

UUID_PATTERN: Final = "^[0-9a-fA-F]{32}$"
BITMAP_PATTERN: Final = "^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$"
# ZStack's (Gson's default) date form, e.g. "Nov 7, 2026 9:05:03 PM" (server-local time)
DATE_PATTERN: Final = r"^[A-Z][a-z]{2} \d{1,2}, \d{4} \d{1,2}:\d{2}:\d{2} (AM|PM)$"
INVENTORY_FIELDS: Final = (
    "uuid",
    "name",
    "description",
    "status",
    "createDate",
    "lastOpDate",
    "resourceRefs",
)
QUERY_FIELDS: Final = (
    "uuid",
    "name",
    "description",
    "status",
    "createDate",
    "lastOpDate",
    "resourceRefs.resourceUuid",
    "resourceRefs.resourceType",
    "resourceRefs.taskUuid",
    "resourceRefs.id",
)
TASK_STATUSES: Final = ("Created", "Starting", "Running", "Stopped", "Failed")

Schema = dict[str, Any]


def _schema(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _response(name: str) -> Schema:
    return {"$ref": f"#/components/responses/{name}"}


def _parameter(name: str) -> Schema:
    return {"$ref": f"#/components/parameters/{name}"}


def _json_response(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _text_response(description: str) -> Schema:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


def _uuid(description: str) -> Schema:
    return {"type": "string", "pattern": UUID_PATTERN, "description": description}


def _date(description: str) -> Schema:
    return {
        "type": "string",
        "pattern": DATE_PATTERN,
        "description": f"{description}; ZStack's form, server-local time",
        "example": "Nov 7, 2026 9:05:03 PM",
    }


def _string_list(description: str) -> Schema:
    return {"type": "array", "items": {"type": "string"}, "description": description}


def _body(params: Schema, description: str, *, required: bool) -> Schema:
    """ZStack's POST body: ``{"params": {...}, "systemTags": [...], "userTags": [...]}``;
    unknown keys are ignored (ZStack's SDK adds ``requestIp`` and others)."""
    body: Schema = {
        "type": "object",
        "properties": {
            "params": params,
            "systemTags": _string_list(
                "ZStack system tags; EnableCbtTask reads quiesce::true (freeze the guest's "
                "filesystems for the checkpoint; fails without a guest agent) and quiesce::false; "
                "others are accepted and not used"
            ),
            "userTags": _string_list("ZStack user tags (accepted, not used)"),
        },
        "additionalProperties": True,
    }
    if required:
        body["required"] = ["params"]
    return {
        "description": description,
        "required": required,
        "content": {"application/json": {"schema": body}},
    }


def _components() -> Schema:
    error_code: Schema = {
        "type": "object",
        "description": "ZStack's ErrorCode. Bad input is SYS.1007 naming the field; an unknown "
        "session token ID.1001; an internal fault SYS.1000.",
        "required": ["code", "description", "details"],
        "properties": {
            "code": {"type": "string", "example": "SYS.1007"},
            "description": {"type": "string"},
            "details": {"type": "string"},
            "elaboration": {"type": "string"},
            "location": {"type": "string"},
            "cost": {"type": "string"},
            "opaque": {"type": "object", "additionalProperties": True},
            "cause": _schema("ErrorCode"),
        },
        "additionalProperties": True,
    }
    resource_ref: Schema = {
        "type": "object",
        "description": "One resource a task covers (its VM, or a volume).",
        "required": ["id", "taskUuid", "resourceUuid", "resourceType"],
        "properties": {
            "id": {"type": "integer", "format": "int64"},
            "taskUuid": _uuid("the task"),
            "resourceUuid": _uuid("the VM or volume"),
            "resourceType": {"type": "string", "enum": ["VmInstanceVO", "VolumeVO"]},
            "createDate": _date("when the ref was made"),
            "lastOpDate": _date("last change"),
        },
        "additionalProperties": True,
    }
    inventory_properties: Schema = {
        "uuid": _uuid("the task's uuid"),
        "name": {"type": "string", "maxLength": 255},
        "description": {"type": "string", "maxLength": 2048, "description": "absent when unset"},
        "status": {"type": "string", "enum": list(TASK_STATUSES)},
        "createDate": _date("creation time"),
        "lastOpDate": _date("last status change"),
        "resourceRefs": {"type": "array", "items": _schema("CbtTaskResourceRefInventory")},
    }
    inventory: Schema = {
        "type": "object",
        "description": "A CBT task (org.zstack.header.cbt.CbtTaskInventory).",
        "required": ["uuid", "name", "status", "createDate", "lastOpDate", "resourceRefs"],
        "properties": inventory_properties,
        "additionalProperties": True,
    }
    partial_inventory: Schema = {
        "type": "object",
        "description": "A CbtTaskInventory as a query returns it: with `fields`, only those keys.",
        "properties": copy.deepcopy(inventory_properties),
        "additionalProperties": True,
    }
    volume_to: Schema = {
        "type": "object",
        "description": "The disk (org.zstack.kvm.VolumeTO).",
        "required": ["volumeUuid", "installPath", "deviceId", "format"],
        "properties": {
            "volumeUuid": _uuid("the volume (the disk's <serial>)"),
            "installPath": {"type": "string"},
            "deviceId": {"type": "integer"},
            "deviceType": {"type": "string", "example": "file"},
            "format": {"type": "string", "example": "qcow2"},
            "useVirtio": {"type": "boolean"},
        },
        "additionalProperties": True,
    }
    backup_info: Schema = {
        "type": "object",
        "description": "One disk's export after an Enable "
        "(org.zstack.header.cbt.VolumeCbtBackupInfo plus extension fields, which `metadata` "
        "repeats as a JSON string for ZStack's Java SDK).",
        "required": [
            "volume",
            "mode",
            "bitmapName",
            "sinceBitmapName",
            "reason",
            "exportName",
            "dirtyBitmapContext",
            "granularity",
            "size",
            "changedBytes",
            "bitmapBase64",
            "target",
            "scratchNodeName",
            "metadata",
        ],
        "properties": {
            "volume": _schema("VolumeTO"),
            "mode": {"type": "string", "enum": ["full", "incremental"]},
            "bitmapName": {
                "type": "string",
                "pattern": BITMAP_PATTERN,
                "description": "the checkpoint this Enable cut (the same on every disk); pass it "
                "as bitmapName to a later Enable for the changes since it",
            },
            "sinceBitmapName": {
                "type": "string",
                "nullable": True,
                "description": "the checkpoint the changes are counted from; null for full",
            },
            "reason": {
                "type": "string",
                "nullable": True,
                "description": "why full; null for incremental",
            },
            "nbdServer": {
                "type": "string",
                "nullable": True,
                "description": "NBD host; null when the export is on a unix socket (nbdSocket)",
            },
            "nbdPort": {
                "type": "string",
                "nullable": True,
                "pattern": "^[1-9][0-9]{0,4}$",
                "description": "NBD TCP port, as a string (ZStack's SDK types it String); null "
                "when the export is on a unix socket (nbdSocket)",
                "example": "10501",
            },
            "nbdSocket": {
                "type": "string",
                "description": 'NBD unix socket, owner-only (with [nbd] transport = "unix", '
                "instead of nbdServer and nbdPort; absent otherwise)",
            },
            "nbdTls": {
                "type": "boolean",
                "enum": [True],
                "description": "the NBD server requires TLS (x509, verify against the CA that "
                "signed its certificate); absent when it does not",
            },
            "exportName": {"type": "string", "description": "NBD export name (= volumeUuid)"},
            "dirtyBitmapContext": {
                "type": "string",
                "nullable": True,
                "description": "NBD meta context of the changes, e.g. qemu:dirty-bitmap:<name>; "
                "null for full (use base:allocation)",
            },
            "granularity": {"type": "integer", "minimum": 1, "description": "bytes per bit"},
            "size": {"type": "integer", "minimum": 0, "description": "virtual disk size, bytes"},
            "changedBytes": {"type": "integer", "minimum": 0},
            "bitmapBase64": {
                "type": "string",
                "format": "byte",
                "description": "bit i set = cluster i changed, LSB first within each byte",
            },
            "target": {"type": "string", "description": "scratch file behind the view"},
            "scratchNodeName": {"type": "string"},
            "quiesced": {
                "type": "boolean",
                "description": "the guest's filesystems were frozen through its guest agent "
                "for the checkpoint (application-consistent); false: crash-consistent",
            },
            "metadata": {
                "type": "string",
                "description": "JSON object text repeating exportName, dirtyBitmapContext, "
                "sinceBitmapName, reason, granularity, size, changedBytes, quiesced, and "
                "nbdSocket and nbdTls when present",
            },
        },
        "additionalProperties": True,
    }
    schema_map: Schema = {
        "type": "object",
        "description": "ZStack's `schema` map: JSON path of each object -> its Java class.",
        "additionalProperties": {"type": "string"},
    }
    return {
        "securitySchemes": {
            "OAuth": {
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": "`OAuth <token>` with a token from the agent's config. Missing or "
                "another scheme: 400 (plain text); unknown token: 503 ID.1001.",
            }
        },
        "schemas": {
            "ErrorCode": error_code,
            "ErrorReply": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": _schema("ErrorCode")},
                "additionalProperties": True,
            },
            "JobLocation": {
                "type": "object",
                "required": ["location"],
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "<base URL>/zstack/v1/api-jobs/<job uuid>: poll it",
                    },
                    "apiTimeout": {"type": "integer"},
                },
                "additionalProperties": True,
            },
            "CbtTaskResourceRefInventory": resource_ref,
            "CbtTaskInventory": inventory,
            "CbtTaskInventoryFields": partial_inventory,
            "VolumeTO": volume_to,
            "VolumeCbtBackupInfo": backup_info,
            "SchemaMap": schema_map,
            "InventoryReply": {
                "type": "object",
                "description": "CreateCbtTask's and DisableCbtTask's result.",
                "required": ["inventory"],
                "properties": {"inventory": _schema("CbtTaskInventory"), "schema": schema_map},
                "additionalProperties": True,
            },
            "EnableCbtTaskReply": {
                "type": "object",
                "required": ["volumeCbtBackupInfos"],
                "properties": {
                    "volumeCbtBackupInfos": {
                        "type": "array",
                        "items": _schema("VolumeCbtBackupInfo"),
                    },
                    "schema": schema_map,
                },
                "additionalProperties": True,
            },
            "ApiJobResult": {
                "type": "object",
                "description": "A finished job's result: {inventory} (Create, Disable), "
                "{volumeCbtBackupInfos} (Enable) or {} (Delete); `schema` when the submitting "
                "request sent X-JSON-Schema.",
                "properties": {
                    "inventory": _schema("CbtTaskInventory"),
                    "volumeCbtBackupInfos": {
                        "type": "array",
                        "items": _schema("VolumeCbtBackupInfo"),
                    },
                    "schema": schema_map,
                },
                "additionalProperties": True,
            },
            "QueryCbtTaskReply": {
                "type": "object",
                "description": "{inventories, total?, schema?}; with count=true only {total}.",
                "properties": {
                    "inventories": {
                        "type": "array",
                        "items": _schema("CbtTaskInventoryFields"),
                    },
                    "total": {"type": "integer", "minimum": 0},
                    "schema": schema_map,
                },
                "anyOf": [{"required": ["inventories"]}, {"required": ["total"]}],
                "additionalProperties": True,
            },
            "ChangedArea": {
                "type": "object",
                "required": ["start", "length"],
                "properties": {
                    "start": {"type": "integer", "minimum": 0},
                    "length": {"type": "integer", "minimum": 1},
                },
                "additionalProperties": False,
            },
            "ChangedAreasReply": {
                "type": "object",
                "description": "One page of a disk's changed areas (maximal runs) in the "
                "current checkpoint; continue at nextOffset (null: done).",
                "required": [
                    "volumeUuid",
                    "size",
                    "granularity",
                    "mode",
                    "bitmapName",
                    "sinceBitmapName",
                    "startOffset",
                    "length",
                    "changedAreas",
                    "nextOffset",
                ],
                "properties": {
                    "volumeUuid": _uuid("the volume"),
                    "size": {"type": "integer", "minimum": 0},
                    "granularity": {"type": "integer", "minimum": 1},
                    "mode": {"type": "string", "enum": ["full", "incremental"]},
                    "bitmapName": {"type": "string"},
                    "sinceBitmapName": {"type": "string", "nullable": True},
                    "startOffset": {"type": "integer", "minimum": 0},
                    "length": {"type": "integer", "minimum": 0},
                    "changedAreas": {"type": "array", "items": _schema("ChangedArea")},
                    "nextOffset": {"type": "integer", "minimum": 0, "nullable": True},
                },
                "additionalProperties": True,
            },
            "Health": {
                "type": "object",
                "required": ["status", "version"],
                "properties": {
                    "status": {"type": "string", "enum": ["ok"]},
                    "version": {"type": "string"},
                },
                "additionalProperties": True,
            },
            "Empty": {"type": "object", "additionalProperties": True},
        },
        "parameters": {
            "TaskUuid": {
                "name": "uuid",
                "in": "path",
                "required": True,
                "description": "the task's uuid (another value fails through the job with "
                "SYS.1007)",
                "schema": {"type": "string", "pattern": UUID_PATTERN},
            },
            "XJobUuid": {
                "name": "X-Job-UUID",
                "in": "header",
                "required": False,
                "description": "names the job (32 hex); a repeat or another form is a 400",
                "schema": {"type": "string", "pattern": UUID_PATTERN},
            },
            "XWebHook": {
                "name": "X-Web-Hook",
                "in": "header",
                "required": False,
                "description": "an http(s) URL on a host of api.webhook_hosts: the job's reply is "
                "POSTed there when done (headers X-Job-UUID, X-Job-Success), and stays pollable; "
                "another URL is a 400",
                "schema": {"type": "string"},
            },
            "XJsonSchema": {
                "name": "X-JSON-Schema",
                "in": "header",
                "required": False,
                "description": "present (any value): replies carry ZStack's `schema` map",
                "schema": {"type": "string", "example": "true"},
            },
        },
        "responses": {
            "Accepted": _json_response(
                "Job started: poll `location` (202 while running, 200 result, 503 error).",
                _schema("JobLocation"),
            ),
            "BadRequest": _text_response(
                "REST-layer fault: missing or malformed Authorization, a body that is not a "
                "JSON object, a bad or repeated X-Job-UUID, a refused X-Web-Hook, a q without "
                "an operator."
            ),
            "NotFound": _text_response("No such route, or no such job."),
            "MethodNotAllowed": _text_response("The path exists, the method does not."),
            "PayloadTooLarge": _text_response("The body is larger than api.max_body_bytes."),
            "Error": _json_response(
                "ZStack API error: an unknown token (ID.1001), bad input (SYS.1007), an "
                "operation that cannot be done (SYS.1006), an internal fault (SYS.1000).",
                _schema("ErrorReply"),
            ),
        },
    }


def _async_operation(
    operation_id: str,
    summary: str,
    parameters: list[Schema],
    request_body: Schema | None,
    extra: dict[str, Schema] | None = None,
) -> Schema:
    responses: dict[str, Schema] = {
        "202": _response("Accepted"),
        "400": _response("BadRequest"),
        "404": _response("NotFound"),
        "503": _response("Error"),
    }
    if request_body is not None:
        responses["413"] = _response("PayloadTooLarge")
    responses.update(extra or {})
    op: Schema = {
        "operationId": operation_id,
        "summary": summary,
        "tags": ["CbtTask"],
        "parameters": [
            *parameters,
            _parameter("XJobUuid"),
            _parameter("XWebHook"),
            _parameter("XJsonSchema"),
        ],
        "responses": dict(sorted(responses.items())),
    }
    if request_body is not None:
        op["requestBody"] = request_body
    return op


def _paths(prefix: str) -> Schema:
    create_params: Schema = {
        "type": "object",
        "required": ["name"],
        "description": "vmInstanceUuid is required; resourceUuids[0] is accepted instead.",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 255},
            "description": {"type": "string", "maxLength": 2048},
            "vmInstanceUuid": _uuid("the VM to protect (one task per VM)"),
            "resourceUuids": {
                "type": "array",
                "items": _uuid("the VM"),
                "minItems": 1,
                "maxItems": 1,
            },
            "resourceUuid": _uuid(
                "the new task's uuid, chosen by the caller; when the VM's disks carry bitmaps "
                "of a task with this uuid (the VM came from another host, or the agent lost its "
                "database), that task is adopted with the checkpoints they hold"
            ),
            "tagUuids": {"type": "array", "items": _uuid("a tag")},
        },
        "additionalProperties": True,
    }
    enable_params: Schema = {
        "type": "object",
        "properties": {
            "bitmapName": {
                "type": "string",
                "pattern": BITMAP_PATTERN,
                "description": "changes since this checkpoint; omitted: since the latest",
            }
        },
        "additionalProperties": True,
    }
    disable_params: Schema = {
        "type": "object",
        "properties": {"force": {"type": "boolean", "default": False}},
        "additionalProperties": True,
    }
    export_params: Schema = {
        "type": "object",
        "properties": {
            "volumeUuids": {"type": "array", "items": _uuid("a volume")},
            "vmInstanceUuid": _uuid("the (stopped) VM"),
            "force": {"type": "boolean"},
        },
        "additionalProperties": True,
    }
    not_supported = (
        " Not supported by cbt-agent (it exports disks of running VMs through EnableCbtTask): "
        "the job fails with SYS.1006."
    )
    not_allowed = {"405": _response("MethodNotAllowed")}
    task_path = f"{prefix}/cbt-task/{{uuid}}"
    query_parameters: list[Schema] = [
        {
            "name": "q",
            "in": "query",
            "description": "`<field><op><value>`, repeatable (AND); ops, tried in this order: "
            "!=, >=, <=, !?= (not in), !~= (not like), ~= (like, %), ?= (in, comma list), =, >, "
            "<, `is null`, `not null`. Fields: " + ", ".join(QUERY_FIELDS) + ". No operator: "
            "400; unknown field or bad value: 503 SYS.1007.",
            "style": "form",
            "explode": True,
            "schema": {"type": "array", "items": {"type": "string"}},
            "example": ["status?=Running,Stopped"],
        },
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 0, "default": 1000},
        },
        {"name": "start", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 0}},
        {
            "name": "count",
            "in": "query",
            "description": "true: reply only {total}",
            "schema": {"type": "boolean", "default": False},
        },
        {
            "name": "replyWithCount",
            "in": "query",
            "description": "true: the reply carries total",
            "schema": {"type": "boolean", "default": False},
        },
        {
            "name": "sort",
            "in": "query",
            "description": "+field (ascending), -field (descending) or field",
            "schema": {
                "type": "string",
                "pattern": "^[+-]?(" + "|".join(f.replace(".", r"\.") for f in QUERY_FIELDS) + ")$",
            },
        },
        {
            "name": "fields",
            "in": "query",
            "description": "comma list: inventories carry only these keys",
            "style": "form",
            "explode": False,
            "schema": {"type": "array", "items": {"type": "string", "enum": [*INVENTORY_FIELDS]}},
        },
        _parameter("XJobUuid"),
        _parameter("XJsonSchema"),
    ]
    query_responses: dict[str, Schema] = {
        "200": _json_response("The matching tasks.", _schema("QueryCbtTaskReply")),
        "400": _response("BadRequest"),
        "503": _response("Error"),
    }
    json_object = {"type": "object", "additionalProperties": True}
    return {
        f"{prefix}/cbt-task/create": {
            "post": _async_operation(
                "CreateCbtTask",
                "Create a CBT task for a VM (job result: {inventory}).",
                [],
                _body(create_params, "The task to create.", required=True),
            )
        },
        f"{prefix}/cbt-task/exportvolume": {
            "post": _async_operation(
                "ExportNbdVolumes",
                "ZStack's export of a stopped VM's disks over NBD." + not_supported,
                [],
                _body(export_params, "ZStack's parameters (not used).", required=False),
            )
        },
        f"{prefix}/cbt-task/unexportvolume": {
            "post": _async_operation(
                "UnexportNbdVolumes",
                "ZStack's end of ExportNbdVolumes." + not_supported,
                [],
                _body(export_params, "ZStack's parameters (not used).", required=False),
            )
        },
        f"{prefix}/cbt-task/enable/{{uuid}}": {
            "post": _async_operation(
                "EnableCbtTask",
                "Cut a checkpoint and export every disk (job result: {volumeCbtBackupInfos}).",
                [_parameter("TaskUuid")],
                _body(enable_params, "Optional: the checkpoint to count from.", required=False),
            )
        },
        f"{prefix}/cbt-task/disable/{{uuid}}": {
            "post": _async_operation(
                "DisableCbtTask",
                "End the task's exports (job result: {inventory}).",
                [_parameter("TaskUuid")],
                _body(disable_params, "Optional: force.", required=False),
            )
        },
        task_path: {
            "get": {
                "operationId": "QueryCbtTaskByUuid",
                "summary": "QueryCbtTask for one uuid (synchronous).",
                "tags": ["CbtTask"],
                "parameters": [
                    {
                        "name": "uuid",
                        "in": "path",
                        "required": True,
                        "description": "the task's uuid (any other value matches no task)",
                        "schema": {"type": "string", "pattern": UUID_PATTERN},
                    },
                    *query_parameters,
                ],
                "responses": {
                    **query_responses,
                    "404": _response("NotFound"),
                    **not_allowed,
                },
            },
            "delete": _async_operation(
                "DeleteCbtTask",
                "Delete a task, disabling it first (job result: {}); a missing task succeeds.",
                [
                    _parameter("TaskUuid"),
                    {
                        "name": "force",
                        "in": "query",
                        "schema": {"type": "boolean", "default": False},
                    },
                    {
                        "name": "deleteMode",
                        "in": "query",
                        "schema": {
                            "type": "string",
                            "enum": ["Permissive", "Enforcing"],
                            "default": "Permissive",
                        },
                    },
                ],
                None,
                not_allowed,
            ),
        },
        f"{prefix}/cbt-task": {
            "get": {
                "operationId": "QueryCbtTask",
                "summary": "Query tasks (synchronous).",
                "tags": ["CbtTask"],
                "parameters": query_parameters,
                "responses": query_responses,
            }
        },
        f"{prefix}/cbt-task/{{uuid}}/volumes/{{volumeUuid}}/changed-areas": {
            "get": {
                "operationId": "QueryChangedDiskAreas",
                "summary": "Extension: the changed areas of one disk of a Running task.",
                "tags": ["CbtTask"],
                "parameters": [
                    _parameter("TaskUuid"),
                    {
                        "name": "volumeUuid",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": UUID_PATTERN},
                    },
                    {
                        "name": "startOffset",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "default": 0},
                    },
                    {
                        "name": "length",
                        "in": "query",
                        "description": "bytes to cover; default: to the end of the disk",
                        "schema": {"type": "integer", "minimum": 1},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "description": "areas per page (at most 10000)",
                        "schema": {"type": "integer", "minimum": 1, "default": 10000},
                    },
                ],
                "responses": {
                    "200": _json_response("One page of areas.", _schema("ChangedAreasReply")),
                    "400": _response("BadRequest"),
                    "404": _response("NotFound"),
                    "503": _response("Error"),
                },
            }
        },
        f"{prefix}/api-jobs/{{uuid}}": {
            "get": {
                "operationId": "GetApiJob",
                "summary": "Poll an asynchronous API's job (with the same OAuth token).",
                "tags": ["Jobs"],
                "parameters": [
                    {
                        "name": "uuid",
                        "in": "path",
                        "required": True,
                        "description": "the job uuid from the location",
                        "schema": {"type": "string", "pattern": UUID_PATTERN},
                    },
                    _parameter("XJsonSchema"),
                ],
                "responses": {
                    "200": _json_response("The job's result.", _schema("ApiJobResult")),
                    "202": _json_response("Still running (body {}).", _schema("Empty")),
                    "400": _response("BadRequest"),
                    "404": _response("NotFound"),
                    "503": _response("Error"),
                },
            }
        },
        f"{prefix}/openapi.json": {
            "get": {
                "operationId": "GetOpenApiDocument",
                "summary": "This document.",
                "tags": ["Agent"],
                "security": [],
                "responses": {
                    "200": _json_response("OpenAPI 3.0.3 document.", json_object),
                    "503": _response("Error"),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "Healthz",
                "summary": "Liveness (no auth).",
                "tags": ["Agent"],
                "security": [],
                "responses": {
                    "200": _json_response("Alive.", _schema("Health")),
                    "503": _response("Error"),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "Metrics",
                "summary": "Prometheus metrics: tasks by status, running jobs.",
                "tags": ["Agent"],
                "responses": {
                    "200": _text_response("Prometheus text exposition format."),
                    "400": _response("BadRequest"),
                    "503": _response("Error"),
                },
            }
        },
    }


def openapi_document(prefix: str = "/zstack/v1") -> dict[str, Any]:
    """The OpenAPI 3.0.3 document of the API served under ``prefix`` (a new dict each call)."""
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "cbt-agent",
            "version": __version__,
            "description": "ZStack's CBT task API (CreateCbtTask, EnableCbtTask, DisableCbtTask, "
            "DeleteCbtTask, QueryCbtTask) on a KVM host, with ZStack's REST conventions: "
            "asynchronous APIs answer 202 {location}; polling it gives 202 while running, 200 "
            "with the result, 503 {error: ErrorCode}. Also served under /v1.",
        },
        "servers": [{"url": "/"}],
        "security": [{"OAuth": []}],
        "tags": [
            {"name": "CbtTask", "description": "ZStack's CBT task API"},
            {"name": "Jobs", "description": "Asynchronous API jobs"},
            {"name": "Agent", "description": "The agent itself"},
        ],
        "paths": _paths(prefix),
        "components": _components(),
    }
