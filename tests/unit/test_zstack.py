"""Unit tests for cbt_agent.api.zstack: ZStack's REST conventions as pure functions."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from cbt_agent.api import zstack
from cbt_agent.api.query import (
    Condition,
    QuerySyntaxError,
    apply_query,
    parse_bool_param,
    parse_condition,
    parse_conditions,
    parse_int_param,
)
from cbt_agent.api.zstack import (
    CBT_SCHEMA_CLASSES,
    error_code,
    error_from_exception,
    format_date,
    is_uuid,
    new_uuid,
    parse_date,
    schema_map,
)
from cbt_agent.errors import InvalidArgument, OperationError

# Every test runs with the server's local zone fixed at UTC+8 (a POSIX TZ string, no tzdata
# needed, no DST), so local-time behaviour is deterministic on any machine.
LOCAL = timezone(timedelta(hours=8))


@pytest.fixture(autouse=True)
def _local_tz() -> Iterator[None]:
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "XST-8"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


# ------------------------------------------------------------------------------------------
# Error codes
# ------------------------------------------------------------------------------------------


def test_error_code_constants() -> None:
    assert zstack.SYS_INTERNAL == "SYS.1000"
    assert zstack.SYS_TIMEOUT == "SYS.1001"
    assert zstack.SYS_OPERATION == "SYS.1006"
    assert zstack.SYS_INVALID == "SYS.1007"
    assert zstack.ID_SESSION_EXPIRED == "ID.1001"


def test_error_code_without_cause_omits_the_key() -> None:
    err = error_code("SYS.1006", "An operation failed", "boom")
    assert err == {"code": "SYS.1006", "description": "An operation failed", "details": "boom"}
    assert "cause" not in err


def test_error_code_with_nested_cause() -> None:
    inner = error_code("SYS.1000", "internal", "disk gone")
    err = error_code("SYS.1006", "An operation failed", "enable failed", cause=inner)
    assert err == {
        "code": "SYS.1006",
        "description": "An operation failed",
        "details": "enable failed",
        "cause": {"code": "SYS.1000", "description": "internal", "details": "disk gone"},
    }


def test_error_from_exception_invalid_argument() -> None:
    exc = InvalidArgument("name is required", field="name")
    assert error_from_exception(exc) == {
        "code": "SYS.1007",
        "description": "One or more API argument is invalid",
        "details": "name is required",
    }


def test_error_from_exception_operation_error() -> None:
    err = error_from_exception(OperationError("task is Running, please disable it"))
    assert err == {
        "code": "SYS.1006",
        "description": "An operation failed",
        "details": "task is Running, please disable it",
    }


# ------------------------------------------------------------------------------------------
# Dates
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dt", "expected"),
    [
        (datetime(2026, 11, 7, 21, 5, 3, tzinfo=LOCAL), "Nov 7, 2026 9:05:03 PM"),
        (datetime(2027, 1, 1, 0, 0, 0, tzinfo=LOCAL), "Jan 1, 2027 12:00:00 AM"),
        (datetime(2027, 1, 1, 12, 0, 0, tzinfo=LOCAL), "Jan 1, 2027 12:00:00 PM"),
        (datetime(2027, 1, 1, 0, 30, 59, tzinfo=LOCAL), "Jan 1, 2027 12:30:59 AM"),
        (datetime(2027, 6, 15, 12, 59, 1, tzinfo=LOCAL), "Jun 15, 2027 12:59:01 PM"),
        (datetime(2027, 3, 9, 1, 2, 3, tzinfo=LOCAL), "Mar 9, 2027 1:02:03 AM"),
        (datetime(2027, 12, 25, 23, 59, 59, tzinfo=LOCAL), "Dec 25, 2027 11:59:59 PM"),
        (datetime(2027, 7, 4, 11, 0, 0, tzinfo=LOCAL), "Jul 4, 2027 11:00:00 AM"),
        (datetime(2027, 7, 4, 13, 0, 0, tzinfo=LOCAL), "Jul 4, 2027 1:00:00 PM"),
    ],
)
def test_format_date_forms(dt: datetime, expected: str) -> None:
    assert format_date(dt) == expected


def test_format_date_converts_aware_utc_to_local_time() -> None:
    # 13:05:03 UTC is 21:05:03 at UTC+8
    assert format_date(datetime(2026, 11, 7, 13, 5, 3, tzinfo=UTC)) == "Nov 7, 2026 9:05:03 PM"
    # crossing midnight into the next local day
    assert format_date(datetime(2026, 12, 31, 16, 0, 0, tzinfo=UTC)) == "Jan 1, 2027 12:00:00 AM"


def test_format_date_other_offset_converted() -> None:
    minus5 = timezone(timedelta(hours=-5))
    # 10:00 at -05:00 = 15:00 UTC = 23:00 at +08:00
    assert format_date(datetime(2026, 5, 2, 10, 0, 0, tzinfo=minus5)) == "May 2, 2026 11:00:00 PM"


def test_format_date_naive_is_taken_as_local() -> None:
    assert format_date(datetime(2026, 8, 20, 14, 7, 9)) == "Aug 20, 2026 2:07:09 PM"


def test_format_date_drops_microseconds() -> None:
    dt = datetime(2026, 2, 3, 4, 5, 6, 999_999, tzinfo=LOCAL)
    assert format_date(dt) == "Feb 3, 2026 4:05:06 AM"


def test_format_date_every_month_name() -> None:
    names = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    got = [format_date(datetime(2026, m, 1, 8, 0, 0, tzinfo=LOCAL)) for m in range(1, 13)]
    assert got == [f"{n} 1, 2026 8:00:00 AM" for n in names]


def test_parse_date_zstack_form_is_local_time() -> None:
    dt = parse_date("Nov 7, 2026 9:05:03 PM")
    assert dt.tzinfo is not None
    assert dt.utcoffset() == timedelta(hours=8)
    assert dt == datetime(2026, 11, 7, 21, 5, 3, tzinfo=LOCAL)
    assert dt == datetime(2026, 11, 7, 13, 5, 3, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Jan 1, 2027 12:00:00 AM", datetime(2027, 1, 1, 0, 0, 0, tzinfo=LOCAL)),
        ("Jan 1, 2027 12:00:00 PM", datetime(2027, 1, 1, 12, 0, 0, tzinfo=LOCAL)),
        ("Jan 1, 2027 12:30:15 AM", datetime(2027, 1, 1, 0, 30, 15, tzinfo=LOCAL)),
        ("Mar 9, 2027 1:02:03 AM", datetime(2027, 3, 9, 1, 2, 3, tzinfo=LOCAL)),
        ("Dec 25, 2027 11:59:59 PM", datetime(2027, 12, 25, 23, 59, 59, tzinfo=LOCAL)),
        # leading zeros and surrounding whitespace are tolerated
        ("  Mar 09, 2027 01:02:03 AM  ", datetime(2027, 3, 9, 1, 2, 3, tzinfo=LOCAL)),
        # JDK 9+ CLDR variant: comma after the year, narrow no-break space before PM
        ("Nov 7, 2026, 9:05:03\u202fPM", datetime(2026, 11, 7, 21, 5, 3, tzinfo=LOCAL)),
    ],
)
def test_parse_date_zstack_variants(text: str, expected: datetime) -> None:
    assert parse_date(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-07T13:05:03Z", datetime(2026, 11, 7, 13, 5, 3, tzinfo=UTC)),
        ("2026-11-07T13:05:03.250Z", datetime(2026, 11, 7, 13, 5, 3, 250_000, tzinfo=UTC)),
        (
            "2026-11-07T14:05:03+01:00",
            datetime(2026, 11, 7, 14, 5, 3, tzinfo=timezone(timedelta(hours=1))),
        ),
        (
            "2026-11-07T08:05:03-05:00",
            datetime(2026, 11, 7, 8, 5, 3, tzinfo=timezone(timedelta(hours=-5))),
        ),
        # "+01:00" whose '+' became a space in URL query decoding
        (
            "2026-11-07T14:05:03 01:00",
            datetime(2026, 11, 7, 14, 5, 3, tzinfo=timezone(timedelta(hours=1))),
        ),
    ],
)
def test_parse_date_iso_with_zone(text: str, expected: datetime) -> None:
    got = parse_date(text)
    assert got == expected
    assert got.utcoffset() == expected.utcoffset()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "2026-11-07T13:05:03",  # ISO without a zone
        "2026-11-07",  # date only
        "1794085503",  # epoch seconds
        "1794085503000",  # epoch millis
        "2026-11-07 13:05:03",  # yyyy-MM-dd HH:mm:ss
        "Foo 7, 2026 9:05:03 PM",  # unknown month
        "Nov 31, 2026 9:05:03 PM",  # no such day
        "Nov 7, 2026 13:05:03 PM",  # hour out of 1..12
        "Nov 7, 2026 0:05:03 AM",  # hour 0 is not in the 12-hour form
        "Nov 7, 2026 9:65:03 PM",  # minute 65
        "Nov 7, 2026 9:05:03",  # no AM/PM
        "Nov 7 2026 9:05:03 PM",  # no comma after the day
        "yesterday",
    ],
)
def test_parse_date_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        parse_date(text)
    assert ei.value.code == "SYS.1007"
    assert "date" in ei.value.message


def test_format_then_parse_round_trip_within_a_second() -> None:
    now = datetime.now(UTC)
    back = parse_date(format_date(now))
    assert back.tzinfo is not None
    assert timedelta(0) <= now - back < timedelta(seconds=1)


def test_round_trip_of_fixed_instants_is_exact() -> None:
    for dt in [
        datetime(2027, 1, 1, 0, 0, 0, tzinfo=LOCAL),
        datetime(2027, 1, 1, 12, 0, 0, tzinfo=LOCAL),
        datetime(2026, 11, 7, 21, 5, 3, tzinfo=LOCAL),
        datetime(2026, 2, 28, 23, 59, 59, tzinfo=UTC),
    ]:
        assert parse_date(format_date(dt)) == dt


# ------------------------------------------------------------------------------------------
# Condition parsing
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("name!=a", Condition("name", "!=", "a")),
        ("size>=10", Condition("size", ">=", "10")),
        ("size<=10", Condition("size", "<=", "10")),
        ("status!?=Created,Stopped", Condition("status", "!?=", "Created,Stopped")),
        ("name!~=back%", Condition("name", "!~=", "back%")),
        ("name~=back%", Condition("name", "~=", "back%")),
        ("status?=Created,Stopped", Condition("status", "?=", "Created,Stopped")),
        ("name=a", Condition("name", "=", "a")),
        ("size>10", Condition("size", ">", "10")),
        ("size<10", Condition("size", "<", "10")),
        ("description is null", Condition("description", "is null", None)),
        ("description not null", Condition("description", "not null", None)),
    ],
)
def test_parse_condition_every_operator(q: str, expected: Condition) -> None:
    assert parse_condition(q) == expected


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        # '!=' is tried before '=': the first operator in ZStack's order wins, wherever it is
        ("a=b!=c", Condition("a=b", "!=", "c")),
        # '=' is tried before '>': "a>b=c" splits at '='
        ("a>b=c", Condition("a>b", "=", "c")),
        ("a<b=c", Condition("a<b", "=", "c")),
        # '>=' before '=' and '>'
        ("a>=b=c", Condition("a", ">=", "b=c")),
        # '!?=' contains '?=' and '=': it is tried first
        ("s!?=A", Condition("s", "!?=", "A")),
        # '!~=' before '~=' and '='
        ("s!~=A", Condition("s", "!~=", "A")),
        # '?=' before '='
        ("s?=a=b", Condition("s", "?=", "a=b")),
        # '~=' before '?=' and '='
        ("s~=a?=b", Condition("s", "~=", "a?=b")),
        # '<=' before '!?='
        ("s!?=a<=b", Condition("s!?=a", "<=", "b")),
        # an '=' comparison whose value ends in "is null" stays an '=' comparison
        ("name=x is null", Condition("name", "=", "x is null")),
        # '>' before '<'
        ("a<b>c", Condition("a<b", ">", "c")),
        # '<' before "is null"
        ("a<b is null", Condition("a", "<", "b is null")),
        # split at the first occurrence of the chosen operator
        ("name=a=b", Condition("name", "=", "a=b")),
    ],
)
def test_parse_condition_operator_precedence(q: str, expected: Condition) -> None:
    assert parse_condition(q) == expected


def test_parse_condition_trims_field_not_value() -> None:
    assert parse_condition(" name = a b ") == Condition("name", "=", " a b ")
    assert parse_condition("  description   is null  ") == Condition("description", "is null", None)


def test_parse_condition_empty_value_is_kept() -> None:
    assert parse_condition("name=") == Condition("name", "=", "")


def test_parse_condition_date_values() -> None:
    assert parse_condition("createDate>Nov 1, 2026 1:00:00 AM") == Condition(
        "createDate", ">", "Nov 1, 2026 1:00:00 AM"
    )
    assert parse_condition("createDate>=2026-11-01T01:00:00+01:00") == Condition(
        "createDate", ">=", "2026-11-01T01:00:00+01:00"
    )


def test_parse_condition_dotted_field() -> None:
    assert parse_condition("resourceRefs.resourceUuid=abc") == Condition(
        "resourceRefs.resourceUuid", "=", "abc"
    )


@pytest.mark.parametrize(
    "q",
    [
        "",
        "name",
        "just some words",
        "=a",
        "  =a",
        "!=a",
        "?=A,B",
        "is null",
        " not null",
        "description is null trailing",
    ],
)
def test_parse_condition_syntax_errors(q: str) -> None:
    with pytest.raises(QuerySyntaxError) as ei:
        parse_condition(q)
    assert isinstance(ei.value, ValueError)
    assert repr(q) in str(ei.value)


def test_parse_condition_no_operator_message_lists_operators() -> None:
    with pytest.raises(QuerySyntaxError, match=r"no query operator.*!=.*not null"):
        parse_condition("name")


def test_parse_conditions_keeps_order() -> None:
    assert parse_conditions(["a=1", "b!=2", "c is null"]) == [
        Condition("a", "=", "1"),
        Condition("b", "!=", "2"),
        Condition("c", "is null", None),
    ]


# ------------------------------------------------------------------------------------------
# apply_query
# ------------------------------------------------------------------------------------------

FIELDS = {
    "uuid": "str",
    "name": "str",
    "description": "str",
    "status": "str",
    "size": "int",
    "createDate": "date",
    "lastOpDate": "date",
    "resourceRefs.resourceUuid": "str",
    "resourceRefs.resourceType": "str",
    "resourceRefs.id": "int",
    "resourceRefs.createDate": "date",
}

D1 = datetime(2026, 11, 1, 1, 0, 0, tzinfo=LOCAL)  # "Nov 1, 2026 1:00:00 AM"
D2 = datetime(2026, 11, 2, 13, 30, 0, tzinfo=LOCAL)
D3 = datetime(2026, 11, 3, 9, 0, 0, 400_000, tzinfo=LOCAL)  # 9:00:00.4 AM


def _items() -> list[dict[str, Any]]:
    return [
        {
            "uuid": "a" * 32,
            "name": "backup-alpha",
            "description": "nightly",
            "status": "Running",
            "size": 30,
            "createDate": D1,
            "lastOpDate": D3,
            "resourceRefs": [
                {"id": 1, "resourceUuid": "vm1", "resourceType": "VmInstanceVO", "createDate": D1},
                {"id": 2, "resourceUuid": "vol1", "resourceType": "VolumeVO", "createDate": D2},
            ],
        },
        {
            "uuid": "b" * 32,
            "name": "backup-beta",
            "description": None,
            "status": "Created",
            "size": 5,
            "createDate": D2,
            "lastOpDate": D2,
            "resourceRefs": [
                {"id": 3, "resourceUuid": "vm2", "resourceType": "VmInstanceVO", "createDate": D2}
            ],
        },
        {
            "uuid": "c" * 32,
            "name": "gamma",
            # no description key at all
            "status": "Stopped",
            "size": 100,
            "createDate": D3,
            "lastOpDate": None,
            "resourceRefs": [],
        },
    ]


def _names(q: list[str], **kw: Any) -> list[str]:
    page, _ = apply_query(_items(), parse_conditions(q), fields=FIELDS, **kw)
    return [it["name"] for it in page]


def test_no_conditions_returns_everything_in_order() -> None:
    page, total = apply_query(_items(), [], fields=FIELDS)
    assert [it["name"] for it in page] == ["backup-alpha", "backup-beta", "gamma"]
    assert total == 3


def test_returned_items_are_the_input_dicts() -> None:
    items = _items()
    page, _ = apply_query(items, [parse_condition("name=gamma")], fields=FIELDS)
    assert page == [items[2]]
    assert page[0] is items[2]


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("name=gamma", ["gamma"]),
        ("name=Gamma", []),  # case-sensitive
        ("name!=gamma", ["backup-alpha", "backup-beta"]),
        ("status?=Created,Stopped", ["backup-beta", "gamma"]),
        ("status?=Created", ["backup-beta"]),
        ("status!?=Created,Stopped", ["backup-alpha"]),
        ("status?=Nope,Other", []),
        ("status!?=Nope", ["backup-alpha", "backup-beta", "gamma"]),
        ("name>backup-beta", ["gamma"]),
        ("name>=backup-beta", ["backup-beta", "gamma"]),
        ("name<backup-beta", ["backup-alpha"]),
        ("name<=backup-beta", ["backup-alpha", "backup-beta"]),
        ("uuid=" + "b" * 32, ["backup-beta"]),
    ],
)
def test_string_operators(q: str, expected: list[str]) -> None:
    assert _names([q]) == expected


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("name~=backup%", ["backup-alpha", "backup-beta"]),
        ("name~=%a", ["backup-alpha", "backup-beta", "gamma"]),
        ("name~=%amm%", ["gamma"]),
        ("name~=backup", []),  # LIKE matches the whole value
        ("name~=gamm_", ["gamma"]),  # '_' is exactly one character
        ("name~=gam_", []),
        ("name~=g__ma", ["gamma"]),
        ("name~=backup-____", ["backup-beta"]),
        ("name~=%", ["backup-alpha", "backup-beta", "gamma"]),
        ("name~=BACKUP%", []),  # case-sensitive
        ("name!~=backup%", ["gamma"]),
        ("name!~=%a", []),
        ("name!~=gamm_", ["backup-alpha", "backup-beta"]),
        # None / missing values match no LIKE, so they satisfy NOT LIKE
        ("description~=%", ["backup-alpha"]),
        ("description!~=night%", ["backup-beta", "gamma"]),
    ],
)
def test_like_and_not_like(q: str, expected: list[str]) -> None:
    assert _names([q]) == expected


def test_like_treats_regex_characters_literally() -> None:
    items = [{"name": "a.b"}, {"name": "axb"}, {"name": "a+b(c)"}, {"name": "a*b"}]
    fields = {"name": "str"}
    page, _ = apply_query(items, [parse_condition("name~=a.b")], fields=fields)
    assert page == [{"name": "a.b"}]
    page, _ = apply_query(items, [parse_condition("name~=a+b(c)")], fields=fields)
    assert page == [{"name": "a+b(c)"}]
    page, _ = apply_query(items, [parse_condition("name~=a*%")], fields=fields)
    assert page == [{"name": "a*b"}]


def test_like_matches_across_newlines() -> None:
    items = [{"d": "line1\nline2"}]
    page, total = apply_query(items, [parse_condition("d~=line1%2")], fields={"d": "str"})
    assert page == items
    assert total == 1


def test_in_list_value_with_spaces_is_not_trimmed() -> None:
    items = [{"s": "A"}, {"s": " B"}, {"s": "B"}]
    page, _ = apply_query(items, [parse_condition("s?=A, B")], fields={"s": "str"})
    assert page == [{"s": "A"}, {"s": " B"}]


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("description is null", ["backup-beta", "gamma"]),  # None and missing
        ("description not null", ["backup-alpha"]),
        ("lastOpDate is null", ["gamma"]),
        ("lastOpDate not null", ["backup-alpha", "backup-beta"]),
        ("status is null", []),
        ("status not null", ["backup-alpha", "backup-beta", "gamma"]),
    ],
)
def test_null_checks(q: str, expected: list[str]) -> None:
    assert _names([q]) == expected


def test_none_matches_no_positive_comparison_and_satisfies_negation() -> None:
    assert _names(["description=nightly"]) == ["backup-alpha"]
    assert _names(["description!=nightly"]) == ["backup-beta", "gamma"]
    assert _names(["description>a"]) == ["backup-alpha"]
    assert _names(["description?=nightly,x"]) == ["backup-alpha"]
    assert _names(["description!?=nightly,x"]) == ["backup-beta", "gamma"]


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("size=30", ["backup-alpha"]),
        ("size>10", ["backup-alpha", "gamma"]),
        ("size>=30", ["backup-alpha", "gamma"]),
        ("size<30", ["backup-beta"]),
        ("size<=30", ["backup-alpha", "backup-beta"]),
        ("size!=30", ["backup-beta", "gamma"]),
        ("size?=5,100", ["backup-beta", "gamma"]),
        ("size!?=5,100", ["backup-alpha"]),
        # numeric, not lexicographic: "100" < "30" as strings but 100 > 30
        ("size>=100", ["gamma"]),
        ("size<9", ["backup-beta"]),
        ("size= 30 ", ["backup-alpha"]),
        ("size=+30", ["backup-alpha"]),
        ("size>-1", ["backup-alpha", "backup-beta", "gamma"]),
        ("size~=3%", ["backup-alpha"]),  # LIKE on the decimal form
    ],
)
def test_int_operators(q: str, expected: list[str]) -> None:
    assert _names([q]) == expected


@pytest.mark.parametrize("q", ["size=abc", "size>1.5", "size?=1,x", "size=", "size=1_000"])
def test_int_bad_value_names_field(q: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        apply_query(_items(), [parse_condition(q)], fields=FIELDS)
    assert ei.value.field == "size"
    assert "'size'" in ei.value.message
    assert "not an integer" in ei.value.message


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        # ZStack form, server-local time (D1 = Nov 1, 2026 1:00:00 AM at +08:00)
        ("createDate>Nov 1, 2026 1:00:00 AM", ["backup-beta", "gamma"]),
        ("createDate>=Nov 1, 2026 1:00:00 AM", ["backup-alpha", "backup-beta", "gamma"]),
        ("createDate=Nov 1, 2026 1:00:00 AM", ["backup-alpha"]),
        ("createDate!=Nov 1, 2026 1:00:00 AM", ["backup-beta", "gamma"]),
        ("createDate<Nov 2, 2026 1:30:00 PM", ["backup-alpha"]),
        ("createDate<=Nov 2, 2026 1:30:00 PM", ["backup-alpha", "backup-beta"]),
        # ISO with Z: D1 is 2026-10-31T17:00:00Z
        ("createDate=2026-10-31T17:00:00Z", ["backup-alpha"]),
        ("createDate>2026-10-31T17:00:00Z", ["backup-beta", "gamma"]),
        ("createDate<2026-10-31T17:00:01Z", ["backup-alpha"]),
        # ISO with an offset
        ("createDate<=2026-11-02T06:30:00+01:00", ["backup-alpha", "backup-beta"]),
        ("createDate>2026-11-02T06:30:00+01:00", ["gamma"]),
        # '+' decoded to a space by the URL layer
        ("createDate>2026-11-02T06:30:00 01:00", ["gamma"]),
        # comparisons are at whole seconds: D3 is 9:00:00.4 AM
        ("createDate=Nov 3, 2026 9:00:00 AM", ["gamma"]),
        ("createDate>Nov 3, 2026 9:00:00 AM", []),
        ("createDate=2026-11-03T01:00:00.400Z", ["gamma"]),
        # in / not in with ZStack-form dates (each containing a comma)
        ("createDate?=Nov 1, 2026 1:00:00 AM,Nov 3, 2026 9:00:00 AM", ["backup-alpha", "gamma"]),
        ("createDate!?=Nov 1, 2026 1:00:00 AM,2026-11-02T05:30:00Z", ["gamma"]),
        # None never matches, so it satisfies a negated condition
        ("lastOpDate<Nov 10, 2026 1:00:00 AM", ["backup-alpha", "backup-beta"]),
        ("lastOpDate!=Nov 2, 2026 1:30:00 PM", ["backup-alpha", "gamma"]),
    ],
)
def test_date_conditions(q: str, expected: list[str]) -> None:
    assert _names([q]) == expected


@pytest.mark.parametrize(
    "q",
    [
        "createDate>yesterday",
        "createDate>2026-11-01T01:00:00",  # ISO without zone
        "createDate>1794085503",
        "createDate?=Nov 1, 2026 1:00:00 AM,Nov 99",
        "createDate=",
    ],
)
def test_date_bad_value_names_field(q: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        apply_query(_items(), [parse_condition(q)], fields=FIELDS)
    assert ei.value.field == "createDate"
    assert "'createDate'" in ei.value.message


def test_like_on_date_field_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="does not apply to a date") as ei:
        apply_query(_items(), [parse_condition("createDate~=Nov%")], fields=FIELDS)
    assert ei.value.field == "createDate"


def test_date_items_may_be_zstack_strings() -> None:
    items = [
        {"n": 1, "d": "Nov 1, 2026 1:00:00 AM"},
        {"n": 2, "d": "Nov 5, 2026 1:00:00 AM"},
    ]
    page, total = apply_query(
        items, [parse_condition("d>2026-11-01T00:00:00Z")], fields={"d": "date", "n": "int"}
    )
    assert page == [items[1]]
    assert total == 1


def test_naive_item_dates_are_local_time() -> None:
    items = [{"d": datetime(2026, 11, 1, 1, 0, 0)}]
    page, _ = apply_query(items, [parse_condition("d=2026-10-31T17:00:00Z")], fields={"d": "date"})
    assert page == items


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("resourceRefs.resourceUuid=vol1", ["backup-alpha"]),
        ("resourceRefs.resourceUuid=vm2", ["backup-beta"]),
        ("resourceRefs.resourceUuid=nothing", []),
        # negation: no element equals; an empty list qualifies
        ("resourceRefs.resourceUuid!=vol1", ["backup-beta", "gamma"]),
        ("resourceRefs.resourceUuid!=vm1", ["backup-beta", "gamma"]),
        ("resourceRefs.resourceUuid!=nothing", ["backup-alpha", "backup-beta", "gamma"]),
        ("resourceRefs.resourceType=VolumeVO", ["backup-alpha"]),
        ("resourceRefs.resourceType!=VolumeVO", ["backup-beta", "gamma"]),
        ("resourceRefs.resourceType=VmInstanceVO", ["backup-alpha", "backup-beta"]),
        ("resourceRefs.resourceUuid?=vm2,vol1", ["backup-alpha", "backup-beta"]),
        ("resourceRefs.resourceUuid!?=vm2,vol1", ["gamma"]),
        ("resourceRefs.resourceUuid!?=vol1", ["backup-beta", "gamma"]),
        ("resourceRefs.resourceUuid~=vo%", ["backup-alpha"]),
        ("resourceRefs.resourceUuid~=vm%", ["backup-alpha", "backup-beta"]),
        ("resourceRefs.resourceUuid!~=vo%", ["backup-beta", "gamma"]),
        ("resourceRefs.resourceUuid!~=vm%", ["gamma"]),
        ("resourceRefs.id>2", ["backup-beta"]),
        ("resourceRefs.id>=2", ["backup-alpha", "backup-beta"]),
        ("resourceRefs.id<2", ["backup-alpha"]),
        ("resourceRefs.createDate>Nov 1, 2026 1:00:00 AM", ["backup-alpha", "backup-beta"]),
        ("resourceRefs.createDate<=Nov 1, 2026 1:00:00 AM", ["backup-alpha"]),
        ("resourceRefs.resourceUuid is null", ["gamma"]),  # empty list
        ("resourceRefs.resourceUuid not null", ["backup-alpha", "backup-beta"]),
    ],
)
def test_dotted_list_fields(q: str, expected: list[str]) -> None:
    assert _names([q]) == expected


def test_dotted_field_with_missing_list_or_missing_key() -> None:
    items: list[dict[str, Any]] = [
        {"n": "no-list"},
        {"n": "none-list", "refs": None},
        {"n": "missing-key", "refs": [{"other": 1}]},
        {"n": "has", "refs": [{"u": "x"}]},
    ]
    fields = {"n": "str", "refs.u": "str"}

    def names(q: str) -> list[str]:
        page, _ = apply_query(items, [parse_condition(q)], fields=fields)
        return [it["n"] for it in page]

    assert names("refs.u=x") == ["has"]
    assert names("refs.u!=x") == ["no-list", "none-list", "missing-key"]
    assert names("refs.u is null") == ["no-list", "none-list", "missing-key"]
    assert names("refs.u not null") == ["has"]


def test_conditions_are_anded() -> None:
    assert _names(["name~=backup%", "size>10"]) == ["backup-alpha"]
    assert _names(["name~=backup%", "status=Created", "description is null"]) == ["backup-beta"]
    assert _names(["name~=backup%", "name=gamma"]) == []


def test_unknown_field_names_the_field() -> None:
    with pytest.raises(InvalidArgument) as ei:
        apply_query(_items(), [parse_condition("foo=1")], fields=FIELDS)
    assert ei.value.code == "SYS.1007"
    assert ei.value.field == "foo"
    assert "unknown query field 'foo'" in ei.value.message


def test_unknown_field_checked_even_with_no_items() -> None:
    with pytest.raises(InvalidArgument, match=r"unknown query field 'resourceRefs\.nope'"):
        apply_query([], [parse_condition("resourceRefs.nope is null")], fields=FIELDS)


def test_unknown_field_from_precedence_split() -> None:
    # "name=a!=b" splits at '!=' (ZStack's order), leaving the field "name=a"
    with pytest.raises(InvalidArgument) as ei:
        apply_query(_items(), [parse_condition("name=a!=b")], fields=FIELDS)
    assert ei.value.field == "name=a"


def test_unknown_operator_in_hand_built_condition() -> None:
    with pytest.raises(QuerySyntaxError, match="'=='"):
        apply_query(_items(), [Condition("name", "==", "x")], fields=FIELDS)


def test_hand_built_condition_without_value_is_invalid() -> None:
    with pytest.raises(InvalidArgument) as ei:
        apply_query(_items(), [Condition("name", "=", None)], fields=FIELDS)
    assert ei.value.field == "name"


def test_unknown_kind_in_fields_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown kind 'float'"):
        apply_query([{"x": 1.0}], [parse_condition("x=1")], fields={"x": "float"})


# --- sort ---------------------------------------------------------------------------------


def test_sort_ascending_forms() -> None:
    expected = ["backup-beta", "backup-alpha", "gamma"]
    assert _names([], sort="size") == expected
    assert _names([], sort="+size") == expected
    assert _names([], sort=" size") == expected  # '+' decoded as a space


def test_sort_descending() -> None:
    assert _names([], sort="-size") == ["gamma", "backup-alpha", "backup-beta"]
    assert _names([], sort="-name") == ["gamma", "backup-beta", "backup-alpha"]


def test_sort_by_date() -> None:
    assert _names([], sort="-createDate") == ["gamma", "backup-beta", "backup-alpha"]
    assert _names([], sort="createDate") == ["backup-alpha", "backup-beta", "gamma"]


def test_sort_none_first_ascending_last_descending() -> None:
    assert _names([], sort="description") == ["backup-beta", "gamma", "backup-alpha"]
    assert _names([], sort="-description") == ["backup-alpha", "backup-beta", "gamma"]
    assert _names([], sort="lastOpDate") == ["gamma", "backup-beta", "backup-alpha"]
    assert _names([], sort="-lastOpDate") == ["backup-alpha", "backup-beta", "gamma"]


def test_sort_is_stable_for_equal_keys() -> None:
    items = [{"k": 1, "n": "x"}, {"k": 0, "n": "y"}, {"k": 1, "n": "z"}]
    page, _ = apply_query(items, [], fields={"k": "int", "n": "str"}, sort="k")
    assert [it["n"] for it in page] == ["y", "x", "z"]


def test_sort_then_filter_then_page() -> None:
    page, total = apply_query(
        _items(), [parse_condition("size>1")], fields=FIELDS, sort="-size", start=1, limit=1
    )
    assert [it["name"] for it in page] == ["backup-alpha"]
    assert total == 3


def test_unknown_sort_field() -> None:
    with pytest.raises(InvalidArgument) as ei:
        apply_query(_items(), [], fields=FIELDS, sort="-bogus")
    assert ei.value.field == "sort"
    assert "unknown sort field 'bogus'" in ei.value.message


# --- paging -------------------------------------------------------------------------------


def _numbered(n: int) -> list[dict[str, Any]]:
    return [{"i": i} for i in range(n)]


def test_paging_start_and_limit_with_total() -> None:
    page, total = apply_query(_numbered(10), [], fields={"i": "int"}, start=3, limit=4)
    assert page == [{"i": 3}, {"i": 4}, {"i": 5}, {"i": 6}]
    assert total == 10


def test_paging_total_counts_matches_before_paging() -> None:
    page, total = apply_query(
        _numbered(10), [parse_condition("i>=4")], fields={"i": "int"}, start=1, limit=2
    )
    assert page == [{"i": 5}, {"i": 6}]
    assert total == 6


def test_default_limit_is_1000() -> None:
    page, total = apply_query(_numbered(1005), [], fields={"i": "int"})
    assert len(page) == 1000
    assert page[-1] == {"i": 999}
    assert total == 1005


def test_limit_none_means_everything() -> None:
    page, total = apply_query(_numbered(1005), [], fields={"i": "int"}, limit=None)
    assert len(page) == 1005
    assert total == 1005


def test_limit_zero_gives_only_the_total() -> None:
    page, total = apply_query(_numbered(7), [], fields={"i": "int"}, limit=0)
    assert page == []
    assert total == 7


def test_start_past_the_end() -> None:
    page, total = apply_query(_numbered(3), [], fields={"i": "int"}, start=10, limit=5)
    assert page == []
    assert total == 3


def test_last_partial_page() -> None:
    page, total = apply_query(_numbered(5), [], fields={"i": "int"}, start=4, limit=10)
    assert page == [{"i": 4}]
    assert total == 5


@pytest.mark.parametrize(("start", "limit", "field"), [(-1, 10, "start"), (0, -1, "limit")])
def test_negative_start_or_limit(start: int, limit: int, field: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        apply_query(_numbered(3), [], fields={"i": "int"}, start=start, limit=limit)
    assert ei.value.field == field
    assert f"{field} must be >= 0" in ei.value.message


# ------------------------------------------------------------------------------------------
# Scalar query parameters
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "default", "expected"),
    [
        (None, 1000, 1000),
        (None, None, None),
        ("0", 1000, 0),
        ("25", 1000, 25),
        (" 25 ", None, 25),
        ("+7", None, 7),
        ("007", None, 7),
    ],
)
def test_parse_int_param(raw: str | None, default: int | None, expected: int | None) -> None:
    assert parse_int_param("limit", raw, default) == expected


@pytest.mark.parametrize("raw", ["", "abc", "1.5", "1e3", "1_000", "0x10", "١٢"])
def test_parse_int_param_not_an_integer(raw: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        parse_int_param("start", raw, 0)
    assert ei.value.field == "start"
    assert "start must be an integer" in ei.value.message


def test_parse_int_param_minimum() -> None:
    with pytest.raises(InvalidArgument) as ei:
        parse_int_param("limit", "-1", 1000)
    assert ei.value.field == "limit"
    assert "limit must be >= 0" in ei.value.message
    assert parse_int_param("offset", "-5", None, minimum=-10) == -5
    with pytest.raises(InvalidArgument, match="length must be >= 1"):
        parse_int_param("length", "0", None, minimum=1)


@pytest.mark.parametrize(
    ("raw", "default", "expected"),
    [
        (None, False, False),
        (None, True, True),
        ("true", False, True),
        ("TRUE", False, True),
        ("True", False, True),
        ("false", True, False),
        ("False", True, False),
        (" false ", True, False),
    ],
)
def test_parse_bool_param(raw: str | None, default: bool, expected: bool) -> None:
    assert parse_bool_param("force", raw, default) is expected


@pytest.mark.parametrize("raw", ["", "yes", "1", "0", "no", "t"])
def test_parse_bool_param_invalid(raw: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        parse_bool_param("replyWithCount", raw, False)
    assert ei.value.field == "replyWithCount"
    assert "replyWithCount must be 'true' or 'false'" in ei.value.message


# ------------------------------------------------------------------------------------------
# schema_map
# ------------------------------------------------------------------------------------------

TASK = "org.zstack.header.cbt.CbtTaskInventory"
REF = "org.zstack.header.cbt.CbtTaskResourceRefInventory"
INFO = "org.zstack.header.cbt.VolumeCbtBackupInfo"
VOLUME_TO = "org.zstack.kvm.VolumeTO"


def test_cbt_schema_classes_exact() -> None:
    assert dict(CBT_SCHEMA_CLASSES) == {
        "inventory": TASK,
        "inventory.resourceRefs[]": REF,
        "inventories[]": TASK,
        "inventories[].resourceRefs[]": REF,
        "volumeCbtBackupInfos[]": INFO,
        "volumeCbtBackupInfos[].volume": VOLUME_TO,
    }


def test_cbt_schema_classes_is_read_only() -> None:
    with pytest.raises(TypeError):
        CBT_SCHEMA_CLASSES["x"] = "y"  # type: ignore[index]


def test_schema_map_query_reply_nested_lists_in_document_order() -> None:
    body = {
        "inventories": [
            {"uuid": "a", "resourceRefs": [{"id": 1}, {"id": 2}]},
            {"uuid": "b", "resourceRefs": []},  # empty list: no ref entries
            {"uuid": "c"},  # missing key: no ref entries
            {"uuid": "d", "resourceRefs": [{"id": 3}]},
        ],
        "total": 4,
    }
    got = schema_map(body, CBT_SCHEMA_CLASSES)
    assert list(got.items()) == [
        ("inventories[0]", TASK),
        ("inventories[0].resourceRefs[0]", REF),
        ("inventories[0].resourceRefs[1]", REF),
        ("inventories[1]", TASK),
        ("inventories[2]", TASK),
        ("inventories[3]", TASK),
        ("inventories[3].resourceRefs[0]", REF),
    ]


def test_schema_map_single_inventory() -> None:
    body = {"inventory": {"uuid": "a", "name": "t", "resourceRefs": [{"id": 1}]}}
    assert list(schema_map(body, CBT_SCHEMA_CLASSES).items()) == [
        ("inventory", TASK),
        ("inventory.resourceRefs[0]", REF),
    ]


def test_schema_map_volume_backup_infos() -> None:
    body = {
        "volumeCbtBackupInfos": [
            {"volume": {"volumeUuid": "v1", "deviceId": 0}, "mode": "full", "nbdPort": 10501},
            {"volume": {"volumeUuid": "v2", "deviceId": 1}, "mode": "incremental"},
        ]
    }
    assert list(schema_map(body, CBT_SCHEMA_CLASSES).items()) == [
        ("volumeCbtBackupInfos[0]", INFO),
        ("volumeCbtBackupInfos[0].volume", VOLUME_TO),
        ("volumeCbtBackupInfos[1]", INFO),
        ("volumeCbtBackupInfos[1].volume", VOLUME_TO),
    ]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"inventories": []},
        {"inventory": None},
        {"inventories": [None]},
        {"volumeCbtBackupInfos": [{"mode": "full"}]},  # no volume: only the info itself
        {"other": {"inventory": {"uuid": "x"}}},  # same key deeper: a different path
    ],
)
def test_schema_map_absent_paths_produce_nothing(body: dict[str, Any]) -> None:
    got = schema_map(body, CBT_SCHEMA_CLASSES)
    if body == {"volumeCbtBackupInfos": [{"mode": "full"}]}:
        assert got == {"volumeCbtBackupInfos[0]": INFO}
    else:
        assert got == {}


def test_schema_map_skips_scalars_at_class_paths() -> None:
    body = {"inventory": "not-an-object", "inventories": ["x", {"uuid": "y"}]}
    assert schema_map(body, CBT_SCHEMA_CLASSES) == {"inventories[1]": TASK}


def test_schema_map_custom_classes_lists_of_lists_and_order() -> None:
    classes = {"b": "B", "a[]": "A", "a[].c[][]": "C"}
    body = {"b": {"x": 1}, "a": [{"c": [[{"k": 1}], [], [{"k": 2}, {"k": 3}]]}]}
    assert list(schema_map(body, classes).items()) == [
        ("b", "B"),
        ("a[0]", "A"),
        ("a[0].c[0][0]", "C"),
        ("a[0].c[2][0]", "C"),
        ("a[0].c[2][1]", "C"),
    ]


def test_schema_map_does_not_touch_the_body() -> None:
    body = {"inventory": {"uuid": "a", "resourceRefs": [{"id": 1}]}}
    snapshot = {"inventory": {"uuid": "a", "resourceRefs": [{"id": 1}]}}
    schema_map(body, CBT_SCHEMA_CLASSES)
    assert body == snapshot


# ------------------------------------------------------------------------------------------
# uuids
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        ("0123456789abcdef0123456789abcdef", True),
        ("0123456789ABCDEF0123456789ABCDEF", True),
        ("0123456789AbCdEf0123456789aBcDeF", True),
        ("01234567-89ab-cdef-0123-456789abcdef", False),  # dashed form
        ("0123456789abcdef0123456789abcde", False),  # 31
        ("0123456789abcdef0123456789abcdef0", False),  # 33
        ("0123456789abcdef0123456789abcdeg", False),  # non-hex
        ("0123456789abcdef0123456789abcdef\n", False),
        ("", False),
    ],
)
def test_is_uuid(s: str, expected: bool) -> None:
    assert is_uuid(s) is expected


def test_new_uuid_form_and_uniqueness() -> None:
    ids = {new_uuid() for _ in range(100)}
    assert len(ids) == 100
    for u in ids:
        assert is_uuid(u)
        assert len(u) == 32
        assert u == u.lower()
        assert "-" not in u


@pytest.mark.timeout(10)  # the regex it replaced ran for minutes on the last cases
def test_like_matches_as_sql_like_does_without_backtracking() -> None:
    """LikePattern against a regex translation of LIKE on many small random cases, and the
    pattern that made the regex run for minutes (``%`` * 40 then a literal that never comes)."""
    import random
    import re

    from cbt_agent.api.query import LikePattern

    def regex(pattern: str) -> re.Pattern[str]:
        parts = [".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern]
        return re.compile("".join(parts), re.DOTALL)

    rng = random.Random(7)
    for _ in range(5000):
        pattern = "".join(rng.choice("ab%_") for _ in range(rng.randrange(0, 7)))
        value = "".join(rng.choice("ab") for _ in range(rng.randrange(0, 8)))
        want = regex(pattern).fullmatch(value) is not None
        assert LikePattern(pattern).matches(value) is want, (pattern, value)
    assert not LikePattern("%" * 40 + "!").matches("a" * 255)
    assert not LikePattern("%a_" * 20 + "!").matches("a" * 255)
    assert LikePattern("%a_" * 20 + "!").matches("ab" * 60 + "!")
