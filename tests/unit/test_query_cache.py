"""QueryCbtTask from the inventories kept in memory, and api-job polls from memory: the answers
are byte for byte those of the path that reads everything from SQLite each time, and no
committed change is ever missed (a status change, a checkpoint, new refs, a delete, a write by
another process, a refresh that failed or whose caller went away)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp.test_utils import TestClient, TestServer
from fakehv import FakeHypervisor, stopped_vm

from cbt_agent.api import inventories, query, replies, zstack
from cbt_agent.api.app import INVENTORIES, JOBS, SERVICE, STORE, make_app
from cbt_agent.api.handlers import poll_reply
from cbt_agent.api.jobs import FinishedJobs
from cbt_agent.config import parse_config
from cbt_agent.contract.constants import QUERY_FIELDS, QUERY_LIMIT
from cbt_agent.contract.replies import INVENTORY_FIELDS
from cbt_agent.engine.results import TaskView
from cbt_agent.errors import CbtError, InvalidArgument
from cbt_agent.model import TaskStatus, new_uuid
from cbt_agent.store import ApiJob, ResourceRef, SyncStore
from cbt_agent.store.records import utcnow

P = "/zstack/v1"
TOKEN = "cache-test-token-0123456789"
AUTH = {"Authorization": f"OAuth {TOKEN}"}
VM_A = "a" * 32
VOL_A = "1" * 32

Client = TestClient[Any, Any]


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    config = parse_config(
        {
            "api": {"tokens": [TOKEN]},
            "state": {"dir": str(tmp_path / "state")},
            "qmp": {"socket_template": str(tmp_path / "{vm_uuid}.sock")},
            "nbd": {"listen": "127.0.0.1", "port_range": "12100:12199"},
        }
    )
    app = make_app(config, hypervisor=FakeHypervisor(stopped_vm(VM_A, VOL_A)))  # type: ignore[arg-type]
    c: Client = TestClient(TestServer(app))
    await c.start_server()
    yield c
    await c.close()


def _store(c: Client) -> Any:
    return c.server.app[STORE]


async def _add(c: Client, name: str, description: str | None = None, volumes: int = 1) -> str:
    """A task written through the agent's own store, as CreateCbtTask writes it."""
    uuid = new_uuid()
    vols = [new_uuid() for _ in range(volumes)]
    await _store(c).run(SyncStore.create_task, uuid, name, description, new_uuid(), vols)
    return uuid


# -- the path without memory: what the handler did before, from the database each time --------


def reference(views: list[TaskView], params: dict[str, Any], uuid: str | None) -> tuple[int, Any]:
    """(status, body) of QueryCbtTask computed from scratch: inventories built through the
    reply model, the query language over `query_item`s, json.dumps of the whole reply."""
    qs = params.get("q", [])
    conditions = query.parse_conditions([qs] if isinstance(qs, str) else qs)
    if uuid is not None:
        conditions.append(query.Condition("uuid", "=", uuid))
    try:
        limit = query.parse_int_param("limit", params.get("limit"), QUERY_LIMIT)
        start = query.parse_int_param("start", params.get("start"), 0) or 0
        count = query.parse_bool_param("count", params.get("count"), False)
        with_count = query.parse_bool_param("replyWithCount", params.get("replyWithCount"), False)
        fields = [f for f in (params.get("fields") or "").split(",") if f.strip()]
        items = [replies.query_item(v) for v in views]
        view_of = {id(item): v for item, v in zip(items, views, strict=True)}
        page, total = query.apply_query(
            items,
            conditions,
            fields=QUERY_FIELDS,
            sort=params.get("sort"),
            start=start,
            limit=limit,
        )
        if count:
            return 200, json.dumps({"total": total}).encode()
        replied = [replies.inventory(view_of[id(item)]).wire() for item in page]
        if fields:
            unknown = [f for f in fields if f not in INVENTORY_FIELDS]
            if unknown:
                raise InvalidArgument(f"unknown field {unknown[0]!r} in fields", field="fields")
            replied = [{k: v for k, v in inv.items() if k in fields} for inv in replied]
        body: dict[str, Any] = {"inventories": replied}
        if with_count:
            body["total"] = total
        schema = zstack.schema_map(body, zstack.REPLY_SCHEMA_CLASSES)
        if schema:
            body = {**body, "schema": schema}
        return 200, json.dumps(body).encode()
    except CbtError as e:
        return 503, {"error": zstack.error_from_exception(e)}


