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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final

from cbt_agent.errors import CbtError, InvalidArgument
from cbt_agent.model import new_uuid

__all__ = [
    "CBT_SCHEMA_CLASSES",
    "ID_SESSION_EXPIRED",
    "QUERY_OPERATORS",
    "SYS_INTERNAL",
    "SYS_INVALID",
    "SYS_OPERATION",
    "SYS_TIMEOUT",
    "Condition",
    "QuerySyntaxError",
    "apply_query",
    "error_code",
    "error_from_exception",
    "format_date",
    "is_uuid",
    "new_uuid",
    "parse_bool_param",
    "parse_condition",
    "parse_conditions",
    "parse_date",
    "parse_int_param",
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
# Query conditions
# --------------------------------------------------------------------------------------------

# ZStack's RestServer.QUERY_OP_MAPPING, in its order: a condition splits at the first operator
# of this list that it contains (so "name!=a" is "!=", "status?=A,B" is "?=").
QUERY_OPERATORS: Final = (
    "!=",
    ">=",
    "<=",
    "!?=",
    "!~=",
    "~=",
    "?=",
    "=",
    ">",
    "<",
    "is null",
    "not null",
)
_NULL_OPS: Final = frozenset({"is null", "not null"})
_NEGATED_OPS: Final = {"!=": "=", "!?=": "?=", "!~=": "~="}
_FIELD_KINDS: Final = frozenset({"str", "date", "int"})


class QuerySyntaxError(ValueError):
    """A ``q`` that is not a condition: a REST-layer fault (HTTP 400, plain text)."""


@dataclass(frozen=True)
class Condition:
    """One query condition. ``op`` is one of `QUERY_OPERATORS`; ``value`` is None for
    ``is null`` / ``not null`` and otherwise the raw text after the operator (not trimmed)."""

    field: str
    op: str
    value: str | None


def parse_condition(q: str) -> Condition:
    """Parse one ``q`` value as ZStack does.

    The operators are tried in `QUERY_OPERATORS` order and the text is split at the first
    occurrence of the first one it contains. The field name is trimmed, the value is not (a space
    can be meaningful). ``is null`` / ``not null`` must end the text (``description is null``).
    No operator, an empty field name, or text after ``is null`` raise `QuerySyntaxError`.
    """
    for op in QUERY_OPERATORS:
        idx = q.find(op)
        if idx < 0:
            continue
        name = q[:idx].strip()
        rest = q[idx + len(op) :]
        if not name:
            raise QuerySyntaxError(f"invalid query condition {q!r}: the field name is empty")
        if op in _NULL_OPS:
            if rest.strip():
                raise QuerySyntaxError(f"invalid query condition {q!r}: nothing may follow {op!r}")
            return Condition(name, op, None)
        return Condition(name, op, rest)
    raise QuerySyntaxError(
        f"invalid query condition {q!r}: it contains no query operator; valid operators are "
        + ", ".join(QUERY_OPERATORS)
    )


def parse_conditions(qs: Iterable[str]) -> list[Condition]:
    """`parse_condition` over every ``q`` value, in order."""
    return [parse_condition(q) for q in qs]


class LikePattern:
    """SQL LIKE (``%`` any run, ``_`` one character, everything else literal; the whole string)
    matched without backtracking: the pattern is cut at each ``%`` into segments; the first must
    match at the start, the last at the end, the others each at its leftmost place in between
    (leftmost is always right for patterns of fixed-length segments). Cost: at most the value's
    length times the pattern's, whatever the pattern (a regex took minutes for ``%%…%!``)."""

    def __init__(self, pattern: str) -> None:
        self.segments = pattern.split("%")

    def matches(self, value: str) -> bool:
        segments = self.segments
        if len(segments) == 1:
            return len(value) == len(segments[0]) and _segment_at(value, 0, segments[0])
        first, last = segments[0], segments[-1]
        end = len(value) - len(last)
        if end < len(first):
            return False
        if not (_segment_at(value, 0, first) and _segment_at(value, end, last)):
            return False
        pos = len(first)
        for segment in segments[1:-1]:
            if not segment:
                continue
            found = _find_segment(value, segment, pos, end)
            if found < 0:
                return False
            pos = found + len(segment)
        return True


def _segment_at(value: str, at: int, segment: str) -> bool:
    return all(c == "_" or value[at + i] == c for i, c in enumerate(segment))


def _find_segment(value: str, segment: str, start: int, end: int) -> int:
    """The leftmost index in [start, end - len(segment)] where `segment` matches, or -1."""
    if "_" not in segment:
        return value.find(segment, start, end)
    for at in range(start, end - len(segment) + 1):
        if _segment_at(value, at, segment):
            return at
    return -1


def _field_values(item: Mapping[str, Any], path: str) -> list[Any]:
    """The values a (dotted) field name addresses in ``item``.

    A plain name gives one value (None when missing). Each list met on the way fans out over its
    elements (a dict element lacking the key gives None), so "resourceRefs.resourceUuid" gives
    one value per ref, and none at all for an empty or missing list.
    """
    current: list[Any] = [item]
    for part in path.split("."):
        nxt: list[Any] = []
        for node in current:
            for el in node if isinstance(node, list) else [node]:
                if isinstance(el, Mapping):
                    nxt.append(el.get(part))
                # a None or scalar parent has nothing below it
        current = nxt
    # a list at the end of the path stands for its elements
    out: list[Any] = []
    for v in current:
        if isinstance(v, list):
            out.extend(v)
        else:
            out.append(v)
    return out


def _to_whole_second(dt: datetime) -> datetime:
    return dt.astimezone().replace(microsecond=0)


def _coerce_item_value(value: Any, kind: str, field: str) -> Any:
    """An item's value in the comparable type of its field kind (None stays None)."""
    if value is None:
        return None
    if kind == "date":
        if isinstance(value, datetime):
            return _to_whole_second(value)
        if isinstance(value, str):
            return _to_whole_second(parse_date(value))
        raise TypeError(f"query field {field!r}: expected a datetime, got {type(value).__name__}")
    if kind == "int":
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int):
            return value
        return int(str(value))
    return value if isinstance(value, str) else str(value)


