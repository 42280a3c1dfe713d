"""The client's HTTP connection (cbt_agent/client/transport.py) against a real HTTP server on
loopback that drops idle keep-alive connections, as the agent does after its
`api.keepalive_timeout`: a request after a long copy must not be lost on a dead connection."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from cbt_agent.client import transport
from cbt_agent.client.errors import BackupError
from cbt_agent.client.transport import Connection, join, origin

KEEPALIVE = 0.2  # the server closes a connection idle this long


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, list[str]]]:
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path_qs} {request.headers.get('X-Test', '')}")
        body = await request.json() if request.can_read_body else None
        return web.json_response({"method": request.method, "body": body})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, keepalive_timeout=KEEPALIVE)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_a_request_after_the_server_dropped_the_idle_connection_goes_through(
    server: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, seen = server
    conn = Connection(base)
    try:
        assert await conn.request("GET", f"{base}/a", params={"q": "x=1"}) == (
            200,
            {"method": "GET", "body": None},
        )
        await asyncio.sleep(KEEPALIVE * 3)  # the server closes the connection meanwhile
        # idle past IDLE_REUSE: a new connection, the POST is sent once and answered
        monkeypatch.setattr(transport, "IDLE_REUSE", KEEPALIVE / 2)
        status, reply = await conn.request("POST", f"{base}/b", {"k": 1}, headers={"X-Test": "1"})
        assert (status, reply) == (200, {"method": "POST", "body": {"k": 1}})
        # reused although the server dropped it: a GET is asked again on a new connection
        monkeypatch.setattr(transport, "IDLE_REUSE", 60.0)
        await asyncio.sleep(KEEPALIVE * 3)
        assert (await conn.request("GET", f"{base}/c"))[0] == 200
        assert seen == ["GET /a?q=x%3D1 ", "POST /b 1", "GET /c "]
        # a POST on a connection the server dropped is never sent twice: an error, not a retry
        await asyncio.sleep(KEEPALIVE * 3)
        with pytest.raises(BackupError, match=f"cannot reach the agent at {re.escape(base)}"):
            await conn.request("POST", f"{base}/d", {})
        assert "POST /d " not in seen
    finally:
        conn.close()


async def test_an_agent_that_is_not_there() -> None:
    conn = Connection("http://127.0.0.1:9")
    with pytest.raises(BackupError, match=r"cannot reach the agent at http://127\.0\.0\.1:9"):
        await conn.request("GET", "http://127.0.0.1:9/x")


def test_origins_and_locations() -> None:
    assert origin("HTTP://Agent.Example:80/x") == ("http", "agent.example", 80)
    assert origin("http://agent.example/x") == ("http", "agent.example", 80)
    assert origin("https://agent.example/x") == ("https", "agent.example", 443)
    assert join("http://h:1", "/zstack/v1/api-jobs/x") == "http://h:1/zstack/v1/api-jobs/x"
    assert join("http://h:1", "http://other:2/y") == "http://other:2/y"
    with pytest.raises(ValueError):
        origin("http://h:port/")
