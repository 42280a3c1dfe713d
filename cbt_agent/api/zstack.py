"""ZStack's REST conventions, as pure functions (no I/O, no web framework).

What lives here:

* ZStack uuids (`is_uuid`, `new_uuid`).

Re-exported from `cbt_agent.contract`, where they are defined: ErrorCode dicts
(`error_code`, `error_from_exception`) and the codes; dates in ZStack's form (`format_date`,
`parse_date`); the ``schema`` map (`schema_map`, `CBT_SCHEMA_CLASSES`).

The query language (``q=<field><op><value>``, sort, paging) is in `cbt_agent.api.query`.
"""

from __future__ import annotations

import re
from typing import Final

from cbt_agent.contract.constants import UUID_PATTERN
from cbt_agent.contract.dates import format_date, parse_date
from cbt_agent.contract.error_codes import (
    ID_SESSION_EXPIRED,
    SYS_INTERNAL,
    SYS_INVALID,
    SYS_OPERATION,
    SYS_TIMEOUT,
    error_code,
    error_from_exception,
)
from cbt_agent.contract.schema_map import CBT_SCHEMA_CLASSES, REPLY_SCHEMA_CLASSES, schema_map
from cbt_agent.model import new_uuid

__all__ = [
    "CBT_SCHEMA_CLASSES",
    "ID_SESSION_EXPIRED",
    "REPLY_SCHEMA_CLASSES",
    "SYS_INTERNAL",
    "SYS_INVALID",
    "SYS_OPERATION",
    "SYS_TIMEOUT",
    "error_code",
    "error_from_exception",
    "format_date",
    "is_uuid",
    "new_uuid",
    "parse_date",
    "schema_map",
]

# --------------------------------------------------------------------------------------------
# Uuids
# --------------------------------------------------------------------------------------------

_UUID_RE: Final = re.compile(UUID_PATTERN)


def is_uuid(s: str) -> bool:
    """True for a ZStack uuid: 32 hex digits (either case), no dashes."""
    return isinstance(s, str) and _UUID_RE.fullmatch(s) is not None