def _parse_value(raw: str, kind: str, field: str) -> Any:
    """A condition value in the comparable type of its field kind."""
    if kind == "date":
        try:
            return _to_whole_second(parse_date(raw))
        except InvalidArgument as exc:
            raise InvalidArgument(f"query field {field!r}: {exc.message}", field=field) from None
    if kind == "int":
        if not _INT_RE.fullmatch(raw.strip()):
            raise InvalidArgument(f"query field {field!r}: {raw!r} is not an integer", field=field)
        return int(raw.strip())
    return raw


def _split_in_list(raw: str, kind: str, field: str) -> list[Any]:
    """The comma list of ``?=`` / ``!?=``. Dates in ZStack's form contain a comma themselves,
    so for date fields pieces are joined until they parse as a date."""
    pieces = raw.split(",")
    if kind != "date":
        return [_parse_value(p, kind, field) for p in pieces]
    values: list[Any] = []
    pending = ""
    for piece in pieces:
        pending = f"{pending},{piece}" if pending else piece
        try:
            values.append(_to_whole_second(parse_date(pending)))
        except InvalidArgument:
            continue
        pending = ""
    if pending:
        raise InvalidArgument(
            f"query field {field!r}: {pending.strip()!r} in {raw!r} is not a date ({_DATE_FORMS})",
            field=field,
        )
    return values


_COMPARATORS: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "=": lambda a, b: bool(a == b),
    ">": lambda a, b: bool(a > b),
    "<": lambda a, b: bool(a < b),
    ">=": lambda a, b: bool(a >= b),
    "<=": lambda a, b: bool(a <= b),
}


def _compile_condition(
    cond: Condition, fields: Mapping[str, str]
) -> Callable[[Mapping[str, Any]], bool]:
    """A predicate over one item for ``cond``; validates the field, operator and value once."""
    kind = fields.get(cond.field)
    if kind is None:
        raise InvalidArgument(
            f"unknown query field {cond.field!r}; queryable fields: " + ", ".join(sorted(fields)),
            field=cond.field,
        )
    if kind not in _FIELD_KINDS:
        raise ValueError(f"query field {cond.field!r} has unknown kind {kind!r}")
    name = cond.field
    op = cond.op

    if op in _NULL_OPS:

        def has_value(item: Mapping[str, Any]) -> bool:
            return any(v is not None for v in _field_values(item, name))

        if op == "is null":
            return lambda item: not has_value(item)
        return has_value

    if op not in QUERY_OPERATORS:
        raise QuerySyntaxError(f"unknown query operator {op!r}")
    if cond.value is None:
        raise InvalidArgument(f"query field {name!r}: operator {op!r} needs a value", field=name)

    positive_op = _NEGATED_OPS.get(op, op)
    negated = op in _NEGATED_OPS
    test: Callable[[Any], bool]
    if positive_op == "~=":
        if kind == "date":
            raise InvalidArgument(
                f"query field {name!r}: operator {op!r} does not apply to a date", field=name
            )
        like = LikePattern(cond.value)

        def test(v: Any) -> bool:
            return like.matches(str(v))

    elif positive_op == "?=":
        members = _split_in_list(cond.value, kind, name)

        def test(v: Any) -> bool:
            return v in members

    else:
        target = _parse_value(cond.value, kind, name)
        compare = _COMPARATORS[positive_op]

        def test(v: Any) -> bool:
            return compare(v, target)

    def matches(item: Mapping[str, Any]) -> bool:
        hit = False
        for raw in _field_values(item, name):
            v = _coerce_item_value(raw, kind, name)
            if v is not None and test(v):
                hit = True
                break
        return not hit if negated else hit

    return matches