async def _agrees(c: Client, params: dict[str, Any], uuid: str | None = None) -> bytes:
    """The agent's reply equals the reference's (bytes; for an error, the ErrorCode)."""
    views = await c.server.app[SERVICE].task_views()
    want_status, want = reference(views, params, uuid)
    path = f"{P}/cbt-task" + (f"/{uuid}" if uuid else "")
    query_string = urlencode(params, doseq=True)
    r = await c.get(f"{path}?{query_string}" if query_string else path, headers=AUTH)
    got = await r.read()
    assert r.status == want_status, (params, got)
    if want_status == 200:
        assert r.content_type == "application/json" and r.charset == "utf-8"
        assert got == want, params
    else:
        assert json.loads(got) == want, params
    return got


async def _names(c: Client, **params: Any) -> list[str]:
    body = json.loads(await _agrees(c, params))
    return [i["name"] for i in body["inventories"]]


# -- the reply builder --------------------------------------------------------------------------


def test_inventory_wire_is_the_models_wire_form() -> None:
    now = datetime(2026, 12, 3, 17, 5, 9, 123456, tzinfo=UTC)
    task = new_uuid()

    def ref(i: int, kind: str) -> ResourceRef:
        return ResourceRef(i, task, new_uuid(), kind, now, now + timedelta(hours=i))

    from cbt_agent.model import CbtTask

    for description, refs in (
        (None, []),
        ("a backup", [ref(1, "VmInstanceVO")]),
        ('ünïcode "quoted"', [ref(1, "VmInstanceVO"), ref(2, "VolumeVO"), ref(3, "VolumeVO")]),
    ):
        for status in TaskStatus:
            t = CbtTask(task, "n", description, new_uuid(), status, now, now + timedelta(days=1))
            view = TaskView(t, refs)
            assert json.dumps(replies.inventory_wire(view)) == json.dumps(
                replies.inventory(view).wire()
            )


# -- the same answers -------------------------------------------------------------------------


