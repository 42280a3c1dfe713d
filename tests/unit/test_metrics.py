"""/metrics: figures kept current as things happen, read by a scrape without a scan of the
tasks. Unit level: the Metrics object, the store's commit hook, QMP errors through the router
over the fake QMP endpoint, and the API's own jobs through the app with a fake hypervisor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp.test_utils import TestClient, TestServer
from fakehv import FakeHypervisor, stopped_vm
from fakeqmp import FakeQmp
from prometheus_client.parser import text_string_to_metric_families

from cbt_agent import reasons
from cbt_agent.api.app import make_app
from cbt_agent.config import parse_config
from cbt_agent.errors import OperationError, QmpCommandError, QmpInterrupted
from cbt_agent.metrics import Metrics
from cbt_agent.model import TaskStatus, new_uuid
from cbt_agent.qemu.qmp import QmpRouter
from cbt_agent.store import SyncStore


def samples(text: str | bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    if isinstance(text, bytes):
        text = text.decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(all_samples: dict[Any, float], name: str, **labels: str) -> float:
    return all_samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_full_reason_classes() -> None:
    cases = {
        reasons.FULL_FIRST: "first",
        reasons.FULL_NONE_HANDED_OUT: "first",
        reasons.FULL_UNKNOWN.format(name="cbt-x"): "base",
        reasons.FULL_REMOVED.format(name="cbt-x"): "base",
        reasons.FULL_MISSING.format(bitmap="b"): "missing",
        reasons.FULL_INCONSISTENT.format(bitmap="b"): "inconsistent",
        reasons.TRACKING_LOST: "inconsistent",
        reasons.FULL_NEW_DISK.format(name="c"): "new_disk",
        reasons.FULL_RESIZED.format(name="c", old=1, new=2): "resized",
        reasons.FULL_LAYER_SIZE.format(image="i", old=1, new=2): "resized",
        reasons.FULL_NEW_TOP.format(old="a", new="b", bitmap="x"): "chain_changed",
        reasons.FULL_GAP.format(bitmap="b", image="i"): "chain_changed",
        reasons.FULL_BROKEN.format(name="n", why="a stream"): "chain_changed",
        "something new": "other",
    }
    assert {r: reasons.full_reason_class(r) for r in cases} == cases


def test_tasks_by_status_kept_current_and_only_by_commits(tmp_path: Path) -> None:
    m = Metrics()
    s = SyncStore(tmp_path / "db")
    try:
        s.metrics = m
        a, b = new_uuid(), new_uuid()
        s.create_task(a, "a", None, new_uuid(), [new_uuid()])
        s.create_task(b, "b", None, new_uuid(), [])
        s.set_status(a, TaskStatus.STARTING, "enable requested")
        s.set_status(a, TaskStatus.RUNNING, "exported")
        # refused (a rollback): nothing moves
        with pytest.raises(OperationError):
            s.set_status(b, TaskStatus.STOPPED, "x", expect={TaskStatus.RUNNING})
        with pytest.raises(RuntimeError), s._tx():
            s.set_status(b, TaskStatus.FAILED, "rolled back")
            raise RuntimeError("abort")
        s.delete_task(b, "deleted")
        got = samples(m.render(jobs_running=0, exports_open=1))
        assert {st.value: value(got, "cbt_agent_tasks", status=st.value) for st in TaskStatus} == {
            "Created": 0,
            "Starting": 0,
            "Running": 1,
            "Stopped": 0,
            "Failed": 0,
        }
        t = "cbt_agent_status_transitions_total"
        assert value(got, t, from_status="", to_status="Created") == 2
        assert value(got, t, from_status="Created", to_status="Starting") == 1
        assert value(got, t, from_status="Starting", to_status="Running") == 1
        assert value(got, t, from_status="Created", to_status="Deleted") == 1
        assert value(got, t, from_status="Created", to_status="Failed") == 0
        assert value(got, "cbt_agent_exports_open") == 1
        assert value(got, "process_cpu_seconds_total") > 0
        # a new agent on the same database starts from one aggregate query
        m2 = Metrics()
        m2.tasks_counted(s.counts()[0])
        got2 = samples(m2.render(jobs_running=0, exports_open=0))
        assert value(got2, "cbt_agent_tasks", status="Running") == 1
    finally:
        s.close()


def test_enable_results_and_jobs() -> None:
    m = Metrics()
    m.enabled(
        [
            ("full", reasons.FULL_FIRST, 0),
            ("full", reasons.FULL_NEW_DISK.format(name="c"), 0),
            ("incremental", None, 3 << 20),
            ("incremental", None, 1 << 20),
        ]
    )
    m.job_done("EnableCbtTask", "succeeded", 0.3)
    m.job_done("EnableCbtTask", "failed", 0.02)
    got = samples(m.render(jobs_running=2, exports_open=0))
    d = "cbt_agent_enable_disks_total"
    assert value(got, d, mode="full", reason="first") == 1
    assert value(got, d, mode="full", reason="new_disk") == 1
    assert value(got, d, mode="incremental", reason="") == 2
    assert value(got, "cbt_agent_changed_bytes_handed_out_total") == 4 << 20
    assert value(got, "cbt_agent_api_jobs_total", api="EnableCbtTask", outcome="failed") == 1
    h = "cbt_agent_operation_seconds"
    assert value(got, h + "_count", operation="enable") == 2
    assert value(got, h + "_bucket", operation="enable", le="0.025") == 1
    assert value(got, h + "_bucket", operation="enable", le="0.5") == 2
    assert value(got, "cbt_agent_jobs_running") == 2


async def test_qmp_errors_by_class(tmp_path: Path) -> None:
    vm = "ab" * 16
    fake = FakeQmp(tmp_path / f"{vm}.sock")
    await fake.start()
    m = Metrics()
    router = QmpRouter(str(tmp_path / "{vm_uuid}.sock"), None, m.qmp_failed)  # type: ignore[arg-type]
    try:
        fake.fail("blockdev-del", "Failed to find node", "DeviceNotFound")
        chan = await router.channel(vm)
        with pytest.raises(QmpCommandError):
            await chan.execute("blockdev-del", {"node-name": "x"})
        with pytest.raises(QmpCommandError):
            await chan.execute("no-such-command")
        fake.lose_reply("query-jobs")
        with pytest.raises(QmpInterrupted):
            await chan.execute("query-jobs")
    finally:
        await router.close()
        await fake.close()
    got = samples(m.render(jobs_running=0, exports_open=0))
    q = "cbt_agent_qmp_errors_total"
    assert value(got, q, error_class="DeviceNotFound") == 1
    assert value(got, q, error_class="CommandNotFound") == 1
    assert value(got, q, error_class="Interrupted") == 1


TOKEN = "metrics-test-token-0123456789"
AUTH = {"Authorization": f"OAuth {TOKEN}"}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    config = parse_config(
        {
            "api": {"tokens": [TOKEN]},
            "state": {"dir": str(tmp_path / "state")},
            "qmp": {"socket_template": str(tmp_path / "{vm_uuid}.sock")},
        }
    )
    hv = FakeHypervisor(stopped_vm("a" * 32, "1" * 32), stopped_vm("b" * 32, "2" * 32))
    c: TestClient[Any, Any] = TestClient(TestServer(make_app(config, hypervisor=hv)))  # type: ignore[arg-type]
    await c.start_server()
    yield c
    await c.close()


async def _call(c: TestClient[Any, Any], path: str, body: Any) -> int:
    r = await c.post(path, json=body, headers=AUTH)
    location = (await r.json())["location"]
    deadline = time.monotonic() + 10
    while True:
        r = await c.get(urlsplit(location).path, headers=AUTH)
        if r.status != 202:
            return r.status
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_a_scrape_through_the_api(client: TestClient[Any, Any]) -> None:
    create = "/zstack/v1/cbt-task/create"
    assert await _call(client, create, {"params": {"name": "a", "vmInstanceUuid": "a" * 32}}) == 200
    assert await _call(client, create, {"params": {"name": "b", "vmInstanceUuid": "b" * 32}}) == 200
    assert await _call(client, create, {"params": {"name": "c", "vmInstanceUuid": "nope"}}) == 503
    r = await client.get("/metrics", headers=AUTH)
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    got = samples(await r.text())
    assert value(got, "cbt_agent_tasks", status="Created") == 2
    assert value(got, "cbt_agent_tasks", status="Running") == 0
    jobs = "cbt_agent_api_jobs_total"
    assert value(got, jobs, api="CreateCbtTask", outcome="succeeded") == 2
    assert value(got, jobs, api="CreateCbtTask", outcome="failed") == 1
    assert value(got, "cbt_agent_operation_seconds_count", operation="create") == 3
    assert value(got, "cbt_agent_jobs_running") == 0
    assert value(got, "process_resident_memory_bytes") > 0
    r = await client.get("/metrics")
    assert r.status == 400  # a token, as for every route but /healthz


def test_scratch_breaks_and_the_cuts_pause() -> None:
    m = Metrics()
    m.export_breaks.labels("budget").inc()
    m.export_breaks.labels("filesystem").inc(2)
    m.cut_pause_seconds.observe(0.004)
    m.cut_pause_seconds.observe(0.015)
    got = samples(m.render(jobs_running=0, exports_open=1, scratch=(3 << 20, 16 << 20)))
    assert value(got, "cbt_agent_export_breaks_total", cause="budget") == 1
    assert value(got, "cbt_agent_export_breaks_total", cause="filesystem") == 2
    assert value(got, "cbt_agent_scratch_bytes") == 3 << 20
    assert value(got, "cbt_agent_scratch_budget_bytes") == 16 << 20
    p = "cbt_agent_cut_pause_seconds"
    assert value(got, p + "_bucket", le="0.005") == 1
    assert value(got, p + "_bucket", le="0.02") == 2
