"""Jobs beyond polling: ZStack's X-Web-Hook delivery, job-record expiry, and ZStack's offline
export APIs on a VM this host does not know (a clear error, never a 405 or a 500)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import stack
from aiohttp import web
from apiharness import CBT_TASK, Api, P, assert_error, assert_plain

from cbt_agent.api import webhooks
from cbt_agent.api.app import JOBS
from cbt_agent.config import Config
from cbt_agent.store import SyncStore

pytestmark = pytest.mark.stack


class Receiver:
    """A webhook receiver on loopback; answers `fail_first` requests with 500 first."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.received: list[tuple[dict[str, str], Any]] = []
        self.got = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=500)
        self.received.append((dict(request.headers), body))
        self.got.set()
        return web.Response(text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def test_webhook_gets_the_result_with_zstack_headers(
    api: Api, vm_factory: Callable[..., stack.TestVm], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhooks, "INTERVAL", 0.05)
    vm = vm_factory(start=False)
    hook = Receiver(fail_first=2)  # delivery is retried
    await hook.start()
    try:
        job = "f" * 32
        headers = {"X-Web-Hook": hook.url, "X-JSON-Schema": "true", "X-Job-UUID": job}
        await api.submit(
            "POST",
            f"{P}/cbt-task/create",
            {"params": {"name": "hooked", "vmInstanceUuid": vm.vm_uuid}},
            headers=headers,
        )
        await asyncio.wait_for(hook.got.wait(), 10)
        ((got_headers, body),) = hook.received
        assert got_headers["X-Job-UUID"] == job
        assert got_headers["X-Job-Success"] == "true"
        assert body["inventory"]["name"] == "hooked"
        assert body["schema"]["inventory"] == CBT_TASK
        # a failed job is delivered as ZStack's error with X-Job-Success false
        hook.got.clear()
        await api.submit(
            "POST",
            f"{P}/cbt-task/enable/{'e' * 32}",
            {"params": {}},
            headers={"X-Web-Hook": hook.url},
        )
        await asyncio.wait_for(hook.got.wait(), 10)
        got_headers, body = hook.received[1]
        assert got_headers["X-Job-Success"] == "false"
        assert body["error"]["code"] == "SYS.1007"
    finally:
        await hook.stop()


async def test_webhook_to_a_host_not_allowed_is_refused(
    start_api: Callable[..., Awaitable[Api]],
    make_config: Callable[..., Config],
    vm_factory: Callable[..., stack.TestVm],
) -> None:
    vm = vm_factory(start=False)
    api = await start_api(make_config(webhook_hosts=["mgmt.example"]))
    body = {"params": {"name": "n", "vmInstanceUuid": vm.vm_uuid}}
    for url, why in (
        ("http://127.0.0.1:1/hook", "host 127.0.0.1 is not in api.webhook_hosts"),
        ("file:///etc/passwd", "must be an http:// or https:// URL"),
    ):
        r = await api.request("POST", f"{P}/cbt-task/create", body, headers={"X-Web-Hook": url})
        assert_plain(r, 400, why)
    assert api.counts()["api_jobs"] == 0 and api.counts()["tasks"] == 0


async def test_finished_jobs_expire(api: Api, vm_factory: Callable[..., stack.TestVm]) -> None:
    vm = vm_factory(start=False)
    r = await api.call(
        "POST", f"{P}/cbt-task/create", {"params": {"name": "n", "vmInstanceUuid": vm.vm_uuid}}
    )
    assert r.status == 200
    jobs = api.client.server.app[JOBS]
    assert await jobs.expire() == 0  # a fresh job is kept
    old = (datetime.now(UTC) - timedelta(days=30)).isoformat()
    await jobs.store.run(lambda s: s.db.execute("UPDATE api_jobs SET finished = ?", (old,)))
    assert await jobs.expire() == 1
    assert api.counts()["api_jobs"] == 0
    assert await jobs.store.run(SyncStore.list_tasks) != []  # the task itself stays


async def test_offline_export_apis_answer_clearly_for_an_unknown_vm(api: Api) -> None:
    # ExportNbdVolumes / UnexportNbdVolumes are offered now (tests/integration/test_offline.py);
    # a VM this host does not know is a clear error, never a 405 or a 500
    body = {"params": {"vmInstanceUuid": "a" * 32}}
    r = await api.call("POST", f"{P}/cbt-task/exportvolume", body)
    assert_error(r, "SYS.1007", f"VM [uuid: {'a' * 32}] is not found on this host")
    r = await api.call("POST", f"{P}/cbt-task/unexportvolume", body)
    assert (r.status, r.body) == (200, {})  # nothing exported: nothing to end
    r = await api.call("POST", f"{P}/cbt-task/exportvolume", {"params": {}})
    assert_error(r, "SYS.1007", "missing mandatory field [vmInstanceUuid]")


async def test_polling_a_job_needs_a_known_token(
    api: Api, vm_factory: Callable[..., stack.TestVm]
) -> None:
    vm = vm_factory(start=False)
    location = await api.submit(
        "POST", f"{P}/cbt-task/create", {"params": {"name": "n", "vmInstanceUuid": vm.vm_uuid}}
    )
    path = location.split(api.base, 1)[1]
    assert_plain(await api.request("GET", path, token=None), 400, "missing header")
    r = await api.request("GET", path, token="not-a-token")
    assert (r.status, r.body["error"]["code"]) == (503, "ID.1001")
    assert (await api.poll(location)).status == 200  # with the token: the result