@pytest.mark.parametrize("inline", [True, False], ids=["on-the-loop", "in-a-thread"])
async def test_answers_equal_the_uncached_path(
    client: Client, inline: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not inline:
        monkeypatch.setattr(inventories, "INLINE_ITEMS", 0)
    assert await _names(client) == []
    assert await _agrees(client, {"limit": "100"}) == b'{"inventories": []}'
    uuids = [
        await _add(client, f"t{i}", None if i % 3 == 0 else f"d{i}", volumes=i % 3)
        for i in range(12)
    ]
    store = _store(client)
    await store.run(SyncStore.set_status, uuids[1], TaskStatus.FAILED, "test")
    await store.run(SyncStore.set_status, uuids[2], TaskStatus.STARTING, "test")
    views = await client.server.app[SERVICE].task_views()
    vol = views[4].refs[1].resource_uuid
    queries: list[dict[str, Any]] = [
        {},
        {"limit": "100"},
        {"limit": "2", "start": "3"},
        {"start": "11"},
        {"start": "50"},
        {"limit": "0"},
        {"limit": "5", "replyWithCount": "true"},
        {"count": "true"},
        {"count": "true", "q": "status=Failed"},
        {"sort": "-name"},
        {"sort": "+createDate", "limit": "4"},
        {"sort": "lastOpDate"},
        {"sort": "-description"},
        {"q": "status=Failed"},
        {"q": "status?=Created,Starting", "sort": "-name", "limit": "3", "replyWithCount": "true"},
        {"q": ["name~=t1%", "status!=Failed"]},
        {"q": "description is null"},
        {"q": "description not null", "fields": "name,description"},
        {"q": f"resourceRefs.resourceUuid={vol}"},
        {"q": "resourceRefs.resourceType=VolumeVO", "count": "true"},
        {"q": f"uuid={uuids[5]}"},
        {"q": [f"uuid={uuids[5]}", "status=Failed"]},
        {"q": f"uuid={'9' * 32}"},
        {"q": f"uuid?={uuids[5]},{uuids[7]}"},
        {"q": "createDate>Jan 1, 2020 1:00:00 AM", "limit": "3"},
        {"fields": "uuid,name"},
        {"fields": "resourceRefs", "limit": "2", "replyWithCount": "true"},
        {"fields": "bogus"},
        {"fields": "bogus", "count": "true"},
        {"q": "bogus=1"},
        {"q": f"uuid={uuids[0]}", "fields": "bogus"},
        {"sort": "bogus"},
        {"limit": "-1"},
        {"start": "x"},
    ]
    for params in queries:
        await _agrees(client, params)
    for uuid in (uuids[3], "7" * 32):
        await _agrees(client, {}, uuid=uuid)
        await _agrees(client, {"fields": "name"}, uuid=uuid)


async def test_paths_and_bad_conditions_answer_as_before(client: Client) -> None:
    await _add(client, "x")
    r = await client.get(f"{P}/cbt-task", params={"q": "no operator"}, headers=AUTH)
    assert r.status == 400 and "no query operator" in await r.text()
    r = await client.get("/v1/cbt-task?limit=1", headers=AUTH)
    assert r.status == 200 and len((await r.json())["inventories"]) == 1


# -- never stale ----------------------------------------------------------------------------------


async def test_every_committed_change_shows_in_the_next_answer(client: Client) -> None:
    store = _store(client)
    a = await _add(client, "a")
    b = await _add(client, "b", "second")
    assert await _names(client, limit="100") == ["a", "b"]
    page = json.loads(await _agrees(client, {"limit": "100"}))["inventories"]
    assert [i["status"] for i in page] == ["Created", "Created"]

    # Enable's writes: a checkpoint, then the task Starting and Running
    seq = await store.run(SyncStore.next_checkpoint_seq, a)
    await store.run(SyncStore.add_checkpoint, a, seq, f"cbt-{a}-{seq}", [VOL_A], {VOL_A: 1 << 20})
    await _agrees(client, {"limit": "100"})
    await store.run(SyncStore.set_status, a, TaskStatus.STARTING, "enable")
    assert (await _status(client, a)) == "Starting"
    await store.run(SyncStore.set_status, a, TaskStatus.RUNNING, "checkpoint cut")
    await store.run(SyncStore.mark_handed_out, a, f"cbt-{a}-{seq}")
    assert (await _status(client, a)) == "Running"
    await _agrees(client, {"q": "status=Running"})

    # a disk plugged in, and one taken away: the refs
    new_vol = new_uuid()
    await store.run(SyncStore.sync_volume_refs, b, [new_vol])
    body = json.loads(await _agrees(client, {}, uuid=b))
    assert [r["resourceUuid"] for r in body["inventories"][0]["resourceRefs"]][1:] == [new_vol]
    await _agrees(client, {"q": f"resourceRefs.resourceUuid={new_vol}"})

    # a failure, a delete (its refs go by cascade), a new task
    await store.run(SyncStore.set_status, a, TaskStatus.FAILED, "broken")
    assert (await _status(client, a)) == "Failed"
    await store.run(SyncStore.delete_task, a, "deleted")
    assert await _names(client) == ["b"]
    await _agrees(client, {"q": f"uuid={a}"})
    await _agrees(client, {}, uuid=a)
    await _add(client, "c")
    assert await _names(client, sort="-name") == ["c", "b"]
    await _agrees(client, {"limit": "1", "start": "1", "replyWithCount": "true"})


async def _status(c: Client, uuid: str) -> str:
    body = json.loads(await _agrees(c, {}, uuid=uuid))
    return str(body["inventories"][0]["status"])


async def test_a_rolled_back_write_and_writes_of_other_columns(client: Client) -> None:
    store = _store(client)
    a = await _add(client, "a")
    await _agrees(client, {})
    with pytest.raises(CbtError):  # refused inside its transaction: nothing committed
        await store.run(
            SyncStore.set_status, a, TaskStatus.RUNNING, "x", expect={TaskStatus.RUNNING}
        )
    await _agrees(client, {})
    await store.run(SyncStore.set_operation, a, "enable")
    await store.run(SyncStore.set_tracking_lost, a, "why")
    await _agrees(client, {})


async def test_a_write_by_another_process_shows(client: Client) -> None:
    """Another process's commits show in any answer that starts EXTERNAL_CHECK after them
    (the agent's own, in the very next one: the other tests)."""
    await _add(client, "mine")
    assert await _names(client) == ["mine"]
    other = SyncStore(_store(client).path)  # another connection: no triggers of ours on it
    later = inventories.EXTERNAL_CHECK * 2
    try:
        theirs = new_uuid()
        other.create_task(theirs, "theirs", None, new_uuid(), [new_uuid()])
        await asyncio.sleep(later)
        assert await _names(client) == ["mine", "theirs"]
        other.set_status(theirs, TaskStatus.FAILED, "elsewhere")
        await asyncio.sleep(later)
        assert await _status(client, theirs) == "Failed"
        other.db.execute("UPDATE tasks SET name = 'renamed' WHERE uuid = ?", (theirs,))
        await asyncio.sleep(later)
        assert await _names(client) == ["mine", "renamed"]
        # the default order: create date, then the order written (rowid)
        other.db.execute("UPDATE tasks SET create_date = '2020-01-01T00:00:00.000000+00:00'")
        await asyncio.sleep(later)
        assert await _names(client) == ["mine", "renamed"]
        other.db.execute(
            "UPDATE tasks SET create_date = '2019-01-01T00:00:00.000000+00:00' WHERE uuid = ?",
            (theirs,),
        )
        await asyncio.sleep(later)
        assert await _names(client) == ["renamed", "mine"]
        await _agrees(client, {"sort": "createDate"})
    finally:
        other.close()


async def test_a_failed_refresh_reads_everything_next_time(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await _add(client, "a")
    await _agrees(client, {})
    real = SyncStore.task_changes

    def broken(self: SyncStore) -> Any:
        real(self)  # the changes are taken, then lost
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(SyncStore, "task_changes", broken)
    await _store(client).run(SyncStore.set_status, a, TaskStatus.FAILED, "x")
    r = await client.get(f"{P}/cbt-task", headers=AUTH)
    assert r.status == 503 and (await r.json())["error"]["code"] == "SYS.1000"
    monkeypatch.setattr(SyncStore, "task_changes", real)
    assert await _status(client, a) == "Failed"


async def test_a_query_that_goes_away_loses_no_change(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller is cancelled after the store thread has taken the list of changes: the
    refresh still applies them."""
    store = _store(client)
    a = await _add(client, "a")
    await _agrees(client, {})
    await store.run(SyncStore.set_status, a, TaskStatus.FAILED, "x")
    taken, release = threading.Event(), threading.Event()
    real = SyncStore.task_changes

    def slow(self: SyncStore) -> Any:
        changes = real(self)
        taken.set()
        release.wait(10)
        return changes

    monkeypatch.setattr(SyncStore, "task_changes", slow)
    waiting = asyncio.create_task(client.server.app[INVENTORIES].current())
    assert await asyncio.to_thread(taken.wait, 10)
    waiting.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    monkeypatch.setattr(SyncStore, "task_changes", real)
    assert await _status(client, a) == "Failed"


async def test_a_reply_computed_across_a_change_is_not_kept(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A query answered in a thread while a change is applied: its reply describes the moment
    it started, so it is not kept for the next asker."""
    monkeypatch.setattr(inventories, "INLINE_ITEMS", 0)
    a = await _add(client, "a")
    params = {"sort": "-name", "q": "name~=%"}
    await _agrees(client, params)
    started, release = threading.Event(), threading.Event()
    real = inventories._select

    def slow(listed: Any, q: Any) -> Any:
        started.set()
        release.wait(10)
        return real(listed, q)

    monkeypatch.setattr(inventories, "_select", slow)
    await _store(client).run(SyncStore.set_status, a, TaskStatus.FAILED, "x")
    cache = client.server.app[INVENTORIES]
    first = asyncio.create_task(
        cache.answer(
            inventories.TaskQuery(conditions=query.parse_conditions(["name~=%"]), sort="-name"),
            ("x", "y"),
        )
    )
    assert await asyncio.to_thread(started.wait, 10)
    await store_write_and_apply(client, a)
    release.set()
    assert b'"Failed"' in await first and b'"Stopped"' not in await first
    monkeypatch.setattr(inventories, "_select", real)
    assert await cache.cached(("x", "y")) is None
    assert await _status(client, a) == "Stopped"
    await _agrees(client, params)


async def store_write_and_apply(c: Client, uuid: str) -> None:
    await _store(c).run(SyncStore.set_status, uuid, TaskStatus.STOPPED, "y", expect=None)
    await c.server.app[INVENTORIES].current()


def test_the_change_feed_names_the_tasks_written(tmp_path: Path) -> None:
    s = SyncStore(tmp_path / "db")
    try:
        s.track_task_changes()
        assert s.take_changed_tasks() == (True, set())  # the first call: read everything
        a, b = new_uuid(), new_uuid()
        assert not s.has_changed_tasks()
        s.create_task(a, "a", None, new_uuid(), [new_uuid()])
        s.create_task(b, "b", None, new_uuid(), [])
        assert s.has_changed_tasks()
        assert s.take_changed_tasks() == (False, {a, b})
        assert not s.has_changed_tasks()
        s.set_operation(a, "enable")  # not a column an inventory shows
        s.add_checkpoint(a, 1, "cbt-1", [], {})
        assert s.take_changed_tasks() == (False, set())
        s.set_status(a, TaskStatus.STARTING, "x")
        s.sync_volume_refs(b, [new_uuid()])
        assert s.take_changed_tasks() == (False, {a, b})
        s.delete_task(a, "gone")
        changes = s.task_changes()
        assert (changes.full, changes.rows, changes.gone) == (False, [], frozenset({a}))
        other = SyncStore(tmp_path / "db")
        other.set_status(b, TaskStatus.FAILED, "elsewhere")
        other.close()
        changes = s.task_changes()
        assert changes.full and [r.task.status for r in changes.rows] == [TaskStatus.FAILED]
    finally:
        s.close()


# -- api-job polls --------------------------------------------------------------------------------


async def test_job_polls_answer_what_the_database_holds(client: Client) -> None:
    body = {"params": {"name": "polled", "vmInstanceUuid": VM_A}}
    r = await client.post(f"{P}/cbt-task/create", json=body, headers=AUTH)
    location = (await r.json())["location"]
    path = location[location.index(P) :]
    job_uuid = path.rsplit("/", 1)[1]
    jobs = client.server.app[JOBS]
    for _ in range(500):
        r = await client.get(path, headers=AUTH)
        if r.status != 202:
            break
        await asyncio.sleep(0.01)
    assert r.status == 200 and not jobs.is_running(job_uuid)
    stored = await _store(client).run(SyncStore.get_job, job_uuid)
    assert stored is not None and len(jobs.finished) == 1
    for schema in (False, True):
        headers = {**AUTH, "X-JSON-Schema": "true"} if schema else AUTH
        r = await client.get(path, headers=headers)
        assert (r.status, await r.read()) == poll_reply(stored, schema)
        assert r.charset == "utf-8"
    # a failed job, and one polled first after a restart (not in memory): the same
    r = await client.post(f"{P}/cbt-task/create", json=body, headers=AUTH)
    failed = (await r.json())["location"].rsplit("/", 1)[1]
    await asyncio.sleep(0.2)
    jobs.finished = FinishedJobs(3600)
    for uuid in (job_uuid, failed):
        stored = await _store(client).run(SyncStore.get_job, uuid)
        assert stored is not None
        for _ in range(2):  # from the database, then from memory
            r = await client.get(f"{P}/api-jobs/{uuid}", headers=AUTH)
            assert (r.status, await r.read()) == poll_reply(stored, False)
    assert (await client.get(f"{P}/api-jobs/{'0' * 32}", headers=AUTH)).status == 404


def _job(uuid: str, finished: datetime, result: dict[str, Any]) -> ApiJob:
    return ApiJob(
        uuid, "DeleteCbtTask", None, "Succeeded", False, None, result, None, finished, finished
    )


def _render(job: ApiJob, schema: bool) -> tuple[int, bytes]:
    return 200, json.dumps(job.result).encode()


def test_finished_jobs_forget_expired_and_least_polled() -> None:
    jobs = FinishedJobs(keep_seconds=60, max_bytes=8 << 10)
    old, fresh = new_uuid(), new_uuid()
    jobs.add(_job(old, utcnow() - timedelta(seconds=61), {}))
    jobs.add(_job(fresh, utcnow(), {"a": 1}))
    assert jobs.reply(old, False, _render) is None  # expired: the database says (404 by now)
    assert jobs.reply(fresh, False, _render) == (200, b'{"a": 1}')
    jobs.forget_older(utcnow() + timedelta(seconds=1))
    assert jobs.reply(fresh, False, _render) is None
    many = [new_uuid() for _ in range(40)]
    for uuid in many:
        jobs.add(_job(uuid, utcnow(), {"x": "y" * 200}))
        jobs.reply(many[0], False, _render)  # the first stays the most recently polled
    assert jobs.reply(many[0], False, _render) is not None
    assert jobs.reply(many[1], False, _render) is None
    assert 0 < len(jobs) < 40
    running = ApiJob(new_uuid(), "x", None, "Running", False, None, None, None, utcnow(), None)
    jobs.add(running)
    assert jobs.reply(running.uuid, False, _render) is None
