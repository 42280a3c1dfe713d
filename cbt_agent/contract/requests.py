"""The request bodies of the CBT task API as models, and how a refusal reads.

A ZStack body is ``{"params": {...}, "systemTags": [...], "userTags": [...]}``; unknown keys are
ignored (ZStack's SDK adds ``requestIp`` and others) and a null is the same as an absent key.
Validation raises `InvalidArgument` (ZStack ``SYS.1007``) naming the field, with the message
a caller reads to fix it (`invalid_argument` turns a pydantic error into one).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import ErrorDetails, PydanticCustomError

from cbt_agent.contract.constants import (
    BITMAP_PATTERN,
    BITMAP_TAG,
    DELETE_MODES,
    MAX_DESCRIPTION,
    MAX_NAME,
    QUIESCE_TAG,
    UUID_PATTERN,
    DeleteMode,
)
from cbt_agent.contract.wire import Uuid, check_uuid
from cbt_agent.errors import InvalidArgument

__all__ = [
    "CreateCbtTaskRequest",
    "DisableCbtTaskRequest",
    "EnableCbtTaskRequest",
    "ExportNbdVolumesRequest",
    "invalid_argument",
    "parse_delete_mode",
    "require_uuid",
    "validate",
]

_BITMAP = re.compile(BITMAP_PATTERN)


def _refuse(message: str, field: str | None = None) -> PydanticCustomError:
    """A refusal whose message is final (`field`: the field it names, if not where it arose)."""
    ctx: dict[str, Any] = {"message": message}
    if field is not None:
        ctx["field"] = field
    return PydanticCustomError("cbt", "{message}", ctx)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("cbt_blank", "must not be empty")
    return value


def _zstack_bool(value: object) -> object:
    """true/false, as JSON or as text in any case: what ZStack's SDKs send."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise PydanticCustomError("cbt_bool", "must be true or false")


def _bitmap_name(value: object) -> object:
    if not isinstance(value, str) or not _BITMAP.fullmatch(value):
        raise _refuse(
            "field [bitmapName] must be a checkpoint name returned by an earlier Enable "
            "(letters, digits, '.', '_', ':', '-'; at most 255)"
        )
    return value


def _delete_mode(value: object) -> object:
    mode = value or "Permissive"
    if mode not in DELETE_MODES:
        raise _refuse(f"deleteMode must be Permissive or Enforcing, got {mode!r:.40}")
    return mode


Name = Annotated[StrictStr, Field(min_length=1, max_length=MAX_NAME), AfterValidator(_not_blank)]
Description = Annotated[StrictStr, Field(max_length=MAX_DESCRIPTION)]
_UUID_SCHEMA = {"type": "string", "pattern": UUID_PATTERN}
TagUuid = Annotated[StrictStr, AfterValidator(check_uuid), WithJsonSchema(_UUID_SCHEMA)]
ZBool = Annotated[bool, BeforeValidator(_zstack_bool)]
BitmapName = Annotated[str, BeforeValidator(_bitmap_name), Field(pattern=BITMAP_PATTERN)]
Tags = list[StrictStr]


class RequestModel(BaseModel):
    """A part of a request: camelCase keys, unknown keys ignored, null = absent, no coercion
    beyond what ZStack's SDKs rely on."""

    model_config = ConfigDict(
        strict=True,
        extra="ignore",
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class ZStackBody(RequestModel):
    """ZStack's POST body around the API's own `params`."""

    system_tags: Tags = Field(
        default_factory=list,
        description="ZStack system tags; EnableCbtTask reads quiesce::true (freeze the guest's "
        "filesystems for the checkpoint; fails without a guest agent) and quiesce::false; "
        "others are accepted and not used",
    )
    user_tags: Tags = Field(default_factory=list, description="ZStack user tags (not used)")

    @model_validator(mode="before")
    @classmethod
    def _params_default_to_empty(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("params") is None:
            return {**data, "params": {}}
        return data


class CreateCbtTaskParams(RequestModel):
    """vmInstanceUuid is required; resourceUuids[0] is accepted instead."""

    name: Name
    description: Description | None = None
    vm_instance_uuid: Uuid | None = Field(
        default=None, description="the VM to protect (one task per VM)"
    )
    resource_uuids: Annotated[
        Any,
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "array", "items": _UUID_SCHEMA, "minItems": 1, "maxItems": 1},
                    {"type": "null"},
                ]
            }
        ),
    ] = Field(default=None, description="[the VM], instead of vmInstanceUuid")
    resource_uuid: Uuid | None = Field(
        default=None,
        description="the new task's uuid, chosen by the caller; when the VM's disks carry "
        "bitmaps of a task with this uuid (the VM came from another host, or the agent lost its "
        "database), that task is adopted with the checkpoints they hold",
    )
    tag_uuids: list[TagUuid] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names_one_vm(self) -> CreateCbtTaskParams:
        if self.vm_instance_uuid is not None:
            return self
        resources = self.resource_uuids
        if resources is None:
            raise _refuse("missing mandatory field [vmInstanceUuid]", "vmInstanceUuid")
        if not isinstance(resources, list) or len(resources) != 1:
            raise _refuse("field [resourceUuids] must hold exactly one VM uuid", "resourceUuids")
        try:
            self.vm_instance_uuid = check_uuid(resources[0])
        except PydanticCustomError:
            raise PydanticCustomError(
                "cbt_uuid", "not a uuid", {"field": "resourceUuids", "value": resources[0]}
            ) from None
        return self


class CreateCbtTaskRequest(ZStackBody):
    params: CreateCbtTaskParams


class EnableCbtTaskParams(RequestModel):
    bitmap_name: BitmapName | None = Field(
        default=None, description="changes since this checkpoint; omitted: since the latest"
    )


