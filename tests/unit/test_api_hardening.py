"""Malformed and abusive input at the API, without libvirtd (the app with a fake hypervisor):
each answer is a 400 or a ZStack error naming the field, never a traceback; callers cannot
make the agent send their token elsewhere or pile up jobs; webhooks reach allowed addresses
only, and never follow a redirect."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from fakehv import FakeHypervisor, stopped_vm

from cbt_agent.api import validate, webhooks
from cbt_agent.api.app import SERVICE, make_app
from cbt_agent.config import parse_config
from cbt_agent.errors import InvalidArgument
from cbt_agent.store import ApiJob

TOKEN = "hardening-test-token-0123456789"
AUTH = {"Authorization": f"OAuth {TOKEN}"}
P = "/zstack/v1"
VMS = [("a" * 32, "1" * 32), ("b" * 32, "2" * 32), ("c" * 32, "3" * 32)]


def _app(tmp_path: Path, **api: Any) -> web.Application:
    config = parse_config(
        {
            "api": {"tokens": [TOKEN], **api},
            "state": {"dir": str(tmp_path / "state")},
            "qmp": {"socket_template": str(tmp_path / "{vm_uuid}.sock")},
        }
    )
    hv = FakeHypervisor(*(stopped_vm(vm, vol) for vm, vol in VMS))
    return make_app(config, hypervisor=hv)  # type: ignore[arg-type]


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    c: TestClient[Any, Any] = TestClient(TestServer(_app(tmp_path, max_jobs_per_caller=2)))
    await c.start_server()
    yield c
    await c.close()


async def test_a_huge_integer_is_a_field_error(client: TestClient[Any, Any]) -> None:
    for name in ("limit", "start"):
        r = await client.get(f"{P}/cbt-task", params={name: "9" * 5000}, headers=AUTH)
        body = await r.json()
        assert r.status == 503 and body["error"]["code"] == "SYS.1007", body
        assert body["error"]["details"].startswith(f"{name} is out of range, got '9999")
        assert len(body["error"]["details"]) < 100  # the value is not echoed whole


def test_a_trailing_newline_is_no_name() -> None:
    """`^...$` with re.match accepts "x\n": every check matches the whole value."""
    with pytest.raises(InvalidArgument, match="uuid"):
        validate.require_uuid("a" * 32 + "\n", "uuid")
    with pytest.raises(InvalidArgument, match="bitmapName"):
        validate.enable_task("a" * 32, {"params": {"bitmapName": "cbt-aaaaaaaaaaaa-000001\n"}})
    with pytest.raises(InvalidArgument, match="vmInstanceUuid"):
        validate.create_task({"params": {"name": "n", "vmInstanceUuid": "b" * 32 + "\n"}})


async def test_a_trailing_newline_is_no_uuid(client: TestClient[Any, Any]) -> None:
    r = await client.get(f"{P}/api-jobs/{'a' * 32}%0A", headers=AUTH)
    assert r.status == 404 and (await r.text()).startswith("no job[uuid: "), await r.text()
    r = await client.post(f"{P}/cbt-task/enable/{'a' * 32}%0A", json={"params": {}}, headers=AUTH)
    location = (await r.json())["location"]
    r = await _poll(client, location)
    assert r[0] == 503 and r[1]["error"]["code"] == "SYS.1007", r


async def test_a_token_that_is_not_printable_ascii_is_a_plain_400(
    client: TestClient[Any, Any],
) -> None:
    for token in ("tök", "a\tb", "\u202ehidden"):
        r = await client.get(f"{P}/cbt-task", headers={"Authorization": f"OAuth {token}"})
        assert r.status == 400
        assert await r.text() == "Authorization header must be 'OAuth <session uuid>'"


async def test_the_location_comes_from_the_socket_not_the_host_header(
    client: TestClient[Any, Any],
) -> None:
    r = await client.post(
        f"{P}/cbt-task/create",
        json={"params": {"name": "n", "vmInstanceUuid": VMS[0][0]}},
        headers={**AUTH, "Host": "evil.example:80"},
    )
    location = (await r.json())["location"]
    assert location.startswith(f"http://127.0.0.1:{client.port}/zstack/v1/api-jobs/"), location


async def _poll(c: TestClient[Any, Any], location: str) -> tuple[int, Any]:
    path = "/" + location.split("/", 3)[3]
    deadline = time.monotonic() + 10
    while True:
        r = await c.get(path, headers=AUTH)
        if r.status != 202:
            return r.status, await r.json()
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_running_jobs_are_capped_per_caller(client: TestClient[Any, Any]) -> None:
    service = client.app[SERVICE]
    release = asyncio.Event()
    original = service.create

    async def slow_create(cmd: Any) -> Any:
        await release.wait()
        return await original(cmd)

    service.create = slow_create  # type: ignore[method-assign]
    locations = []
    for vm, _vol in VMS[:2]:
        r = await client.post(
            f"{P}/cbt-task/create",
            json={"params": {"name": vm[:4], "vmInstanceUuid": vm}},
            headers=AUTH,
        )
        assert r.status == 202
        locations.append((await r.json())["location"])
    r = await client.post(
        f"{P}/cbt-task/create",
        json={"params": {"name": "third", "vmInstanceUuid": VMS[2][0]}},
        headers=AUTH,
    )
    body = await r.json()
    assert r.status == 503 and body["error"]["code"] == "SYS.1006", body
    assert "2 api jobs running (api.max_jobs_per_caller)" in body["error"]["details"]
    release.set()
    for location in locations:
        assert (await _poll(client, location))[0] == 200
    # finished jobs free their places
    r = await client.post(
        f"{P}/cbt-task/create",
        json={"params": {"name": "third", "vmInstanceUuid": VMS[2][0]}},
        headers=AUTH,
    )
    assert r.status == 202
    assert (await _poll(client, (await r.json())["location"]))[0] == 200


async def test_a_long_webhook_url_is_refused_and_not_echoed(client: TestClient[Any, Any]) -> None:
    url = "http://127.0.0.1/" + "x" * 3000
    r = await client.post(
        f"{P}/cbt-task/create",
        json={"params": {"name": "n", "vmInstanceUuid": VMS[0][0]}},
        headers={**AUTH, "X-Web-Hook": url},
    )
    text = await r.text()
    assert r.status == 400 and text.endswith(": longer than 2048 characters"), text
    assert len(text) < 300


async def test_the_resolver_keeps_allowed_addresses_only() -> None:
    allowed = await webhooks.pinned_addresses(["localhost", "10.1.2.3"])
    assert ipaddress.ip_address("127.0.0.1") in allowed
    assert ipaddress.ip_address("10.1.2.3") in allowed
    resolver = webhooks.AllowListResolver(allowed)
    try:
        kept = await resolver.resolve("127.0.0.1", 80)
        assert [r["host"] for r in kept] == ["127.0.0.1"]
        with pytest.raises(OSError, match=r"127\.0\.0\.2: not an allowed address"):
            await resolver.resolve("127.0.0.2", 80)
    finally:
        await resolver.close()


async def test_a_webhook_never_follows_a_redirect() -> None:
    hits: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        hits.append("hook")
        raise web.HTTPFound("/elsewhere")

    async def elsewhere(request: web.Request) -> web.Response:
        hits.append("elsewhere")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", redirect)
    app.router.add_post("/elsewhere", elsewhere)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    outcomes: list[str] = []
    old = webhooks.TRIES, webhooks.INTERVAL
    webhooks.TRIES, webhooks.INTERVAL = 2, 0.01
    http = webhooks.session(await webhooks.pinned_addresses(["127.0.0.1"]))
    try:
        hook = f"http://127.0.0.1:{port}/hook"
        now = datetime.now(UTC)
        job = ApiJob("f" * 32, "CreateCbtTask", None, "Succeeded", False, hook, {}, None, now, now)
        await webhooks.deliver(http, job, (200, {}), outcomes.append)
    finally:
        webhooks.TRIES, webhooks.INTERVAL = old
        await http.close()
        await runner.cleanup()
    assert hits == ["hook", "hook"]
    assert outcomes == ["retried", "retried", "gave_up"]
