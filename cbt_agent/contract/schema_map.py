"""ZStack's reply ``schema``: the map from each object's JSON path to its Java class, which ZStack's
Java SDK needs to turn reply objects into typed classes. The classes come from the reply models.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Final, Union, get_args, get_origin

from cbt_agent.contract.replies import (
    EnableCbtTaskReply,
    ExportNbdVolumesReply,
    InventoryReply,
    QueryCbtTaskReply,
)
from cbt_agent.contract.wire import WireModel

__all__ = ["CBT_SCHEMA_CLASSES", "REPLY_SCHEMA_CLASSES", "schema_classes", "schema_map"]


def _models_in(annotation: Any) -> list[tuple[type[WireModel], str]]:
    """The wire models a field's annotation holds, each with "[]" when inside a list."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _models_in(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in get_args(annotation) for m in _models_in(arg)]
    if origin is list:
        return [(m, f"[]{suffix}") for m, suffix in _models_in(get_args(annotation)[0])]
    if isinstance(annotation, type) and issubclass(annotation, WireModel):
        return [(annotation, "")]
    return []


def schema_classes(*replies: type[WireModel]) -> dict[str, str]:
    """Path pattern (``[]`` for any list index) -> Java class, for every object with a
    `java_class` that the reply models hold, parent before child."""
    out: dict[str, str] = {}

    def walk(model: type[WireModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = field.alias or name
            for inner, suffix in _models_in(field.annotation):
                path = f"{prefix}{key}{suffix}"
                if inner.java_class is not None:
                    out[path] = inner.java_class
                walk(inner, f"{path}.")

    for reply in replies:
        walk(reply, "")
    return out


CBT_SCHEMA_CLASSES: Final[Mapping[str, str]] = MappingProxyType(
    schema_classes(InventoryReply, QueryCbtTaskReply, EnableCbtTaskReply)
)
# every reply's classes: the CBT task API's, and ExportNbdVolumes' volumeInfos
REPLY_SCHEMA_CLASSES: Final[Mapping[str, str]] = MappingProxyType(
    {**CBT_SCHEMA_CLASSES, **schema_classes(ExportNbdVolumesReply)}
)


def schema_map(body: dict[str, Any], classes: Mapping[str, str]) -> dict[str, str]:
    """ZStack's reply ``schema``: each concrete JSON path in ``body`` whose pattern is in
    ``classes`` (``[]`` standing for any list index), mapped to its class name.

    Paths come in document order, parent before child: ``"inventories[0]"``,
    ``"inventories[0].resourceRefs[0]"``, ``"inventories[1]"``, ... Only objects (dicts) get an
    entry: a path that is absent, None or a scalar produces nothing.
    """
    out: dict[str, str] = {}

    def walk(value: Any, path: str, pattern: str) -> None:
        if isinstance(value, dict):
            if path:
                cls = classes.get(pattern)
                if cls is not None:
                    out[path] = cls
            for k, v in value.items():
                key = str(k)
                walk(v, f"{path}.{key}" if path else key, f"{pattern}.{key}" if path else key)
        elif isinstance(value, list):
            for i, el in enumerate(value):
                walk(el, f"{path}[{i}]", f"{pattern}[]")

    walk(body, "", "")
    return out
