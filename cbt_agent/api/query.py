"""ZStack's query language for `GET /cbt-task`: conditions (`q=name~=a%`), sort, paging and the
integer and boolean query parameters, with ZStack's semantics (RestServer.QUERY_OP_MAPPING).
Pure: it filters a list of dicts and runs in a thread, off the event loop.

Every match runs in time linear in the value (LIKE without backtracking): a hostile pattern
costs the same as a plain one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from cbt_agent.contract.dates import DATE_FORMS as _DATE_FORMS
from cbt_agent.contract.dates import parse_date
from cbt_agent.errors import InvalidArgument

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
        raise InvalidArgument(f"{name} must be an integer, got {raw[:40]!r}", field=name)
    if len(text.lstrip("+-").lstrip("0")) > 18:  # beyond any offset or count (and int()'s limit)
        raise InvalidArgument(f"{name} is out of range, got {raw[:40]!r}…", field=name)
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
