"""Parameter validation (cbt_agent.api.validate over the contract's models): every refusal names
the field."""

from __future__ import annotations

import pytest

from cbt_agent import commands
from cbt_agent.api import validate
from cbt_agent.errors import InvalidArgument

VM = "0123456789abcdef0123456789abcdef"


def test_create_accepts_sdk_body_with_extra_keys() -> None:
    cmd = validate.create_task(
        {
            "params": {"name": "n", "vmInstanceUuid": VM.upper(), "requestIp": "1.2.3.4"},
            "systemTags": [],
            "userTags": ["x"],
        }
    )
    assert cmd == commands.CreateTask("n", None, VM, None)


def test_create_takes_resource_uuids_first_element() -> None:
    cmd = validate.create_task({"params": {"name": "n", "resourceUuids": [VM]}})
    assert cmd.vm_uuid == VM


@pytest.mark.parametrize(
    ("params", "field", "text"),
    [
        ({"vmInstanceUuid": VM}, "name", "missing mandatory field [name]"),
        ({"name": "", "vmInstanceUuid": VM}, "name", "must not be empty"),
        ({"name": 5, "vmInstanceUuid": VM}, "name", "must be a string"),
        ({"name": "x" * 256, "vmInstanceUuid": VM}, "name", "more than the maximum 255"),
        ({"name": "n", "vmInstanceUuid": VM, "description": "d" * 2049}, "description", "2048"),
        ({"name": "n"}, "vmInstanceUuid", "missing mandatory field [vmInstanceUuid]"),
        ({"name": "n", "vmInstanceUuid": "not-a-uuid"}, "vmInstanceUuid", "32 hex"),
        ({"name": "n", "resourceUuids": [VM, VM]}, "resourceUuids", "exactly one"),
        ({"name": "n", "vmInstanceUuid": VM, "resourceUuid": "x"}, "resourceUuid", "32 hex"),
        ({"name": "n", "vmInstanceUuid": VM, "tagUuids": "x"}, "tagUuids", "list of strings"),
    ],
)
def test_create_refusals_name_the_field(params: dict[str, object], field: str, text: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate.create_task({"params": params})
    assert err.value.field == field
    assert text in err.value.message


def test_params_must_be_an_object() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate.create_task({"params": [1]})
    assert err.value.field == "params"


def test_enable_bitmap_name_is_checked() -> None:
    assert validate.enable_task(VM, {"params": {}}).bitmap_name is None
    assert validate.enable_task(VM, {"params": {"bitmapName": "cbt-x-000001"}}).bitmap_name == (
        "cbt-x-000001"
    )
    with pytest.raises(InvalidArgument) as err:
        validate.enable_task(VM, {"params": {"bitmapName": "a b;rm -rf"}})
    assert err.value.field == "bitmapName"
    with pytest.raises(InvalidArgument) as err:
        validate.enable_task("nope", {})
    assert err.value.field == "uuid"


def test_disable_force_and_delete_mode() -> None:
    assert validate.disable_task(VM, {"params": {"force": "true"}}).force is True
    with pytest.raises(InvalidArgument) as err:
        validate.disable_task(VM, {"params": {"force": 3}})
    assert err.value.field == "force"
    assert validate.delete_task(VM, False, "Enforcing").enforcing is True
    with pytest.raises(InvalidArgument) as err:
        validate.delete_task(VM, False, "Sometimes")
    assert err.value.field == "deleteMode"


def test_enable_reads_the_quiesce_system_tag() -> None:
    task = VM
    assert validate.enable_task(task, {"params": {}}).quiesce is None
    on = validate.enable_task(task, {"systemTags": ["other::x", "quiesce::true"]})
    assert on.quiesce == "always"
    assert validate.enable_task(task, {"systemTags": ["quiesce::FALSE"]}).quiesce == "never"
    with pytest.raises(InvalidArgument) as err:
        validate.enable_task(task, {"systemTags": ["quiesce::maybe"]})
    assert (err.value.field, err.value.message) == (
        "systemTags",
        "system tag [quiesce::maybe] must be quiesce::true or quiesce::false",
    )
    with pytest.raises(InvalidArgument) as err:
        validate.enable_task(task, {"systemTags": "quiesce::true"})
    assert err.value.field == "systemTags"
