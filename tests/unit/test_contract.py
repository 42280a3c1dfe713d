"""The wire contract: one set of models validates, serializes, parses and documents."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from cbt_agent.api import replies
from cbt_agent.api.openapi import openapi_document
from cbt_agent.client.api import TaskRef, VolumeBackupInfo
from cbt_agent.client.errors import BackupError
from cbt_agent.contract import openapi as contract_openapi
from cbt_agent.contract.constants import DEFAULT_GRANULARITY, TASK_STATUSES
from cbt_agent.contract.dates import format_date
from cbt_agent.contract.replies import (
    CbtTaskInventory,
    ChangedAreasPage,
    ErrorCode,
    VolumeCbtBackupInfo,
)
from cbt_agent.engine.results import ChangedAreas, TaskView, VolumeBackup
from cbt_agent.hypervisor.libvirt import DiskInfo
from cbt_agent.model import CbtTask, TaskStatus
from cbt_agent.store import NbdServer, ResourceRef, VolumeExport

TASK = "0123456789abcdef0123456789abcdef"
VM = "fedcba9876543210fedcba9876543210"
VOL = "aaaabbbbccccddddeeeeffff00001111"
WHEN = datetime(2026, 11, 7, 13, 5, 3, 250000, tzinfo=UTC)


def _view(description: str | None = None) -> TaskView:
    task = CbtTask(TASK, "nightly", description, VM, TaskStatus.RUNNING, WHEN, WHEN)
    return TaskView(task, [ResourceRef(7, TASK, VM, "VmInstanceVO", WHEN, WHEN)])


def _export(temp: str | None, since: str | None, reason: str | None) -> VolumeExport:
    return VolumeExport(
        TASK, VOL, "cbt-0123456789ab-000002", "libvirt-2-format", "cbt-s", "/s/x.qcow2",
        "cbt-job", "cbt-exp", temp, "incremental" if temp else "full", since, reason,
        1 << 20, 65536, "exported",
    )  # fmt: skip


def _backup(server: NbdServer, temp: str | None = "cbt-tmp-0123456789ab-000002") -> VolumeBackup:
    disk = DiskInfo(VOL, "virtio-disk0", "vda", 0, "/images/v.qcow2", "qcow2", "virtio")
    since = "cbt-0123456789ab-000001" if temp else None
    export = _export(temp, since, None if temp else "first Enable: full")
    return VolumeBackup(disk, export, server, b"\x01\x00", 65536, False)


def _doc_schema(component: str) -> dict[str, Any]:
    doc = openapi_document()
    return {"$ref": f"#/components/schemas/{component}", "components": doc["components"]}


def test_document_is_generated_from_the_models_and_valid_openapi_3_1() -> None:
    doc = openapi_document()
    assert doc["openapi"] == "3.1.0"
    validate(doc, cls=OpenAPIV31SpecValidator)
    assert doc["components"]["schemas"] == contract_openapi.component_schemas()
    for model in contract_openapi.MODELS:
        assert model.__name__ in doc["components"]["schemas"]
    info = doc["components"]["schemas"]["VolumeCbtBackupInfo"]
    aliases = [f.alias for f in VolumeCbtBackupInfo.model_fields.values()]
    assert list(info["properties"]) == aliases
    assert doc["components"]["schemas"]["TaskStatus"]["enum"] == list(TASK_STATUSES)
    assert "$defs" not in json.dumps(doc)


def test_inventory_on_the_wire() -> None:
    inv = replies.inventory_reply(_view())["inventory"]
    when = format_date(WHEN)  # ZStack's form, e.g. "Nov 7, 2026 1:05:03 PM" (local time)
    assert inv == {
        "uuid": TASK,
        "name": "nightly",
        "status": "Running",
        "createDate": when,
        "lastOpDate": when,
        "resourceRefs": [
            {
                "id": 7,
                "taskUuid": TASK,
                "resourceUuid": VM,
                "resourceType": "VmInstanceVO",
                "createDate": when,
                "lastOpDate": when,
            }
        ],
    }  # no description: Gson drops a null
    assert replies.inventory_reply(_view("d"))["inventory"]["description"] == "d"
    assert OAS31Validator(_doc_schema("CbtTaskInventory")).is_valid(inv)
    assert TaskRef.from_reply(inv) == TaskRef(TASK, "Running")
    back = CbtTaskInventory.model_validate(inv)
    assert back.create_date == WHEN.replace(microsecond=0)


def test_the_query_reads_what_the_model_holds() -> None:
    """Queries run over `query_item` (no model per task); it must hold the inventory model's
    keys and values, None standing for a field the model drops."""
    for view in (_view(), _view("d")):
        item = replies.query_item(view)
        dumped = replies.inventory(view).model_dump()
        assert {k: v for k, v in item.items() if v is not None} == dumped
        assert set(item) == set(CbtTaskInventory.model_json_schema(by_alias=True)["properties"])


def test_backup_info_full_keeps_its_meaningful_nulls() -> None:
    server = NbdServer("127.0.0.1", 10501)
    (info,) = replies.enable_reply([_backup(server, temp=None)])["volumeCbtBackupInfos"]
    assert (info["sinceBitmapName"], info["dirtyBitmapContext"]) == (None, None)
    assert info["reason"] == "first Enable: full"
    assert info["nbdPort"] == "10501"  # a string, as ZStack's SDK types it
    assert "nbdSocket" not in info and "nbdTls" not in info
    assert json.loads(info["metadata"]) == {
        "exportName": VOL,
        "dirtyBitmapContext": None,
        "sinceBitmapName": None,
        "reason": "first Enable: full",
        "granularity": 65536,
        "size": 1 << 20,
        "changedBytes": 65536,
        "quiesced": False,
    }
    assert info["volume"] == {
        "volumeUuid": VOL,
        "installPath": "/images/v.qcow2",
        "deviceId": 0,
        "deviceType": "file",
        "format": "qcow2",
        "useVirtio": True,
    }
    assert info["bitmapBase64"] == "AQA="
    assert OAS31Validator(_doc_schema("VolumeCbtBackupInfo")).is_valid(info)


def test_backup_info_on_a_unix_socket_with_tls() -> None:
    server = NbdServer(socket="/run/cbt/x.sock", tls=True)
    info = replies.backup_info(_backup(server)).wire()
    assert "nbdServer" not in info and "nbdPort" not in info
    assert (info["nbdSocket"], info["nbdTls"]) == ("/run/cbt/x.sock", True)
    meta = json.loads(info["metadata"])
    assert (meta["nbdSocket"], meta["nbdTls"]) == ("/run/cbt/x.sock", True)
    assert info["dirtyBitmapContext"] == "qemu:dirty-bitmap:cbt-tmp-0123456789ab-000002"
    parsed = VolumeBackupInfo.from_reply(info)
    assert (parsed.nbd_socket, parsed.nbd_tls, parsed.nbd_port) == ("/run/cbt/x.sock", True, None)
    assert parsed.since == "cbt-0123456789ab-000001" and parsed.mode == "incremental"


def test_client_reads_a_port_and_defaults() -> None:
    info = replies.backup_info(_backup(NbdServer("::1", 10999))).wire()
    del info["granularity"]
    parsed = VolumeBackupInfo.from_reply(info)
    assert (parsed.nbd_server, parsed.nbd_port) == ("::1", 10999)
    assert parsed.granularity == DEFAULT_GRANULARITY
    with pytest.raises(BackupError, match="malformed VolumeCbtBackupInfo"):
        VolumeBackupInfo.from_reply({"mode": "full"})


def test_changed_areas_page() -> None:
    export = _export("cbt-tmp-x", "cbt-0123456789ab-000001", None)
    page = replies.changed_areas(ChangedAreas(export, 0, 4096 * 32, [(0, 4096)], False))
    assert page["nextOffset"] == 4096 * 32 and page["changedAreas"] == [
        {"start": 0, "length": 4096}
    ]
    done = replies.changed_areas(ChangedAreas(export, 0, 1 << 20, [], True))
    assert done["nextOffset"] is None  # present: null means done
    assert OAS31Validator(_doc_schema("ChangedAreasPage")).is_valid(done)
    # the areas go in as plain objects (fast): the same JSON as the wire model's own
    areas = [(i * 8192, 4096) for i in range(100)]
    full = replies.changed_areas(ChangedAreas(export, 4096, 1 << 20, areas, True))
    assert full == ChangedAreasPage.model_validate(full).wire()
    assert list(full) == list(ChangedAreasPage.model_validate(full).wire())  # the key order
    assert full["changedAreas"][1] == {"start": 8192, "length": 4096}
    # and as the handler writes it: the same text as (compact) json.dumps of the page
    for p in (
        ChangedAreas(export, 4096, 1 << 20, areas, True),
        ChangedAreas(export, 0, 5, [], False),
    ):
        text = replies.changed_areas_json(p)
        assert text == json.dumps(replies.changed_areas(p), separators=(",", ":"))
    assert OAS31Validator(_doc_schema("ChangedAreasPage")).is_valid(full)


def test_error_code_drops_absent_fields_and_nests() -> None:
    err = ErrorCode(code="SYS.1006", description="d", details="x").wire()
    assert err == {"code": "SYS.1006", "description": "d", "details": "x"}
    assert OAS31Validator(_doc_schema("ErrorReply")).is_valid({"error": err})


def test_the_clients_reply_schema_is_generated_from_the_models() -> None:
    """The client checks replies against `reply_schema.SCHEMAS` (it never loads pydantic):
    those are the models' own OpenAPI components, regenerated with
    `python -m cbt_agent.contract.openapi` whenever a reply model changes."""
    from cbt_agent.contract import jsoncheck, reply_schema

    assert contract_openapi.client_reply_schemas() == reply_schema.SCHEMAS, (
        "cbt_agent/contract/reply_schema.py is stale: run `python -m cbt_agent.contract.openapi`"
    )
    components = contract_openapi.component_schemas()
    for name, schema in reply_schema.SCHEMAS.items():
        assert schema.get("properties", {}).keys() == components[name].get("properties", {}).keys()
    used: set[str] = set()

    def keywords(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                used.add(key)
                for child in value.values() if key == "properties" else [value]:
                    keywords(child)
        elif isinstance(node, list):
            for child in node:
                keywords(child)

    for schema in reply_schema.SCHEMAS.values():
        keywords(schema)
    assert used <= jsoncheck.KEYWORDS, used - jsoncheck.KEYWORDS


def _wire_backup_info() -> dict[str, Any]:
    return replies.backup_info(_backup(NbdServer("127.0.0.1", 10501))).wire()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("size"), r"VolumeCbtBackupInfo from the agent: size: missing"),
        (lambda d: d.update(size="1048576"), r"size: not integer \(got '1048576'\)"),
        (lambda d: d.update(size=True), r"size: not integer \(got True\)"),
        (lambda d: d.update(size=-1), r"size: less than 0 \(got -1\)"),
        (lambda d: d.update(granularity=0), r"granularity: less than 1"),
        (lambda d: d.update(mode="differential"), r"mode: not one of \['full', 'incremental'\]"),
        (lambda d: d.update(nbdPort="0"), r"nbdPort: does not match"),
        (lambda d: d.update(nbdPort=10501), r"nbdPort: not string"),
        (lambda d: d.update(nbdTls=False), r"nbdTls: must be True \(got False\)"),
        (lambda d: d["volume"].update(volumeUuid="../../etc"), r"volume\.volumeUuid: does not"),
        (lambda d: d["volume"].pop("useVirtio"), r"volume\.useVirtio: missing"),
        (lambda d: d.update(bitmapName="a/b"), r"bitmapName: does not match"),
        (lambda d: d.update(nbdTlsPsk="XYZ"), r"nbdTlsPsk: does not match"),
    ],
)
def test_the_client_refuses_what_the_model_refuses(change: Any, message: str) -> None:
    """Each break of the contract is refused by the client, naming the field, as the
    published OpenAPI schema refuses it (a full JSON Schema validator). The client is as strict
    as that schema: a number sent as a string, which the models' lax parsing would take, is
    not what the agent writes and is refused."""
    published = OAS31Validator(_doc_schema("VolumeCbtBackupInfo"))
    info = _wire_backup_info()
    assert published.is_valid(info)  # the unchanged reply passes both
    VolumeBackupInfo.from_reply(info)
    change(info)
    assert not published.is_valid(info)
    with pytest.raises(BackupError, match=message):
        VolumeBackupInfo.from_reply(info)


def test_the_client_refuses_a_bad_inventory() -> None:
    inv = replies.inventory_reply(_view())["inventory"]
    for key, value, message in (
        ("status", "Paused", r"status: not one of \['Created', 'Starting', 'Running'"),
        ("createDate", "yesterday", r"createDate: does not match"),
        ("resourceRefs", [{"id": 1}], r"resourceRefs\.0\.taskUuid: missing"),
        ("uuid", None, r"uuid: not string \(got None\)"),
    ):
        bad = {**inv, key: value}
        with pytest.raises(BackupError, match=r"malformed CbtTaskInventory from the agent: "):
            TaskRef.from_reply(bad)
        with pytest.raises(BackupError, match=message):
            TaskRef.from_reply(bad)
    with pytest.raises(BackupError, match=r"malformed CbtTaskInventory from the agent: reply: not"):
        TaskRef.from_reply(["not", "an", "object"])
