"""ZStack's REST conventions, as pure functions (no I/O, no web framework).

What lives here:

* ErrorCode dicts (`error_code`, `error_from_exception`) and the ZStack codes we use.
* Dates in the form ZStack's server writes with Gson's defaults (``"Nov 7, 2026 9:05:03 PM"``,
  server-local time, no zone) and the forms its SDKs accept when reading (`format_date`,
  `parse_date`).
* Query conditions: ``q=<field><op><value>`` parsed exactly as ZStack's ``RestServer`` does
  (`parse_condition`) and evaluated over in-memory inventories (`apply_query`), with sort and
  paging; plus the scalar query parameters (`parse_int_param`, `parse_bool_param`).
* The ``schema`` map ZStack's Java SDK needs to turn reply objects into typed classes
  (`schema_map`, `CBT_SCHEMA_CLASSES`).
* ZStack uuids (`is_uuid`, `new_uuid`).

Errors: bad input is `InvalidArgument` (ZStack ``SYS.1007``, reported through the API's error
path); a ``q`` that is not a condition at all is `QuerySyntaxError`, a REST-layer fault that the
HTTP layer answers with a plain-text 400, as ZStack does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final

from cbt_agent.errors import CbtError, InvalidArgument
from cbt_agent.model import new_uuid

__all__ = [
    "CBT_SCHEMA_CLASSES",
    "ID_SESSION_EXPIRED",
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
# Error codes
# --------------------------------------------------------------------------------------------

SYS_INTERNAL: Final = "SYS.1000"
SYS_TIMEOUT: Final = "SYS.1001"
SYS_OPERATION: Final = "SYS.1006"
SYS_INVALID: Final = "SYS.1007"
ID_SESSION_EXPIRED: Final = "ID.1001"


def error_code(
    code: str, description: str, details: str, cause: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A ZStack ErrorCode. ``cause`` (a nested ErrorCode) is present only when given."""
    err: dict[str, Any] = {"code": code, "description": description, "details": details}
    if cause is not None:
        err["cause"] = cause
    return err


def error_from_exception(exc: CbtError) -> dict[str, Any]:
    """The ErrorCode for one of the agent's own errors: its code, description and message."""
    return error_code(exc.code, exc.description, exc.message)


# --------------------------------------------------------------------------------------------
# Dates
# --------------------------------------------------------------------------------------------

_MONTHS: Final = (
    "Jan",
    "Feb",
    "Mar",
    "Apr",
    "May",
    "Jun",
    "Jul",
    "Aug",
    "Sep",
    "Oct",
    "Nov",
    "Dec",
)
_MONTH_NUMBER: Final = {name.lower(): i + 1 for i, name in enumerate(_MONTHS)}

# "Nov 7, 2026 9:05:03 PM". Also tolerated: the JDK 9+ (CLDR) variant with a comma after the year,
# and a no-break / narrow no-break space before AM/PM (JDK 20+).
_ZSTACK_DATE_RE: Final = re.compile(
    r"(?P<mon>[A-Za-z]{3})\s+(?P<day>\d{1,2}),\s*(?P<year>\d{4}),?\s+"
    r"(?P<hour>\d{1,2}):(?P<minute>\d{2}):(?P<second>\d{2})[\s\u00a0\u202f]*(?P<ampm>[AaPp][Mm])",
    re.ASCII,
)
# An ISO date whose "+hh:mm" offset arrived as " hh:mm" (a '+' in a query string decodes as space).
_ISO_PLUS_AS_SPACE_RE: Final = re.compile(r"(.*T[0-9:.,]+) ([0-9]{2}(?::?[0-9]{2})?)")

_DATE_FORMS: Final = (
    "expected ZStack's form like 'Nov 7, 2026 9:05:03 PM' (local time) "
    "or ISO-8601 with Z or an offset like '2026-11-07T21:05:03Z'"
)


def format_date(dt: datetime) -> str:
    """``dt`` in ZStack's (Gson's default) form, in the server's local time zone.

    E.g. ``"Nov 7, 2026 9:05:03 PM"``, ``"Jan 1, 2027 12:00:00 AM"``: US English month names
    built here (no locale involved), no leading zero on day or hour, hour 12 for midnight and
    noon. An aware ``dt`` is converted to local time; a naive one is taken as local time already.
    Sub-second parts are dropped (truncated).
    """
    local = dt.astimezone()
    hour12 = local.hour % 12 or 12
    ampm = "AM" if local.hour < 12 else "PM"
    return (
        f"{_MONTHS[local.month - 1]} {local.day}, {local.year} "
        f"{hour12}:{local.minute:02d}:{local.second:02d} {ampm}"
    )


