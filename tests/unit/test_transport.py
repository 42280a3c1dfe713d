"""The client's HTTP connection (cbt_agent/client/transport.py) against a real HTTP server on
loopback that drops idle keep-alive connections, as the agent does after its
`api.keepalive_timeout`: a request after a long copy must not be lost on a dead connection."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

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
        assert await asyncio.to_thread(conn.request, "GET", f"{base}/a", params={"q": "x=1"}) == (
            200,
            {"method": "GET", "body": None},
        )
        await asyncio.sleep(KEEPALIVE * 3)  # the server closes the connection meanwhile
        # idle past IDLE_REUSE: a new connection, the POST is sent once and answered
        monkeypatch.setattr(transport, "IDLE_REUSE", KEEPALIVE / 2)
        status, reply = await asyncio.to_thread(
            conn.request, "POST", f"{base}/b", {"k": 1}, headers={"X-Test": "1"}
        )
        assert (status, reply) == (200, {"method": "POST", "body": {"k": 1}})
        # reused although the server dropped it: a GET is asked again on a new connection
        monkeypatch.setattr(transport, "IDLE_REUSE", 60.0)
        await asyncio.sleep(KEEPALIVE * 3)
        assert (await asyncio.to_thread(conn.request, "GET", f"{base}/c"))[0] == 200
        assert seen == ["GET /a?q=x%3D1 ", "POST /b 1", "GET /c "]
        # a POST on a connection the server dropped is never sent twice: an error, not a retry
        await asyncio.sleep(KEEPALIVE * 3)
        with pytest.raises(BackupError, match=f"cannot reach the agent at {re.escape(base)}"):
            await asyncio.to_thread(conn.request, "POST", f"{base}/d", {})
        assert "POST /d " not in seen
    finally:
        conn.close()


async def test_an_agent_that_is_not_there() -> None:
    conn = Connection("http://127.0.0.1:9")
    with pytest.raises(BackupError, match=r"cannot reach the agent at http://127\.0\.0\.1:9"):
        await asyncio.to_thread(conn.request, "GET", "http://127.0.0.1:9/x")


def test_origins_and_locations() -> None:
    assert origin("HTTP://Agent.Example:80/x") == ("http", "agent.example", 80)
    assert origin("http://agent.example/x") == ("http", "agent.example", 80)
    assert origin("https://agent.example/x") == ("https", "agent.example", 443)
    assert join("http://h:1", "/zstack/v1/api-jobs/x") == "http://h:1/zstack/v1/api-jobs/x"
    assert join("http://h:1", "http://other:2/y") == "http://other:2/y"
    with pytest.raises(ValueError):
        origin("http://h:port/")


async def _canned(reply: bytes) -> tuple[str, asyncio.AbstractServer, list[bytes]]:
    """A server that reads one request's head and answers `reply`, then closes."""
    got: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(reply)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}", srv, got


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b'HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n{"a": 1}', (200, {"a": 1})),
        (
            b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'3;x=y\r\n{"a\r\n5\r\n": 2}\r\n0\r\nX-Trailer: 1\r\n\r\n',
            (202, {"a": 2}),
        ),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 No\r\nContent-Length: 2\r\n\r\nhi",
            (503, "hi"),
        ),
        (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nto the end", (200, "to the end")),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", (204, "")),
    ],
)
async def test_replies_as_http_frames_them(reply: bytes, expected: tuple[int, Any]) -> None:
    base, srv, got = await _canned(reply)
    conn = Connection(base)
    try:
        assert await asyncio.to_thread(conn.request, "POST", f"{base}/x", {"k": 1}) == expected
        head = got[0].decode()
        assert head.startswith("POST /x HTTP/1.1\r\n")
        assert f"Host: {base.removeprefix('http://')}\r\n" in head
        assert "Content-Length: 8\r\n" in head and "Content-Type: application/json\r\n" in head
    finally:
        conn.close()
        srv.close()
        await srv.wait_closed()


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (b"", "connection closed without a reply"),
        (b"SMTP ready\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "connection closed inside"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length -1 out of range"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n", "more than 100 header lines"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n", "header line too long"),
    ],
)
async def test_a_reply_that_is_not_http_is_an_error(reply: bytes, problem: str) -> None:
    base, srv, _ = await _canned(reply)
    conn = Connection(base)
    try:
        with pytest.raises(BackupError, match=f"cannot reach the agent at .*{re.escape(problem)}"):
            await asyncio.to_thread(conn.request, "POST", f"{base}/x", {})
    finally:
        conn.close()
        srv.close()
        await srv.wait_closed()


def test_host_header_of_ipv6_and_default_ports() -> None:
    assert Connection("http://[::1]:7090")._host_header() == "[::1]:7090"
    assert Connection("http://agent.example")._host_header() == "agent.example"
    assert Connection("https://agent.example:443")._host_header() == "agent.example"
