"""The client's HTTP: one keep-alive HTTP/1.1 connection to the agent, blocking (the client
does one thing at a time), JSON in and out.

The backup client is a short-lived command: what it imports is paid on every run. An HTTP
client framework costs a third of a second to import here, and even the standard library's
`http.client` (~40 ms, for its e-mail header parser) is more than the few calls to one agent
need: a request line, a few headers, a body of Content-Length or chunks. Redirects are never
followed (a redirect could lead the token anywhere) and each request carries its own
Authorization header, added by the caller after it checked where the request goes.
"""

from __future__ import annotations

import json
import socket
import time
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import SplitResult, urlencode, urljoin, urlsplit

from cbt_agent.client.errors import BackupError

if TYPE_CHECKING:
    import ssl

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


MAX_LINE = 65536  # bytes in the status line or one header line
MAX_HEADERS = 100
MAX_BODY = 1 << 30  # a reply's bytes (an Enable of many 64 TiB disks is a few hundred MiB)


class ProtocolError(OSError):
    """The reply is not HTTP/1.x (or the connection ended inside it)."""


class Connection:
    """Requests to one origin, one at a time, over one kept-alive connection."""

    def __init__(self, base: str, context: ssl.SSLContext | None = None) -> None:
        self.base = base
        self.scheme, self.host, self.port = origin(base)
        self.context = context
        self._sock: socket.socket | None = None
        self._file: BinaryIO | None = None
        self._used = 0.0  # monotonic time the connection last answered

    def _connection(self) -> tuple[socket.socket, BinaryIO]:
        if self._sock is None or self._file is None:
            sock = socket.create_connection((self.host, self.port or 80), timeout=TIMEOUT)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.scheme == "https":
                    context = self.context
                    if context is None:
                        import ssl

                        context = ssl.create_default_context()
                    sock = context.wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
            self._sock, self._file = sock, sock.makefile("rb")
        return self._sock, self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def request(
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
        return self._send(method, target, data, sent)

    def _send(
        self, method: str, target: str, data: bytes | None, headers: dict[str, str]
    ) -> tuple[int, Any]:
        if self._sock is not None and time.monotonic() - self._used > IDLE_REUSE:
            self.close()
        reused = self._sock is not None
        try:
            status, raw, closing = self._exchange(method, target, data, headers)
        except OSError as e:
            self.close()
            if not (reused and method == "GET"):
                raise self._unreachable(e) from None
            # the server closed the kept-alive connection as the request went out: a GET is
            # asked again on a new one (anything else may have been received: never twice)
            try:
                status, raw, closing = self._exchange(method, target, data, headers)
            except OSError as e2:
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

    def _host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port in (None, default) else f"{host}:{self.port}"

    def _exchange(
        self, method: str, target: str, data: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes, bool]:
        sock, reader = self._connection()
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host_header()}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if data is not None or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(data or b'')}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (data or b""))
        status, version, fields = _read_head(reader)
        while 100 <= status < 200:  # interim replies (100 Continue): the real one follows
            status, version, fields = _read_head(reader)
        connection = fields.get("connection", "").lower()
        closing = version == "HTTP/1.0" or "close" in connection
        if method == "HEAD" or status in (204, 304):
            body = b""
        elif "chunked" in fields.get("transfer-encoding", "").lower():
            body = _read_chunked(reader)
        elif "content-length" in fields:
            try:
                length = int(fields["content-length"])
            except ValueError:
                raise ProtocolError(f"bad Content-Length {fields['content-length']!r}") from None
            if not 0 <= length <= MAX_BODY:
                raise ProtocolError(f"Content-Length {length} out of range")
            body = _read_exactly(reader, length)
        else:  # the body runs to the end of the connection
            body = reader.read(MAX_BODY + 1)
            if len(body) > MAX_BODY:
                raise ProtocolError("reply too long")
            closing = True
        return status, body, closing

    def _unreachable(self, e: BaseException) -> BackupError:
        return BackupError(f"cannot reach the agent at {self.base}: {e or type(e).__name__}")


def _line(reader: BinaryIO) -> bytes:
    line = reader.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise ProtocolError("header line too long")
    if not line.endswith(b"\n"):
        raise ProtocolError("connection closed inside the reply")
    return line.rstrip(b"\r\n")


def _read_head(reader: BinaryIO) -> tuple[int, str, dict[str, str]]:
    """The status, the HTTP version and the header fields (lower-case names) of a reply."""
    first = reader.readline(MAX_LINE + 1)
    if not first:
        raise ProtocolError("connection closed without a reply")
    parts = first.rstrip(b"\r\n").decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP/1.x status line: {first[:80]!r}")
    fields: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = _line(reader)
        if not line:
            return int(parts[1]), parts[0], fields
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise ProtocolError(f"bad header line {line[:80]!r}")
        key = name.strip().lower()
        fields[key] = f"{fields[key]}, {value.strip()}" if key in fields else value.strip()
    raise ProtocolError(f"more than {MAX_HEADERS} header lines")


def _read_exactly(reader: BinaryIO, n: int) -> bytes:
    data = reader.read(n)
    if len(data) != n:
        raise ProtocolError("connection closed inside the reply")
    return data


def _read_chunked(reader: BinaryIO) -> bytes:
    body = bytearray()
    while True:
        size_text = _line(reader).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ProtocolError(f"bad chunk size {size_text[:20]!r}") from None
        if size == 0:
            while _line(reader):  # trailer fields, up to the blank line
                pass
            return bytes(body)
        if len(body) + size > MAX_BODY:
            raise ProtocolError("reply too long")
        body += _read_exactly(reader, size)
        if _line(reader):
            raise ProtocolError("chunk not followed by CRLF")
