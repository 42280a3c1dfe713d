"""The OpenAPI 3.1 description of the HTTP API (served at ``<prefix>/openapi.json``).

A pure function of the prefix. The schemas (request bodies, replies, ErrorCode) are generated
from the wire models of `cbt_agent.contract`, the same models that validate requests and write
replies; the paths here say which route takes and answers which: every route
`cbt_agent.api.app` registers, with its parameters, the security scheme and every status a route
can answer (202 ``{"location"}``, 200 bodies, plain-text 400/404/405/413 REST-layer faults, 503
``{"error": ErrorCode}``). ``/healthz`` and ``/metrics`` live at the root, whatever the prefix.
"""

from __future__ import annotations

from typing import Any, Final

from cbt_agent import __version__
from cbt_agent.contract.constants import DELETE_MODES, QUERY_FIELDS, QUERY_LIMIT, UUID_PATTERN
from cbt_agent.contract.openapi import component_schemas
from cbt_agent.contract.replies import INVENTORY_FIELDS

__all__ = ["OPENAPI_VERSION", "openapi_document"]

OPENAPI_VERSION: Final = "3.1.0"

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


def _body(model: str, description: str, *, required: bool) -> Schema:
    """ZStack's POST body: ``{"params": {...}, "systemTags": [...], "userTags": [...]}``;
    unknown keys are ignored (ZStack's SDK adds ``requestIp`` and others)."""
    return {
        "description": description,
        "required": required,
        "content": {"application/json": {"schema": _schema(model)}},
    }


def _components() -> Schema:
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
        "schemas": component_schemas(),
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
            "schema": {"type": "integer", "minimum": 0, "default": QUERY_LIMIT},
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
            "schema": {
                "type": "array",
                "items": {"type": "string", "enum": list(INVENTORY_FIELDS)},
            },
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
                _body("CreateCbtTaskRequest", "The task to create.", required=True),
            )
        },
        f"{prefix}/cbt-task/exportvolume": {
            "post": _async_operation(
                "ExportNbdVolumes",
                "Export the disks of a VM that is not running read-only over NBD (a "
                "qemu-storage-daemon per VM), with a checkpoint cut offline and the changes "
                "since the base (job result: {volumeInfos}). The VM's task goes Running; the "
                "daemon holds the images' locks (the VM cannot start) until UnexportNbdVolumes.",
                [],
                _body("ExportNbdVolumesRequest", "The VM and its disks.", required=True),
            )
        },
        f"{prefix}/cbt-task/unexportvolume": {
            "post": _async_operation(
                "UnexportNbdVolumes",
                "End the VM's offline export: its qemu-storage-daemon stopped, the images' "
                "locks released (job result: {} with what ended, when something was exported).",
                [],
                _body("ExportNbdVolumesRequest", "The VM (vmInstanceUuid).", required=True),
            )
        },
        f"{prefix}/cbt-task/enable/{{uuid}}": {
            "post": _async_operation(
                "EnableCbtTask",
                "Cut a checkpoint and export every disk (job result: {volumeCbtBackupInfos}).",
                [_parameter("TaskUuid")],
                _body(
                    "EnableCbtTaskRequest",
                    "Optional: the checkpoint to count from.",
                    required=False,
                ),
            )
        },
        f"{prefix}/cbt-task/disable/{{uuid}}": {
            "post": _async_operation(
                "DisableCbtTask",
                "End the task's exports (job result: {inventory}).",
                [_parameter("TaskUuid")],
                _body("DisableCbtTaskRequest", "Optional: force.", required=False),
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
                            "enum": list(DELETE_MODES),
                            "default": DELETE_MODES[0],
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
                    "200": _json_response("One page of areas.", _schema("ChangedAreasPage")),
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
                    "200": _json_response("OpenAPI 3.1 document.", json_object),
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
    """The OpenAPI 3.1 document of the API served under ``prefix`` (a new dict each call)."""
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