class EnableCbtTaskRequest(ZStackBody):
    params: EnableCbtTaskParams = Field(default_factory=EnableCbtTaskParams)

    @field_validator("system_tags")
    @classmethod
    def _quiesce_tags(cls, tags: list[str]) -> list[str]:
        for tag in tags:
            if tag.startswith(QUIESCE_TAG) and tag[len(QUIESCE_TAG) :].lower() not in (
                "true",
                "false",
            ):
                raise _refuse(f"system tag [{tag:.60}] must be quiesce::true or quiesce::false")
        return tags

    @property
    def quiesce(self) -> str | None:
        """ "always" | "never" from the last quiesce:: system tag; None: the config decides."""
        chosen: str | None = None
        for tag in self.system_tags:
            if tag.startswith(QUIESCE_TAG):
                value = tag[len(QUIESCE_TAG) :].lower()
                chosen = "always" if value == "true" else "never"
        return chosen


class DisableCbtTaskParams(RequestModel):
    force: ZBool = False


class DisableCbtTaskRequest(ZStackBody):
    params: DisableCbtTaskParams = Field(default_factory=DisableCbtTaskParams)


class ExportNbdVolumesParams(RequestModel):
    volume_uuids: list[Uuid] = Field(
        default_factory=list,
        description="the disks to export (UnexportNbdVolumes: the export ends for every disk); "
        "empty: every disk of the VM",
    )
    vm_instance_uuid: Uuid | None = Field(
        default=None, description="the VM, which must not be running (mandatory)"
    )
    force: ZBool | None = Field(
        default=None,
        description="ExportNbdVolumes: end an offline export already open and export again, "
        "instead of refusing",
    )
    bitmap_name: BitmapName | None = Field(
        default=None,
        description="ExportNbdVolumes (an extension): changes since this checkpoint; omitted: "
        "since the latest handed out (also as the system tag bitmapName::<name>)",
    )


class ExportNbdVolumesRequest(ZStackBody):
    """ZStack's ExportNbdVolumes and UnexportNbdVolumes: the disks of a VM that is not running,
    exported read-only over NBD by a qemu-storage-daemon (and the export ended)."""

    params: ExportNbdVolumesParams = Field(default_factory=ExportNbdVolumesParams)

    @field_validator("system_tags")
    @classmethod
    def _bitmap_tags(cls, tags: list[str]) -> list[str]:
        for tag in tags:
            if tag.startswith(BITMAP_TAG):
                _bitmap_name(tag[len(BITMAP_TAG) :])
        return tags

    @property
    def since(self) -> str | None:
        """The checkpoint to count from: params.bitmapName, else a bitmapName:: system tag."""
        if self.params.bitmap_name is not None:
            return self.params.bitmap_name
        chosen: str | None = None
        for tag in self.system_tags:
            if tag.startswith(BITMAP_TAG):
                chosen = tag[len(BITMAP_TAG) :]
        return chosen


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------

# How each kind of refusal reads: `field` is the field's wire name, `input` the value's repr.
_MESSAGES = {
    "missing": "missing mandatory field [{field}]",
    "string_type": "field [{field}] must be a string",
    "list_type": "field [{field}] must be a list of strings",
    "model_type": "field [{field}] must be a JSON object",
    "model_attributes_type": "field [{field}] must be a JSON object",
    "dict_type": "field [{field}] must be a JSON object",
    "string_too_short": "field [{field}] must not be empty",
    "cbt_blank": "field [{field}] must not be empty",
    "cbt_bool": "field [{field}] must be true or false",
    "cbt_uuid": "{field} must be a uuid of 32 hex characters without dashes, got {input:.80}",
}


def invalid_argument(error: ValidationError, field: str | None = None) -> InvalidArgument:
    """The `InvalidArgument` for the first refusal in `error`, naming the field (the last name
    in its location, or `field` for a bare value)."""
    first: ErrorDetails = error.errors()[0]
    ctx = first.get("ctx") or {}
    names = [part for part in first["loc"] if isinstance(part, str)]
    name = ctx.get("field") or (names[-1] if names else field)
    if name is None:
        return InvalidArgument("the request body must be a JSON object", field="body")
    kind = first["type"]
    if kind == "cbt":
        return InvalidArgument(str(ctx["message"]), field=name)
    if kind == "string_type" and first["loc"] and isinstance(first["loc"][-1], int):
        kind = "list_type"  # an element of a list of strings
    if kind == "string_too_long":
        return InvalidArgument(
            f"field [{name}] is {len(first['input'])} characters, more than the maximum "
            f"{ctx['max_length']}",
            field=name,
        )
    template = _MESSAGES.get(kind, "field [{field}] is invalid: {msg}")
    value = ctx["value"] if "value" in ctx else first["input"]
    message = template.format(field=name, input=repr(value), msg=first["msg"])
    return InvalidArgument(message, field=name)


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: object) -> M:
    """`data` as a `model`; `InvalidArgument` naming the field otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise invalid_argument(e) from None


_UUID_VALUE = TypeAdapter(Uuid)
_DELETE_MODE = TypeAdapter(Annotated[DeleteMode, BeforeValidator(_delete_mode)])


def require_uuid(value: object, field: str) -> str:
    """`value` as a ZStack uuid (lower case); `InvalidArgument` naming `field` otherwise."""
    try:
        return _UUID_VALUE.validate_python(value)
    except ValidationError as e:
        raise invalid_argument(e, field) from None


def parse_delete_mode(value: str | None) -> DeleteMode:
    """DeleteCbtTask's deleteMode: Permissive (the default) or Enforcing."""
    try:
        return _DELETE_MODE.validate_python(value)
    except ValidationError as e:
        raise invalid_argument(e, "deleteMode") from None
