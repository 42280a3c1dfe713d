"""Checking a JSON value against the contract's JSON Schema (`reply_schema.py`, generated from
the reply models), with the standard library only.

The reference client starts once per backup: loading pydantic and building the models costs
it more than the whole Enable. So it reads the agent's replies against the JSON Schema the same
models generate (the OpenAPI components), through this small checker of the keywords those
schemas use (`KEYWORDS`; a test keeps the generated schema inside them). It is as strict as
the schema: a number where a string belongs, a missing required field, an unknown enum value,
a string that does not match its pattern are each refused with the path of the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from typing import Any

__all__ = ["KEYWORDS", "SchemaMismatch", "check"]

# the keywords `check` understands; "description", "examples", "title" are documentation
KEYWORDS = frozenset(
    {
        "$ref",
        "additionalProperties",
        "anyOf",
        "const",
        "default",
        "enum",
        "items",
        "maxItems",
        "maxLength",
        "maximum",
        "minItems",
        "minLength",
        "minimum",
        "pattern",
        "properties",
        "required",
        "type",
    }
)
REF_PREFIX = "#/components/schemas/"


class SchemaMismatch(ValueError):
    """`where`: the dotted path of the field (empty for the value itself); `problem`: what."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where or 'reply'}: {problem}")
        self.where = where
        self.problem = problem


def _is_type(value: Any, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "null":
        return value is None
    if kind == "array":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict)
    raise ValueError(f"unknown JSON Schema type {kind!r}")


@cache
def _pattern(text: str) -> re.Pattern[str]:
    return re.compile(text)


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "…"


def check(schema: Mapping[str, Any], value: Any, defs: Mapping[str, Any], where: str = "") -> None:
    """Raise SchemaMismatch for the first way `value` breaks `schema` (whose `$ref`s name
    entries of `defs`)."""
    ref = schema.get("$ref")
    if ref is not None:
        if not ref.startswith(REF_PREFIX):
            raise ValueError(f"unsupported $ref {ref!r}")
        check(defs[ref[len(REF_PREFIX) :]], value, defs, where)
    options = schema.get("anyOf")
    if options is not None:
        failures = []
        for option in options:
            try:
                check(option, value, defs, where)
                break
            except SchemaMismatch as e:
                failures.append(e)
        else:  # the most telling failure: the one that got past the type
            typed = [e for e in failures if not e.problem.startswith("not ")]
            raise (typed or failures)[0]
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_is_type(value, k) for k in kinds):
            raise SchemaMismatch(where, f"not {' or '.join(kinds)} (got {_got(value)})")
    if "const" in schema and (value != schema["const"] or type(value) is not type(schema["const"])):
        raise SchemaMismatch(where, f"must be {schema['const']!r} (got {_got(value)})")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaMismatch(where, f"not one of {schema['enum']} (got {_got(value)})")
    if isinstance(value, str):
        if "pattern" in schema and _pattern(schema["pattern"]).search(value) is None:
            raise SchemaMismatch(where, f"does not match {schema['pattern']} (got {_got(value)})")
        if len(value) > schema.get("maxLength", len(value)):
            raise SchemaMismatch(where, f"longer than {schema['maxLength']} characters")
        if len(value) < schema.get("minLength", 0):
            raise SchemaMismatch(where, f"shorter than {schema['minLength']} characters")
    if _is_type(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            raise SchemaMismatch(where, f"less than {schema['minimum']} (got {value})")
        if "maximum" in schema and value > schema["maximum"]:
            raise SchemaMismatch(where, f"more than {schema['maximum']} (got {value})")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            raise SchemaMismatch(where, f"fewer than {schema['minItems']} items")
        if len(value) > schema.get("maxItems", len(value)):
            raise SchemaMismatch(where, f"more than {schema['maxItems']} items")
        items = schema.get("items")
        if items is not None:
            for i, item in enumerate(value):
                check(items, item, defs, f"{where}.{i}" if where else str(i))
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                raise SchemaMismatch(f"{where}.{key}" if where else key, "missing")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            at = f"{where}.{key}" if where else str(key)
            if key in props:
                check(props[key], item, defs, at)
            elif extra is False:
                raise SchemaMismatch(at, "not a field of this object")
            elif isinstance(extra, dict):
                check(extra, item, defs, at)
