"""The client's HTTP: one keep-alive connection to the agent, the standard library's
`http.client` run in a thread (so the event loop never waits on the network), JSON in and out.

The backup client is a short-lived command: what it imports is paid on every run. An HTTP
client framework costs a third of a second to import here and brings nothing a few calls to
one agent need; `http.client` costs a few milliseconds. Redirects are never followed (a
redirect could lead the token anywhere) and each request carries its own Authorization
header, added by the caller after it checked where the request goes.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import time
from typing import Any
from urllib.parse import SplitResult, urlencode, urljoin, urlsplit

from cbt_agent.client.errors import BackupError

DEFAULT_PORTS = {"http": 80, "https": 443}
TIMEOUT = 60.0  # seconds for one request
# a connection idle this long is not reused: the agent (any server) may close an idle
# connection at any moment after its keep-alive timeout (the agent's: 15 s), and a request
# sent just then is lost without an answer; a fresh connection costs a connect
IDLE_REUSE = 2.0


def split(url: str) -> SplitResult:
    """`url` split; ValueError when it is not a URL (a port that is not a number)."""
    parts = urlsplit(url)
    _ = parts.port  # raises ValueError for a bad port
    return parts


def origin(url: str) -> tuple[str, str, int | None]:
    """What a URL's token may be sent to: scheme, host and port (the scheme's default filled
    in), compared case-insensitively as URLs are. ValueError when `url` is not a URL."""
    parts = split(url)
    scheme = parts.scheme.lower()
    return (scheme, (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(scheme))


def join(base: str, location: str) -> str:
    """`location` (absolute, or relative to `base`) as an absolute URL."""
    joined = urljoin(base + "/", location)
    split(joined)
    return joined


def has_credentials(url: str) -> bool:
    parts = urlsplit(url)
    return parts.username is not None or parts.password is not None


class Connection:
    """Requests to one origin, one at a time, over one kept-alive connection."""

    def __init__(self, base: str, context: ssl.SSLContext | None = None) -> None:
        self.base = base
        self.scheme, self.host, self.port = origin(base)
        self.context = context
        self._conn: http.client.HTTPConnection | None = None
        self._used = 0.0  # monotonic time the connection last answered
        self._lock = asyncio.Lock()

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.scheme == "https":
                self._conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=TIMEOUT, context=self.context
                )
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def request(
        self,
        method: str,
        url: str,
        body: Any = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """(status, the reply's JSON, or its text when it is not JSON). BackupError when the
        agent cannot be reached or the connection fails."""
        parts = split(url)
        target = parts.path or "/"
        query = "&".join(q for q in (parts.query, urlencode(params or {})) if q)
        if query:
            target += "?" + query
        data = None if body is None else json.dumps(body).encode()
        sent = {"Accept": "application/json", **(headers or {})}
        if data is not None:
            sent["Content-Type"] = "application/json"
        async with self._lock:
            return await asyncio.to_thread(self._send, method, target, data, sent)

    def _send(
        self, method: str, target: str, data: bytes | None, headers: dict[str, str]
    ) -> tuple[int, Any]:
        if self._conn is not None and time.monotonic() - self._used > IDLE_REUSE:
            self.close()
        reused = self._conn is not None
        try:
            status, raw, closing = self._exchange(method, target, data, headers)
        except (OSError, http.client.HTTPException) as e:
            self.close()
            if not (reused and method == "GET"):
                raise self._unreachable(e) from None
            # the server closed the kept-alive connection as the request went out: a GET is
            # asked again on a new one (anything else may have been received: never twice)
            try:
                status, raw, closing = self._exchange(method, target, data, headers)
            except (OSError, http.client.HTTPException) as e2:
                self.close()
                raise self._unreachable(e2) from None
        self._used = time.monotonic()
        if closing:
            self.close()
        text = raw.decode("utf-8", "replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def _exchange(
        self, method: str, target: str, data: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes, bool]:
        conn = self._connection()
        conn.request(method, target, body=data, headers=headers)
        reply = conn.getresponse()
        return reply.status, reply.read(), reply.will_close

    def _unreachable(self, e: BaseException) -> BackupError:
        return BackupError(f"cannot reach the agent at {self.base}: {e or type(e).__name__}")