def parse_date(text: str) -> datetime:
    """An aware datetime from ZStack's form (read as server-local time) or ISO-8601 with a zone.

    ISO-8601 without ``Z`` or an offset, epoch numbers and anything else raise
    `InvalidArgument` (ZStack's SDKs refuse those too). An ISO offset whose ``+`` was decoded to a
    space by URL query decoding (``...T01:00:00 01:00``) is repaired.
    """
    s = text.strip()
    m = _ZSTACK_DATE_RE.fullmatch(s)
    if m is not None:
        month = _MONTH_NUMBER.get(m["mon"].lower())
        hour = int(m["hour"])
        if month is None or not 1 <= hour <= 12:
            raise InvalidArgument(f"invalid date {text!r}: {_DATE_FORMS}")
        hour %= 12
        if m["ampm"].upper() == "PM":
            hour += 12
        try:
            naive = datetime(
                int(m["year"]), month, int(m["day"]), hour, int(m["minute"]), int(m["second"])
            )
        except ValueError as exc:
            raise InvalidArgument(f"invalid date {text!r}: {exc}") from None
        return _in_range(naive, text)
    repaired = _ISO_PLUS_AS_SPACE_RE.fullmatch(s)
    if repaired is not None:
        s = f"{repaired[1]}+{repaired[2]}"
    if not s[:1].isdigit():
        raise InvalidArgument(f"invalid date {text!r}: {_DATE_FORMS}")
    try:
        parsed = datetime.fromisoformat(s)
    except ValueError:
        raise InvalidArgument(f"invalid date {text!r}: {_DATE_FORMS}") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise InvalidArgument(f"invalid date {text!r}: ISO-8601 needs Z or an offset")
    return _in_range(parsed, text)


def _in_range(dt: datetime, text: str) -> datetime:
    """`dt` made aware (naive = local time), refused when converting it between zones would
    leave the years 1-9999 that datetime can hold (e.g. 0001-01-01T00:00:00+01:00)."""
    try:
        aware = dt.astimezone()
        aware.astimezone(UTC)
    except (OverflowError, ValueError):
        raise InvalidArgument(f"invalid date {text!r}: out of the supported range") from None
    return aware if dt.tzinfo is None else dt


# --------------------------------------------------------------------------------------------
# Schema map for ZStack's Java SDK
# --------------------------------------------------------------------------------------------

_CBT_TASK: Final = "org.zstack.header.cbt.CbtTaskInventory"
_CBT_REF: Final = "org.zstack.header.cbt.CbtTaskResourceRefInventory"

CBT_SCHEMA_CLASSES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "inventory": _CBT_TASK,
        "inventory.resourceRefs[]": _CBT_REF,
        "inventories[]": _CBT_TASK,
        "inventories[].resourceRefs[]": _CBT_REF,
        "volumeCbtBackupInfos[]": "org.zstack.header.cbt.VolumeCbtBackupInfo",
        "volumeCbtBackupInfos[].volume": "org.zstack.kvm.VolumeTO",
    }
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


# --------------------------------------------------------------------------------------------
# Uuids
# --------------------------------------------------------------------------------------------

_UUID_RE: Final = re.compile(r"[0-9a-fA-F]{32}")


def is_uuid(s: str) -> bool:
    """True for a ZStack uuid: 32 hex digits (either case), no dashes."""
    return isinstance(s, str) and _UUID_RE.fullmatch(s) is not None


def jsonable(value: Any) -> Any:
    """`value` with every datetime in ZStack's date form and None fields of objects dropped
    (ZStack serialises with Gson, which omits nulls)."""
    if isinstance(value, datetime):
        return format_date(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items() if v is not None or k in KEEP_NULL}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


# Extension fields whose null is meaningful (VolumeCbtBackupInfo: "null for full").
KEEP_NULL: Final = frozenset({"sinceBitmapName", "reason", "dirtyBitmapContext", "nextOffset"})
