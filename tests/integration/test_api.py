"""The HTTP API on the real stack: `make_app` behind aiohttp's test server, real libvirt VMs,
a real SQLite file.

Every request goes through `Api.request`, which fails the test on any HTTP 500 and on any
job that ended in ZStack's internal error (SYS.1000): bad input must never become either.
Asynchronous calls are submitted, then polled on the path of their `location` until not 202.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import stack
from apiharness import (
    BACKUP_INFO,
    CBT_REF,
    CBT_TASK,
    EMPTY,
    EXTENSION_FIELDS,
    FULL_FIRST,
    HEX32,
    INFO_FIELDS,
    PREFIXES,
    TOKENS,
    VOLUME_TO,
    ZSTACK_DATE,
    Api,
    P,
    assert_error,
    assert_plain,
    cbt_bitmaps,
    clusters_bitmap,
    is_file,
    no_task_rows,
)
from prometheus_client.parser import text_string_to_metric_families

from cbt_agent import __version__
from cbt_agent.config import Config
from cbt_agent.qemu.fleece import access_node_name

pytestmark = pytest.mark.stack

# ---- 1. the happy path, on both prefixes ----------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_create_enable_disable_delete(
    api: Api, vm_factory: Callable[..., stack.TestVm], prefix: str
) -> None:
    vm = vm_factory([64, 48])
    r = await api.call(
        "POST",
        f"{prefix}/cbt-task/create",
        {"params": {"name": "nightly", "description": "d", "vmInstanceUuid": vm.vm_uuid}},
    )
    assert r.status == 200, r
    assert set(r.body) == {"inventory"}  # no schema unless asked for
    inv = r.body["inventory"]
    task = inv["uuid"]
    assert HEX32.match(task)
    assert set(inv) == {
        "uuid",
        "name",
        "description",
        "status",
        "createDate",
        "lastOpDate",
        "resourceRefs",
    }
    assert (inv["name"], inv["description"], inv["status"]) == ("nightly", "d", "Created")
    assert ZSTACK_DATE.match(inv["createDate"]), inv["createDate"]
    assert ZSTACK_DATE.match(inv["lastOpDate"]), inv["lastOpDate"]
    refs = inv["resourceRefs"]
    assert [(x["resourceUuid"], x["resourceType"]) for x in refs] == [
        (vm.vm_uuid, "VmInstanceVO"),
        (vm.volumes[0].volume_uuid, "VolumeVO"),
        (vm.volumes[1].volume_uuid, "VolumeVO"),
    ]
    for ref in refs:
        assert set(ref) == {
            "id",
            "taskUuid",
            "resourceUuid",
            "resourceType",
            "createDate",
            "lastOpDate",
        }
        assert type(ref["id"]) is int
        assert ref["taskUuid"] == task
        assert ZSTACK_DATE.match(ref["createDate"]) and ZSTACK_DATE.match(ref["lastOpDate"])
    assert len({ref["id"] for ref in refs}) == 3
    with api.db() as s:
        assert [(x.resource_uuid, x.resource_type) for x in s.resource_refs(task)] == [
            (x["resourceUuid"], x["resourceType"]) for x in refs
        ]
    # the query answers the same inventory
    q = await api.query(path=f"{prefix}/cbt-task/{task}")
    assert q.status == 200 and q.body["inventories"] == [inv]

    r = await api.call("POST", f"{prefix}/cbt-task/enable/{task}", {"params": {}})
    assert r.status == 200, r
    assert set(r.body) == {"volumeCbtBackupInfos"}
    infos = r.body["volumeCbtBackupInfos"]
    assert [i["volume"]["volumeUuid"] for i in infos] == [v.volume_uuid for v in vm.volumes]
    bitmap = infos[0]["bitmapName"]
    assert bitmap.startswith(f"cbt-{task[:12]}-")
    ports = {i["nbdPort"] for i in infos}
    # a string, as ZStack's Java SDK types it (a JSON number would reach Java as "12000.0")
    assert len(ports) == 1 and all(isinstance(p, str) for p in ports)
    assert 12000 <= int(ports.pop()) <= 12099
    for device_id, (info, vol) in enumerate(zip(infos, vm.volumes, strict=True)):
        assert set(info) == INFO_FIELDS, set(info) ^ INFO_FIELDS
        assert info["volume"] == {
            "volumeUuid": vol.volume_uuid,
            "installPath": str(vol.path),
            "deviceId": device_id,
            "deviceType": "file",
            "format": "qcow2",
            "useVirtio": True,
        }
        assert info["mode"] == "full"
        assert info["reason"] == FULL_FIRST
        assert info["sinceBitmapName"] is None
        assert info["dirtyBitmapContext"] is None
        assert info["bitmapName"] == bitmap
        assert info["nbdServer"] == "127.0.0.1"
        assert info["exportName"] == vol.volume_uuid
        assert info["size"] == vol.size
        assert info["granularity"] == 65536
        assert info["changedBytes"] == vol.size
        assert info["quiesced"] is False  # no guest agent in this VM: crash-consistent
        clusters = -(-vol.size // info["granularity"])
        bits = base64.b64decode(info["bitmapBase64"], validate=True)
        assert len(bits) == -(-clusters // 8)
        assert bits == clusters_bitmap(clusters)
        assert is_file(info["target"])
        assert info["scratchNodeName"]
        assert isinstance(info["metadata"], str)
        assert json.loads(info["metadata"]) == {k: info[k] for k in EXTENSION_FIELDS}
    # each export serves the disk's snapshot-access node, over its filter and scratch node
    exports = vm.qmp("query-block-exports")
    assert sorted(e["node-name"] for e in exports) == sorted(
        access_node_name(i["volume"]["volumeUuid"]) for i in infos
    )
    nodes = {n["node-name"] for n in vm.qmp("query-named-block-nodes", {"flat": True})}
    assert {i["scratchNodeName"] for i in infos} <= nodes
    assert api.status(task) == "Running"
    with api.db() as s:
        assert [c.name for c in s.checkpoints(task)] == [bitmap]
        assert {e.phase for e in s.exports(task)} == {"exported"}

    r = await api.call("POST", f"{prefix}/cbt-task/disable/{task}", {"params": {"force": False}})
    assert r.status == 200, r
    assert r.body["inventory"]["status"] == "Stopped"
    assert r.body["inventory"]["uuid"] == task
    assert vm.qmp("query-block-exports") == []
    assert not any(is_file(i["target"]) for i in infos)
    for vol in vm.volumes:  # the checkpoint stays for the next incremental
        assert cbt_bitmaps(vm, vol.volume_uuid) == [bitmap]

    r = await api.call("DELETE", f"{prefix}/cbt-task/{task}")
    assert (r.status, r.body) == (200, {})
    q = await api.query(path=f"{prefix}/cbt-task")
    assert (q.status, q.body) == (200, {"inventories": []})
    for vol in vm.volumes:
        assert cbt_bitmaps(vm, vol.volume_uuid) == []
    assert api.history(task) == ["Created", "Starting", "Running", "Stopped", "Deleted"]
    counts = api.counts()
    assert no_task_rows(counts) == {**no_task_rows(EMPTY), "transitions": 5}
    assert counts["api_jobs"] == 4


async def test_enable_incremental_and_schema(
    api: Api, vm_factory: Callable[..., stack.TestVm]
) -> None:
    vm = vm_factory([16])
    vol = vm.volumes[0]
    task = await api.create(vm.vm_uuid)
    first = (await api.enable(task))[0]
    r = await api.call("POST", f"{P}/cbt-task/disable/{task}", {"params": {}})
    assert r.status == 200, r
    await vm.write(vol.volume_uuid, 1 << 20, 65536)

    # a bitmapName that is no checkpoint name at all, through the job
    r = await api.call("POST", f"{P}/cbt-task/enable/{task}", {"params": {"bitmapName": "no!"}})
    assert_error(r, "SYS.1007", "bitmapName")
    assert api.status(task) == "Stopped"

    r = await api.call(
        "POST",
        f"{P}/cbt-task/enable/{task}",
        {"params": {"bitmapName": first["bitmapName"]}},
        headers={"X-JSON-Schema": "true"},
    )
    assert r.status == 200, r
    assert r.body["schema"] == {
        "volumeCbtBackupInfos[0]": BACKUP_INFO,
        "volumeCbtBackupInfos[0].volume": VOLUME_TO,
    }
    (info,) = r.body["volumeCbtBackupInfos"]
    assert info["mode"] == "incremental"
    assert info["sinceBitmapName"] == first["bitmapName"]
    assert info["bitmapName"] != first["bitmapName"]
    assert info["reason"] is None
    assert info["dirtyBitmapContext"].startswith(f"qemu:dirty-bitmap:cbt-tmp-{task[:12]}-")
    assert info["changedBytes"] == 65536
    clusters = vol.size // 65536
    assert base64.b64decode(info["bitmapBase64"]) == clusters_bitmap(clusters, {16})
    assert json.loads(info["metadata"]) == {k: info[k] for k in EXTENSION_FIELDS}

    # Disable with a force that is not a boolean, then a real forced Disable
    r = await api.call("POST", f"{P}/cbt-task/disable/{task}", {"params": {"force": "maybe"}})
    assert_error(r, "SYS.1007", "force")
    assert api.status(task) == "Running"
    r = await api.call("POST", f"{P}/cbt-task/disable/{task}", {"params": {"force": True}})
    assert r.status == 200 and r.body["inventory"]["status"] == "Stopped", r
    assert vm.qmp("query-block-exports") == []
    assert api.history(task) == [
        "Created",
        "Starting",
        "Running",
        "Stopped",
        "Starting",
        "Running",
        "Stopped",
    ]

    # the scrape moved by exactly what happened
    r = await api.request("GET", "/metrics")
    assert r.status == 200, r
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.body)
        for s in family.samples
    }

    def metric(name: str, **labels: str) -> float:
        return got.get((name, tuple(sorted(labels.items()))), 0.0)

    disks = "cbt_agent_enable_disks_total"
    assert metric(disks, mode="full", reason="first") == 1
    assert metric(disks, mode="incremental", reason="") == 1
    assert metric("cbt_agent_changed_bytes_handed_out_total") == 65536
    moved = "cbt_agent_status_transitions_total"
    assert metric(moved, from_status="", to_status="Created") == 1
    assert metric(moved, from_status="Created", to_status="Starting") == 1
    assert metric(moved, from_status="Starting", to_status="Running") == 2
    assert metric(moved, from_status="Running", to_status="Stopped") == 2
    assert metric(moved, from_status="Stopped", to_status="Starting") == 1
    jobs = "cbt_agent_api_jobs_total"
    assert metric(jobs, api="EnableCbtTask", outcome="succeeded") == 2
    assert metric(jobs, api="EnableCbtTask", outcome="failed") == 1
    assert metric(jobs, api="DisableCbtTask", outcome="succeeded") == 2
    assert metric(jobs, api="DisableCbtTask", outcome="failed") == 1
    assert metric("cbt_agent_operation_seconds_count", operation="enable") == 3
    assert metric("cbt_agent_tasks", status="Stopped") == 1
    assert metric("cbt_agent_exports_open") == 0


# ---- 2. X-Job-UUID and X-JSON-Schema ---------------------------------------------------------


async def test_job_uuid_header(api: Api, vm_factory: Callable[..., stack.TestVm]) -> None:
    vm = vm_factory(start=False)
    job = "0123456789abcdef0123456789abcdef"
    body = {"params": {"name": "t", "vmInstanceUuid": vm.vm_uuid}}
    location = await api.submit("POST", f"{P}/cbt-task/create", body, headers={"X-Job-UUID": job})
    assert location == f"{api.base}/zstack/v1/api-jobs/{job}"
    r = await api.poll(location)
    assert r.status == 200, r
    task = r.body["inventory"]["uuid"]
    with api.db() as s:
        stored = s.get_job(job)
        assert stored is not None and stored.api == "CreateCbtTask"
        assert stored.state == "Succeeded"

    before = api.counts()
    # a repeat, on the same API or another one, is refused at once and runs nothing
    r = await api.request("POST", f"{P}/cbt-task/create", body, headers={"X-Job-UUID": job})
    assert_plain(r, 400, "Duplicate job uuid", job)
    r = await api.request(
        "POST", f"{P}/cbt-task/enable/{task}", {"params": {}}, headers={"X-Job-UUID": job}
    )
    assert_plain(r, 400, "Duplicate job uuid")
    r = await api.request("DELETE", f"/v1/cbt-task/{task}", headers={"X-Job-UUID": job})
    assert_plain(r, 400, "Duplicate job uuid")
    for bad in ("xyz", job[:31], job + "0", "01234567-89ab-cdef-0123-456789abcdef", "g" * 32):
        r = await api.request("POST", f"{P}/cbt-task/create", body, headers={"X-Job-UUID": bad})
        assert_plain(r, 400, "X-Job-UUID")
    assert api.counts() == before
    assert api.status(task) == "Created"
    # the first job's result is unchanged
    r = await api.poll(location)
    assert r.status == 200 and r.body["inventory"]["uuid"] == task


async def test_json_schema(api: Api, vm_factory: Callable[..., stack.TestVm]) -> None:
    vms = [vm_factory([16, 16], start=False), vm_factory(start=False)]
    r = await api.call(
        "POST",
        f"{P}/cbt-task/create",
        {"params": {"name": "s", "vmInstanceUuid": vms[0].vm_uuid}},
        headers={"X-JSON-Schema": "true"},
    )
    assert r.status == 200, r
    assert set(r.body) == {"inventory", "schema"}
    assert list(r.body["schema"].items()) == [
        ("inventory", CBT_TASK),
        ("inventory.resourceRefs[0]", CBT_REF),
        ("inventory.resourceRefs[1]", CBT_REF),
        ("inventory.resourceRefs[2]", CBT_REF),
    ]
    await api.create(vms[1].vm_uuid, "t")

    # queries always carry the schema, parent before child
    for prefix in PREFIXES:
        q = await api.query(path=f"{prefix}/cbt-task")
        assert q.status == 200, q
        assert list(q.body["schema"].items()) == [
            ("inventories[0]", CBT_TASK),
            ("inventories[0].resourceRefs[0]", CBT_REF),
            ("inventories[0].resourceRefs[1]", CBT_REF),
            ("inventories[0].resourceRefs[2]", CBT_REF),
            ("inventories[1]", CBT_TASK),
            ("inventories[1].resourceRefs[0]", CBT_REF),
            ("inventories[1].resourceRefs[1]", CBT_REF),
        ]
    q = await api.query({"q": "name=t"}, headers={"X-JSON-Schema": "true"})
    assert q.body["schema"] == {
        "inventories[0]": CBT_TASK,
        "inventories[0].resourceRefs[0]": CBT_REF,
        "inventories[0].resourceRefs[1]": CBT_REF,
    }


# ---- 3. authentication ------------------------------------------------------------------------


async def test_auth(api: Api, vm_factory: Callable[..., stack.TestVm]) -> None:
    vm = vm_factory(start=False)
    body = {"params": {"name": "t", "vmInstanceUuid": vm.vm_uuid}}
    create = f"{P}/cbt-task/create"
    r = await api.request("POST", create, body, token=None)
    assert r.status == 400 and r.body == "missing header 'Authorization'", r
    assert r.content_type == "text/plain"
    for header in ("Bearer x", "OAuth", "OAuth   ", f"oauth {TOKENS[0]}", "Basic dG9rLWE6"):
        r = await api.request("POST", create, body, auth=header)
        assert_plain(r, 400, "Authorization")
    job = "fedcba9876543210fedcba9876543210"
    r = await api.request("POST", create, body, token="tok-c", headers={"X-Job-UUID": job})
    assert_error(r, "ID.1001")
    for method, path in (
        ("POST", f"{P}/cbt-task/enable/{vm.vm_uuid}"),
        ("POST", f"{P}/cbt-task/disable/{vm.vm_uuid}"),
        ("DELETE", f"/v1/cbt-task/{vm.vm_uuid}"),
        ("GET", f"{P}/cbt-task"),
        ("GET", f"/v1/cbt-task/{vm.vm_uuid}"),
        ("GET", "/metrics"),
    ):
        r = await api.request(method, path, token=TOKENS[0].replace("a", "A", 1))  # tok-A-...
        assert_error(r, "ID.1001")
        r = await api.request(method, path, token=None)
        assert_plain(r, 400, "missing header 'Authorization'")
    assert api.counts() == EMPTY  # no job for an unknown caller, nothing changed

    # both configured tokens work; the X-Job-UUID of the refused call was never taken
    location = await api.submit("POST", create, body, token=TOKENS[1], headers={"X-Job-UUID": job})
    assert location.endswith(job)
    r = await api.poll(location, token=TOKENS[0])
    assert r.status == 200, r
    for token in TOKENS:
        q = await api.query(token=token)
        assert [i["uuid"] for i in q.body["inventories"]] == [r.body["inventory"]["uuid"]]
    r = await api.request("GET", "/healthz", token=None)
    assert (r.status, r.body) == (200, {"status": "ok", "version": __version__})


# ---- 4. bad input, through the job -------------------------------------------------------------

VM = "<vm>"  # replaced by a real (defined) VM's uuid, so only the named field is wrong


@pytest.mark.parametrize(
    ("params", "needles"),
    [
        pytest.param({"vmInstanceUuid": VM}, ["[name]"], id="name-missing"),
        pytest.param({"name": "   ", "vmInstanceUuid": VM}, ["[name]"], id="name-blank"),
        pytest.param({"name": 5, "vmInstanceUuid": VM}, ["[name]"], id="name-not-string"),
        pytest.param({"name": "n" * 256, "vmInstanceUuid": VM}, ["[name]", "256"], id="name-256"),
        pytest.param(
            {"name": "t", "description": "d" * 2049, "vmInstanceUuid": VM},
            ["[description]", "2049"],
            id="description-2049",
        ),
        pytest.param({"name": "t"}, ["vmInstanceUuid"], id="vm-missing"),
        pytest.param({"name": "t", "vmInstanceUuid": "vm-1"}, ["vmInstanceUuid"], id="vm-bad"),
        pytest.param({"name": "t", "vmInstanceUuid": 42}, ["vmInstanceUuid"], id="vm-not-string"),
        pytest.param(
            {"name": "t", "vmInstanceUuid": "0" * 32},
            ["VM [uuid: 00000000000000000000000000000000] is not found"],
            id="vm-unknown",
        ),
        pytest.param(
            {"name": "t", "resourceUuids": [VM, "1" * 32]}, ["resourceUuids"], id="resources-2"
        ),
        pytest.param(
            {"name": "t", "resourceUuids": VM}, ["resourceUuids"], id="resources-not-list"
        ),
        pytest.param(
            {"name": "t", "vmInstanceUuid": VM, "resourceUuid": "x"},
            ["resourceUuid"],
            id="resource-uuid-bad",
        ),
        pytest.param(
            {"name": "t", "vmInstanceUuid": VM, "tagUuids": ["x"]},
            ["tagUuids"],
            id="tag-uuids-bad",
        ),
        pytest.param("not an object", ["[params]"], id="params-string"),
        pytest.param([{"name": "t"}], ["[params]"], id="params-list"),
    ],
)
async def test_create_bad_input(
    api: Api, vm_factory: Callable[..., stack.TestVm], params: Any, needles: list[str]
) -> None:
    vm = vm_factory(start=False)

    def fill(value: Any) -> Any:
        if value == VM:
            return vm.vm_uuid
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    r = await api.call("POST", f"{P}/cbt-task/create", {"params": fill(params)})
    assert_error(r, "SYS.1007", *needles)
    assert api.counts() == {**EMPTY, "api_jobs": 1}


async def test_create_bad_tags_beside_params(
    api: Api, vm_factory: Callable[..., stack.TestVm]
) -> None:
    vm = vm_factory(start=False)
    params = {"name": "t", "vmInstanceUuid": vm.vm_uuid}
    r = await api.call("POST", f"{P}/cbt-task/create", {"params": params, "systemTags": "x"})
    assert_error(r, "SYS.1007", "systemTags")
    assert api.counts() == {**EMPTY, "api_jobs": 1}
    # what the Java SDK sends: unknown keys, tags, requestIp: accepted
    r = await api.call(
        "POST",
        "/v1/cbt-task/create",
        {
            "params": {**params, "requestIp": "10.0.0.1", "tagUuids": [], "extra": 1},
            "systemTags": [],
            "userTags": ["u"],
        },
    )
    assert r.status == 200, r


async def test_body_not_json(api: Api) -> None:
    for data in (b"{not json", b"\xff\xfe", b"[1, 2]", b'"text"'):
        r = await api.request(
            "POST",
            f"{P}/cbt-task/create",
            data=data,
            headers={"Content-Type": "application/json"},
        )
        assert_plain(r, 400, "the request body")
    # the caller is checked before the body: an unknown token learns nothing about it
    r = await api.request(
        "POST", f"{P}/cbt-task/enable/{'a' * 32}", data=b"nope", token="unknown-token"
    )
    assert (r.status, r.body["error"]["code"]) == (503, "ID.1001")
    r = await api.request("POST", f"{P}/cbt-task/disable/{'a' * 32}", data=b"{")
    assert_plain(r, 400, "not valid JSON")
    assert api.counts() == EMPTY


async def test_body_too_large(
    start_api: Callable[..., Awaitable[Api]],
    make_config: Callable[..., Config],
    vm_factory: Callable[..., stack.TestVm],
) -> None:
    vm = vm_factory(start=False)
    api = await start_api(make_config(max_body_bytes=4096))
    body = {"params": {"name": "t", "vmInstanceUuid": vm.vm_uuid, "description": "d" * 5000}}
    r = await api.request("POST", f"{P}/cbt-task/create", body)
    assert r.status == 413, r
    assert api.counts() == EMPTY
    # just under the limit it is read, and judged by the job
    body["params"]["description"] = "d" * 3000
    r = await api.call("POST", f"{P}/cbt-task/create", body)
    assert_error(r, "SYS.1007", "[description]")
    assert api.counts() == {**EMPTY, "api_jobs": 1}


# ---- 5. one task per VM, resourceUuid -----------------------------------------------------------


async def test_one_task_per_vm_and_resource_uuid(
    api: Api, vm_factory: Callable[..., stack.TestVm]
) -> None:
    vm1, vm2, vm3 = (vm_factory(start=False) for _ in range(3))
    chosen = "abcdef0123456789abcdef0123456789"
    first = await api.create(vm1.vm_uuid, "first", resourceUuid=chosen)
    assert first == chosen

    r = await api.call(
        "POST", f"{P}/cbt-task/create", {"params": {"name": "x", "vmInstanceUuid": vm1.vm_uuid}}
    )
    assert_error(r, "SYS.1006", f"VM [uuid: {vm1.vm_uuid}] have been protected by task: {chosen}")
    with api.db() as s:
        assert [t.uuid for t in s.list_tasks()] == [chosen]

    # the uuid is taken (resourceUuids[0] stands for vmInstanceUuid)
    r = await api.call(
        "POST",
        f"{P}/cbt-task/create",
        {"params": {"name": "y", "resourceUuids": [vm2.vm_uuid], "resourceUuid": chosen}},
    )
    assert_error(r, "SYS.1006", f"CbtTask [uuid: {chosen}] already exists")
    counts = api.counts()
    assert (counts["tasks"], counts["resource_refs"], counts["transitions"]) == (1, 2, 1)

    r = await api.call(
        "POST", f"{P}/cbt-task/create", {"params": {"name": "y", "resourceUuids": [vm2.vm_uuid]}}
    )
    assert r.status == 200, r
    assert r.body["inventory"]["resourceRefs"][0]["resourceUuid"] == vm2.vm_uuid
    with api.db() as s:
        assert sorted(t.name for t in s.list_tasks()) == ["first", "y"]

    # two Creates for one VM at once: exactly one task
    body = {"params": {"name": "z", "vmInstanceUuid": vm3.vm_uuid}}
    replies = await asyncio.gather(
        *(api.call("POST", f"{P}/cbt-task/create", body) for _ in range(2))
    )
    assert sorted(r.status for r in replies) == [200, 503], replies
    winner = next(r for r in replies if r.status == 200).body["inventory"]["uuid"]
    loser = next(r for r in replies if r.status == 503)
    assert_error(loser, "SYS.1006", f"have been protected by task: {winner}")
    assert no_task_rows(api.counts())["tasks"] == 3


# ---- 6. Enable refusals -------------------------------------------------------------------------


async def test_enable_refusals(api: Api, vm_factory: Callable[..., stack.TestVm]) -> None:
    running, stopped = vm_factory(), vm_factory(start=False)
    unknown = "9" * 32
    r = await api.call("POST", f"{P}/cbt-task/enable/{unknown}", {"params": {}})
    assert_error(r, "SYS.1007", f"CbtTask [uuid: {unknown}] is not found")
    r = await api.call("POST", f"{P}/cbt-task/enable/not-a-uuid", {"params": {}})
    assert_error(r, "SYS.1007", "uuid must be a uuid", "not-a-uuid")
    r = await api.call("POST", f"{P}/cbt-task/disable/{unknown}", {"params": {}})
    assert_error(r, "SYS.1007", f"CbtTask [uuid: {unknown}] is not found")
    r = await api.call("POST", f"{P}/cbt-task/disable/{unknown[:-1]}", {"params": {}})
    assert_error(r, "SYS.1007", "uuid must be a uuid")

    # the VM is defined but not running: refused before anything changes
    idle = await api.create(stopped.vm_uuid, "idle")
    r = await api.call("POST", f"{P}/cbt-task/enable/{idle}", {"params": {}})
    assert_error(r, "SYS.1006", f"VM [uuid: {stopped.vm_uuid}] is not running")
    assert api.status(idle) == "Created"
    assert api.history(idle) == ["Created"]
    # Disable of a Created task changes nothing
    r = await api.call("POST", f"{P}/cbt-task/disable/{idle}", {"params": {}})
    assert r.status == 200 and r.body["inventory"]["status"] == "Created", r
    assert api.history(idle) == ["Created"]

    task = await api.create(running.vm_uuid, "live")
    # two Enables at once: one wins, the other finds the task Running
    replies = await asyncio.gather(
        *(api.call("POST", f"{P}/cbt-task/enable/{task}", {"params": {}}) for _ in range(2))
    )
    assert sorted(r.status for r in replies) == [200, 503], replies
    infos = next(r for r in replies if r.status == 200).body["volumeCbtBackupInfos"]
    refused = next(r for r in replies if r.status == 503)
    assert_error(refused, "SYS.1006", "has already enabled, please disable it")
    r = await api.call("POST", f"{P}/cbt-task/enable/{task}", {"params": {}})
    assert_error(r, "SYS.1006", f"CbtTask [uuid: {task}] has already enabled, please disable it")
    assert api.status(task) == "Running"
    assert api.history(task) == ["Created", "Starting", "Running"]
    exports = running.qmp("query-block-exports")
    assert [e["node-name"] for e in exports] == [access_node_name(infos[0]["volume"]["volumeUuid"])]
    with api.db() as s:
        assert len(s.checkpoints(task)) == 1
        assert s.checkpoints(idle) == [] and s.exports(idle) == []


@pytest.mark.parametrize("kind", ["raw", "qcow2 v2"])
async def test_enable_refuses_a_disk_that_cannot_hold_bitmaps(
    api: Api, vm_factory: Callable[..., stack.TestVm], kind: str
) -> None:
    """A raw disk, or a qcow2 v2 (compat=0.10) one, cannot hold persistent bitmaps: Enable is
    refused with the disk, its file and the fix named, before anything changes."""
    vm = vm_factory([16, 16], start=False)
    bad = vm.volumes[1]

    async def qemu_img(*args: str) -> None:
        await asyncio.to_thread(subprocess.run, ["qemu-img", *args], check=True)

    if kind == "raw":
        raw = bad.path.with_suffix(".raw")
        await qemu_img("convert", "-q", "-O", "raw", str(bad.path), str(raw))
        raw.rename(bad.path)
        # that disk's driver becomes raw (the first stays qcow2)
        disks = re.findall(r"<disk .*?</disk>", vm.domain().XMLDesc(0), re.S)
        mine = next(d for d in disks if str(bad.path) in d)
        xml = vm.domain().XMLDesc(0).replace(mine, mine.replace("type='qcow2'", "type='raw'"))
        stack.connection().defineXML(xml)
        what = "a raw image"
    else:
        await qemu_img("amend", "-q", "-f", "qcow2", "-o", "compat=0.10", str(bad.path))
        what = "a qcow2 v2 image (compat=0.10)"
    vm.start()
    task = await api.create(vm.vm_uuid)
    r = await api.call("POST", f"{P}/cbt-task/enable/{task}", {"params": {}})
    assert_error(
        r,
        "SYS.1006",
        f"disk {bad.volume_uuid} ({bad.path}) is {what}: it cannot hold persistent dirty "
        "bitmaps, so its changes cannot be tracked",
        "qemu-img amend -f qcow2 -o compat=1.1",
    )
    assert api.history(task) == ["Created"]
    for volume in vm.volumes:
        assert vm.bitmaps(volume.volume_uuid) == []
    assert vm.qmp("query-block-exports") == []
    assert vm.qmp("query-block-jobs") == []
    with api.db() as s:
        assert s.checkpoints(task) == [] and s.exports(task) == []


# ---- 7. Delete ----------------------------------------------------------------------------------


async def test_delete(api: Api, vm_factory: Callable[..., stack.TestVm]) -> None:
    vm = vm_factory([16, 16])
    r = await api.call("DELETE", f"{P}/cbt-task/{'5' * 32}")
    assert (r.status, r.body) == (200, {})
    r = await api.call("DELETE", f"{P}/cbt-task/not-a-uuid")
    assert_error(r, "SYS.1007", "uuid")

    task = await api.create(vm.vm_uuid)
    infos = await api.enable(task)
    assert len(vm.qmp("query-block-exports")) == 2
    for query, field in (("deleteMode=Bogus", "deleteMode"), ("force=maybe", "force")):
        r = await api.call("DELETE", f"{P}/cbt-task/{task}?{query}")
        assert_error(r, "SYS.1007", field)
        assert api.status(task) == "Running"
    assert len(vm.qmp("query-block-exports")) == 2

    # as the Java SDK sends it: query string, no body; a Running task is disabled first
    r = await api.call("DELETE", f"/v1/cbt-task/{task}?deleteMode=Permissive&force=false")
    assert (r.status, r.body) == (200, {})
    assert vm.qmp("query-block-exports") == []
    assert vm.qmp("query-jobs") == []
    for vol in vm.volumes:
        assert cbt_bitmaps(vm, vol.volume_uuid) == []
    assert not any(is_file(i["target"]) for i in infos)
    assert api.history(task) == ["Created", "Starting", "Running", "Stopped", "Deleted"]
    assert no_task_rows(api.counts()) == {**no_task_rows(EMPTY), "transitions": 5}

    r = await api.call("DELETE", f"{P}/cbt-task/{task}?deleteMode=Enforcing")
    assert (r.status, r.body) == (200, {})
    # the VM is free for a new task
    again = await api.create(vm.vm_uuid, "again")
    assert again != task


# ---- 8. queries ---------------------------------------------------------------------------------


async def test_queries(api: Api, vm_factory: Callable[..., stack.TestVm]) -> None:
    vm_a1, vm_a2 = vm_factory(start=False), vm_factory(start=False)
    vm_b1 = vm_factory()
    a1 = await api.create(vm_a1.vm_uuid, "a1", description="first")
    a2 = await api.create(vm_a2.vm_uuid, "a2")
    b1 = await api.create(vm_b1.vm_uuid, "b1")
    await api.enable(b1)
    r = await api.call("POST", f"{P}/cbt-task/disable/{b1}", {"params": {}})
    assert r.status == 200, r

    assert await api.names() == ["a1", "a2", "b1"]
    assert await api.names({"q": "name~=a%"}) == ["a1", "a2"]
    assert await api.names({"q": "name!~=a%"}) == ["b1"]
    assert await api.names({"q": "name!=a1"}) == ["a2", "b1"]
    assert await api.names([("q", "name~=a%"), ("q", "name!=a1")]) == ["a2"]
    assert await api.names({"q": "status?=Created,Stopped"}) == ["a1", "a2", "b1"]
    assert await api.names({"q": "status=Stopped"}) == ["b1"]
    assert await api.names({"q": "status!?=Created"}) == ["b1"]
    assert await api.names({"q": f"uuid={a2}"}) == ["a2"]
    assert await api.names({"q": f"resourceRefs.resourceUuid={vm_b1.vm_uuid}"}) == ["b1"]
    vol = vm_a1.volumes[0].volume_uuid
    assert await api.names({"q": f"resourceRefs.resourceUuid={vol}"}) == ["a1"]
    assert await api.names({"q": "resourceRefs.resourceType=VolumeVO"}) == ["a1", "a2", "b1"]
    assert await api.names({"q": "description is null"}) == ["a2", "b1"]
    assert await api.names({"q": "description not null"}) == ["a1"]
    assert await api.names({"q": "createDate>Jan 1, 2020 1:00:00 AM"}) == ["a1", "a2", "b1"]
    assert await api.names({"q": "createDate<Jan 1, 2020 1:00:00 AM"}) == []
    assert await api.names({"q": "createDate>2020-01-01T00:00:00Z"}) == ["a1", "a2", "b1"]
    # as the SDK encodes it, and a '+' offset that the query string turned into a space
    assert await api.names(
        path=f"{P}/cbt-task?q=createDate%3EJan%201%2C%202020%201%3A00%3A00%20AM"
    ) == ["a1", "a2", "b1"]
    assert await api.names(path=f"{P}/cbt-task?q=status%3F%3DCreated%2CStopped") == [
        "a1",
        "a2",
        "b1",
    ]
    assert await api.names(path=f"{P}/cbt-task?q=createDate>2020-01-01T01:00:00+01:00") == [
        "a1",
        "a2",
        "b1",
    ]
    with api.db() as s:
        a2_vm_ref = s.resource_refs(a2)[0].id
    assert await api.names({"q": f"resourceRefs.id={a2_vm_ref}"}) == ["a2"]

    for prefix in PREFIXES:
        assert await api.names(path=f"{prefix}/cbt-task/{a2}") == ["a2"]
    assert await api.names(path=f"{P}/cbt-task/{'7' * 32}") == []
    q = await api.query(path=f"{P}/cbt-task/{'7' * 32}")
    assert q.body == {"inventories": []}

    assert await api.names({"sort": "-name"}) == ["b1", "a2", "a1"]
    assert await api.names({"sort": "+name"}) == ["a1", "a2", "b1"]
    assert await api.names(path=f"{P}/cbt-task?sort=%2Bname") == ["a1", "a2", "b1"]
    q = await api.query({"limit": "1", "start": "1", "sort": "name"})
    assert [i["name"] for i in q.body["inventories"]] == ["a2"]
    assert "total" not in q.body
    q = await api.query({"count": "true"})
    assert (q.status, q.body) == (200, {"total": 3})
    q = await api.query({"count": "true", "q": "name~=a%"})
    assert q.body == {"total": 2}
    q = await api.query({"replyWithCount": "true", "limit": "1", "sort": "-name"})
    assert [i["name"] for i in q.body["inventories"]] == ["b1"]
    assert q.body["total"] == 3
    q = await api.query({"fields": "uuid,name"})
    assert q.body["inventories"] == [
        {"uuid": a1, "name": "a1"},
        {"uuid": a2, "name": "a2"},
        {"uuid": b1, "name": "b1"},
    ]
    assert q.body["schema"] == {f"inventories[{i}]": CBT_TASK for i in range(3)}

    # bad conditions and parameters: ZStack errors, never a 500
    for params, needle in (
        ({"q": "foo=1"}, "'foo'"),
        ({"q": "createDate>yesterday"}, "createDate"),
        ({"q": "createDate~=Jan%"}, "createDate"),
        ({"q": "resourceRefs.id=x"}, "resourceRefs.id"),
        ({"limit": "abc"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"start": "-1"}, "start"),
        ({"count": "maybe"}, "count"),
        ({"replyWithCount": "1"}, "replyWithCount"),
        ({"sort": "-bogus"}, "bogus"),
        ({"fields": "uuid,bogus"}, "bogus"),
    ):
        assert_error(await api.query(params), "SYS.1007", needle)
    for cond in ("name", "nameLIKEa", "=a1"):
        r = await api.query({"q": cond})
        assert_plain(r, 400, "invalid query condition")
    assert no_task_rows(api.counts())["tasks"] == 3


# ---- 9. routes and the extras -------------------------------------------------------------------


async def test_routes(api: Api, vm_factory: Callable[..., stack.TestVm]) -> None:
    for method, path in (
        ("GET", "/zstack/v1/nope"),
        ("GET", "/v2/cbt-task"),
        ("GET", "/zstack/v1/cbt-task/a/b"),
        ("POST", f"{P}/cbt-task/enable/"),
        ("GET", f"{P}/api-jobs/{'a' * 32}"),
        ("GET", f"{P}/api-jobs/not-a-job"),
        ("GET", f"/v1/api-jobs/{'b' * 32}"),
    ):
        r = await api.request(method, path)
        assert r.status == 404, (method, path, r)
    for method, path in (
        ("GET", f"{P}/cbt-task/create"),
        ("GET", "/v1/cbt-task/create"),
        ("DELETE", f"{P}/cbt-task/create"),
        ("PUT", f"{P}/cbt-task/create"),
        ("DELETE", f"{P}/cbt-task"),
        ("GET", f"{P}/cbt-task/enable/{'a' * 32}"),
        ("GET", f"{P}/cbt-task/disable/{'a' * 32}"),
        ("POST", f"{P}/api-jobs/{'a' * 32}"),
        ("DELETE", f"{P}/api-jobs/{'a' * 32}"),
        ("POST", "/healthz"),
    ):
        r = await api.request(method, path)
        assert r.status == 405, (method, path, r)
    assert api.counts() == EMPTY

    vm = vm_factory(start=False)
    await api.create(vm.vm_uuid)
    r = await api.request("GET", "/metrics")
    assert r.status == 200 and r.content_type == "text/plain", r
    lines = r.body.splitlines()
    assert 'cbt_agent_tasks{status="Created"} 1.0' in lines
    for status in ("Starting", "Running", "Stopped", "Failed"):
        assert f'cbt_agent_tasks{{status="{status}"}} 0.0' in lines
    assert "cbt_agent_jobs_running 0.0" in lines
    r = await api.request("GET", "/metrics", token=None)
    assert_plain(r, 400, "missing header 'Authorization'")
    r = await api.request("GET", "/healthz", token=None)
    assert r.status == 200 and r.body["status"] == "ok"


# ---- 10. restart ---------------------------------------------------------------------------------


async def test_job_survives_restart(
    start_api: Callable[..., Awaitable[Api]], vm_factory: Callable[..., stack.TestVm]
) -> None:
    vm = vm_factory(start=False)
    api = await start_api()
    job = "00112233445566778899aabbccddeeff"
    ok = await api.submit(
        "POST",
        f"{P}/cbt-task/create",
        {"params": {"name": "t", "vmInstanceUuid": vm.vm_uuid}},
        headers={"X-Job-UUID": job, "X-JSON-Schema": "true"},
    )
    done = await api.poll(ok)
    assert done.status == 200 and "schema" in done.body, done
    bad = await api.submit("POST", f"{P}/cbt-task/create", {"params": {}})
    failed = await api.poll(bad)
    assert_error(failed, "SYS.1007", "[name]")
    await api.close()

    again = await start_api(api.config)
    # the old location names the old server's port: its path is what counts
    assert await again.poll(ok) == done
    assert await again.poll(bad) == failed
    assert await again.request("GET", f"/v1/api-jobs/{job}") == done
    r = await again.request(
        "POST", f"{P}/cbt-task/create", {"params": {}}, headers={"X-Job-UUID": job}
    )
    assert_plain(r, 400, "Duplicate job uuid")
    q = await again.query()
    assert [i["uuid"] for i in q.body["inventories"]] == [done.body["inventory"]["uuid"]]
