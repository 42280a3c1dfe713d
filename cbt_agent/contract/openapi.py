"""The OpenAPI 3.1 components generated from the wire models: every request body, reply object
and ErrorCode the API speaks, as JSON Schema (validation form: what may be sent or read)."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, models_json_schema
from pydantic_core import core_schema

from cbt_agent.contract import replies, requests

__all__ = ["MODELS", "component_schemas"]

# every model whose schema the document holds; the ones they use come along
MODELS: tuple[type[BaseModel], ...] = (
    replies.ErrorCode,
    replies.ErrorReply,
    replies.JobLocation,
    replies.CbtTaskResourceRefInventory,
    replies.CbtTaskInventory,
    replies.VolumeTO,
    replies.VolumeCbtBackupInfo,
    replies.InventoryReply,
    replies.EnableCbtTaskReply,
    replies.ExportNbdVolumesReply,
    replies.UnexportNbdVolumesReply,
    replies.ApiJobResult,
    replies.QueryCbtTaskReply,
    replies.ChangedArea,
    replies.ChangedAreasPage,
    replies.Health,
    requests.CreateCbtTaskRequest,
    requests.EnableCbtTaskRequest,
    requests.DisableCbtTaskRequest,
    requests.ExportNbdVolumesRequest,
)


class _Schema(GenerateJsonSchema):
    """pydantic's JSON Schema without a title on every property (the name says it)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def model_schema(self, schema: core_schema.ModelSchema) -> dict[str, Any]:
        out = super().model_schema(schema)
        out.pop("title", None)
        return out


def component_schemas() -> dict[str, Any]:
    """``components.schemas``: one per model (by class name), plus CbtTaskInventoryFields (an
    inventory as a query with `fields` returns it: any of its keys) and Empty."""
    _, top = models_json_schema(
        [(m, "validation") for m in MODELS],
        ref_template="#/components/schemas/{model}",
        schema_generator=_Schema,
    )
    schemas: dict[str, Any] = top["$defs"]
    partial = copy.deepcopy(schemas["CbtTaskInventory"])
    partial.pop("required", None)
    partial["description"] = (
        "A CbtTaskInventory as a query returns it: with `fields`, only those keys."
    )
    schemas["CbtTaskInventoryFields"] = partial
    schemas["Empty"] = {"type": "object"}
    return dict(sorted(schemas.items()))
