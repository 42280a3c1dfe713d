"""The listening socket, guarded: what keeps the API answering under abuse.

- **A connection cap.** Past `api.max_connections` open connections (and never closer than 64
  to the process's file-descriptor limit) a new connection gets a bare `503` and is closed at
  once: the fds left serve `/healthz`, the running agent and its QMP and libvirt sockets.
- **A deadline for every request.** aiohttp's keep-alive timer (`api.keepalive_timeout`) also
  closes a connection that has not finished sending a request's headers in that time (it counts
  from the connection or the last reply): half-sent requests (slowloris) cannot hold sockets.
- **Malformed requests answered plainly.** aiohttp's 400 echoes the offending header line, and
  logs it with a traceback; here the reply is the bare status, and the log one line naming the
  peer and the kind of error, never what was sent (it may carry a token).
- **No log storm.** Repeated event-loop errors (`accept()` out of file descriptors) are logged
  once a minute with a count, not once per attempt with a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import ssl
import time
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

log = logging.getLogger(__name__)

FD_RESERVE = 64  # descriptors kept for the store, libvirt, QMP, NBD and child processes


def connection_cap(configured: int) -> int:
    """The cap actually applied: the configured one, or less when the fd limit is lower."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft - FD_RESERVE))


class _QuietRequestHandler(RequestHandler):
    def __init__(self, *args: Any, on_lost: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_lost = on_lost

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._on_lost is not None:
            self._on_lost()
            self._on_lost = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == HTTPStatus.INTERNAL_SERVER_ERROR:
            return super().handle_error(request, status, exc, message)
        # a request aiohttp could not parse: say which kind, never what was sent
        log.info("malformed request from %s: %d %s", request.remote, status, type(exc).__name__)
        reply = web.Response(
            status=status, text=f"{status} {HTTPStatus(status).phrase}\n", content_type="text/plain"
        )
        reply.force_close()
        return reply


_REFUSAL = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _Refused(asyncio.Protocol):
    """A connection past the cap: a bare 503, closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_REFUSAL)
        transport.close()


class _Throttled:
    """At most one warning a minute saying how many connections were refused."""

    def __init__(self) -> None:
        self.refused = 0
        self._last = 0.0

    def refuse(self, cap: int) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last >= 60:
            log.warning(
                "connection cap of %d reached: %d connection(s) refused so far", cap, self.refused
            )
            self._last = now


async def listen(
    runner: web.AppRunner,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None,
    max_connections: int,
) -> asyncio.Server:
    """Listen for the app `runner` set up, with the guards above. Closing is the caller's:
    `server.close()` before `runner.cleanup()`."""
    server = runner.server
    assert server is not None, "runner.setup() first"
    loop = asyncio.get_running_loop()
    cap = connection_cap(max_connections)
    kwargs: dict[str, Any] = dict(server._kwargs)  # what aiohttp's own handlers get
    throttle = _Throttled()
    # counted when made, not when aiohttp registers them: asyncio accepts a burst of
    # connections (up to the backlog) before any of them runs connection_made
    open_now = 0

    def lost() -> None:
        nonlocal open_now
        open_now -= 1

    def protocol() -> asyncio.Protocol:
        nonlocal open_now
        if open_now >= cap:
            throttle.refuse(cap)
            return _Refused()
        open_now += 1
        return _QuietRequestHandler(server, loop=loop, on_lost=lost, **kwargs)

    return await loop.create_server(protocol, host, port, ssl=ssl_context, reuse_address=True)


def quiet_loop_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log each kind of event-loop error at most once a minute, with how often it happened."""
    seen: dict[str, tuple[float, int]] = {}

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", "event loop error"))
        exc = context.get("exception")
        key = f"{message}: {type(exc).__name__}" if exc is not None else message
        now = time.monotonic()
        last, count = seen.get(key, (0.0, 0))
        if now - last < 60:
            seen[key] = (last, count + 1)
            return
        seen[key] = (now, 0)
        again = f" (and {count} more since the last report)" if count else ""
        if exc is not None and isinstance(exc, OSError):
            log.error("%s: %s%s", message, exc, again)  # no traceback: an OS condition
        else:
            log.error("%s%s", message, again, exc_info=exc)

    loop.set_exception_handler(handler)
