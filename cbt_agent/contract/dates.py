"""Dates as ZStack writes and reads them.

ZStack's server serialises dates with Gson's defaults (``"Nov 7, 2026 9:05:03 PM"``, server-local
time, no zone); its SDKs also read ISO-8601 with a zone.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Final

from cbt_agent.errors import InvalidArgument

__all__ = ["DATE_FORMS", "format_date", "parse_date"]

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

DATE_FORMS: Final = (
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
            raise InvalidArgument(f"invalid date {text!r}: {DATE_FORMS}")
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
        raise InvalidArgument(f"invalid date {text!r}: {DATE_FORMS}")
    try:
        parsed = datetime.fromisoformat(s)
    except ValueError:
        raise InvalidArgument(f"invalid date {text!r}: {DATE_FORMS}") from None
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
