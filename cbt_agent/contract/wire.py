"""ZStack's JSON conventions, once: the base of every reply model and the field types they share.

* Gson drops null fields: a field with a default is absent from the JSON when it is None; a
  required field is always there, null included (``sinceBitmapName`` is null for a full).
* Dates are written in ZStack's form (`format_date`) and read in any form its SDKs accept.
* Names are camelCase on the wire, snake_case in Python.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    WithJsonSchema,
    model_serializer,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from cbt_agent.contract.constants import DATE_PATTERN, UUID_PATTERN
from cbt_agent.contract.dates import format_date, parse_date
from cbt_agent.errors import InvalidArgument

__all__ = ["Uuid", "WireModel", "ZStackDate", "check_uuid"]

_UUID = re.compile(UUID_PATTERN)


def check_uuid(value: object) -> str:
    """`value` as a ZStack uuid (lower case); a PydanticCustomError ``cbt_uuid`` otherwise."""
    if not isinstance(value, str) or not _UUID.fullmatch(value):
        raise PydanticCustomError("cbt_uuid", "not a uuid of 32 hex characters without dashes")
    return value.lower()


Uuid = Annotated[
    str,
    BeforeValidator(check_uuid),
    WithJsonSchema({"type": "string", "pattern": UUID_PATTERN}),
]


def _read_date(value: object) -> object:
    if isinstance(value, str):
        try:
            return parse_date(value)
        except InvalidArgument as e:
            raise ValueError(e.message) from None
    return value


ZStackDate = Annotated[
    datetime,
    BeforeValidator(_read_date),
    PlainSerializer(format_date, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": DATE_PATTERN,
            "description": "ZStack's date form, server-local time",
            "examples": ["Nov 7, 2026 9:05:03 PM"],
        }
    ),
]


class WireModel(BaseModel):
    """A reply object. `wire()` is its JSON as ZStack writes it; `model_validate` reads one."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="ignore",  # as ZStack's SDKs: unknown fields are dropped
        frozen=True,
        # a model's validators are built when it is first used, not at import: the backup
        # client uses three of them and starts once per backup
        defer_build=True,
    )
    java_class: ClassVar[str | None] = None  # ZStack's class name, for the `schema` map

    @model_serializer(mode="wrap")
    def _gson(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name, field in type(self).model_fields.items():
                key = field.alias or name
                if not field.is_required() and key in data and data[key] is None:
                    del data[key]
        return data

    def wire(self) -> dict[str, Any]:
        """The JSON object (plain dicts, lists, strings and numbers)."""
        data = self.model_dump(mode="json")
        assert isinstance(data, dict)
        return data