def _sort_key(kind: str, name: str) -> Callable[[dict[str, Any]], tuple[int, Any]]:
    def key(item: dict[str, Any]) -> tuple[int, Any]:
        for raw in _field_values(item, name):
            v = _coerce_item_value(raw, kind, name)
            if v is not None:
                return (1, v)
        return (0, 0)

    return key


def apply_query(
    items: list[dict[str, Any]],
    conditions: list[Condition],
    *,
    fields: Mapping[str, str],
    sort: str | None = None,
    start: int = 0,
    limit: int | None = 1000,
) -> tuple[list[dict[str, Any]], int]:
    """Filter, sort and page ``items`` as a ZStack query would; returns (page, total).

    ``total`` counts every item matching all ``conditions`` (AND), before paging.

    ``fields`` maps each queryable name to its kind: ``"str"``, ``"int"`` or ``"date"``. A dotted
    name such as ``"resourceRefs.resourceUuid"`` addresses a key inside the dicts of a list: a
    positive condition (``=``, ``>``, ``~=``, ``?=``, ...) holds when ANY element matches; the
    negated ones (``!=``, ``!?=``, ``!~=``) are exactly the negation of their positive form (no
    element matches — so an empty list satisfies them). A missing key or None never matches a
    positive condition (and so satisfies its negation). ``is null`` holds when no value is
    present (missing, None, or an empty list); ``not null`` is its negation.

    Values in ``items``: date fields hold aware ``datetime`` objects (naive ones are taken as
    local time; a string is also accepted and read with `parse_date`), int fields ints, str
    fields strings. Dates are compared at whole-second precision, the precision ZStack's date
    form shows. Strings compare case-sensitively; ``~=`` is SQL LIKE (``%`` any run, ``_`` one
    character) over the whole value; ``?=`` takes a comma list.

    ``sort``: ``"+field"``, ``"-field"`` or ``"field"`` (ascending; a leading space, what a
    ``+`` becomes in a URL query, also means ascending); None values sort first ascending, last
    descending. ``limit=None`` means no limit.

    Raises `InvalidArgument` for an unknown field (naming it), a bad value for the field's kind,
    an unknown sort field, or a negative ``start``/``limit``.
    """
    if start < 0:
        raise InvalidArgument(f"start must be >= 0, got {start}", field="start")
    if limit is not None and limit < 0:
        raise InvalidArgument(f"limit must be >= 0, got {limit}", field="limit")

    predicates = [_compile_condition(c, fields) for c in conditions]

    key: Callable[[dict[str, Any]], tuple[int, Any]] | None = None
    descending = False
    if sort is not None:
        spec = sort.strip()
        if spec.startswith("-"):
            descending = True
            spec = spec[1:].strip()
        elif spec.startswith("+"):
            spec = spec[1:].strip()
        kind = fields.get(spec)
        if kind is None:
            raise InvalidArgument(
                f"unknown sort field {spec!r}; sortable fields: " + ", ".join(sorted(fields)),
                field="sort",
            )
        key = _sort_key(kind, spec)

    matched = [item for item in items if all(p(item) for p in predicates)]
    if key is not None:
        matched.sort(key=key, reverse=descending)
    total = len(matched)
    end = None if limit is None else start + limit
    return matched[start:end], total


_INT_RE: Final = re.compile(r"[+-]?[0-9]+")


def parse_int_param(
    name: str, raw: str | None, default: int | None, *, minimum: int = 0
) -> int | None:
    """A decimal integer query parameter; ``default`` when absent (None).

    Surrounding whitespace is ignored; anything else that is not a plain decimal integer, or a
    value below ``minimum``, raises `InvalidArgument` naming ``name``.
    """
    if raw is None:
        return default
    text = raw.strip()
    if not _INT_RE.fullmatch(text):
        raise InvalidArgument(f"{name} must be an integer, got {raw!r}", field=name)
    value = int(text)
    if value < minimum:
        raise InvalidArgument(f"{name} must be >= {minimum}, got {value}", field=name)
    return value


def parse_bool_param(name: str, raw: str | None, default: bool) -> bool:
    """``"true"`` / ``"false"`` (any case, whitespace ignored); ``default`` when absent (None).
    Anything else raises `InvalidArgument` naming ``name``."""
    if raw is None:
        return default
    text = raw.strip().lower()
    if text == "true":
        return True
    if text == "false":
        return False
    raise InvalidArgument(f"{name} must be 'true' or 'false', got {raw!r}", field=name)


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
