"""A fake QMP endpoint: a real unix-socket server speaking QMP's wire protocol (greeting,
`qmp_capabilities`, `execute` -> `return` or `error` with the request's id), so the agent's own
`SocketQmp` (qemu.qmp underneath) is what talks to it. In the spirit of qemu.qmp's own test
doubles: no QEMU, no sleeps; replies are scripted per command, and the connection can be dropped
right after a command arrives (a lost reply), with or without the command having run.

    fake = FakeQmp(tmp_path / "qmp.sock")
    fake.on("query-jobs", [])                       # a fixed reply
    fake.on("transaction", handler)                 # handler(arguments) -> reply, or raise QmpError
    fake.lose_reply("transaction", ran=True)        # run it, then hang up without answering
    await fake.start(); ...; await fake.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GREETING = {
    "QMP": {
        "version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "fake"},
        "capabilities": [],
    }
}

Handler = Callable[[dict[str, Any]], Any]


class QmpError(Exception):
    """Raised by a handler: answered as QMP's {"error": {"class", "desc"}}."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@dataclass
class _Loss:
    command: str
    ran: bool
    times: int


class FakeQmp:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.handlers: dict[str, Handler] = {}
        self.received: list[tuple[str, dict[str, Any]]] = []  # every execute, in order
        self.connections = 0
        self._losses: list[_Loss] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # -- scripting ---------------------------------------------------------------------------

    def on(self, command: str, reply: Any) -> None:
        """Answer `command` with `reply`: a callable(arguments) is called (and may raise
        QmpError), any other value is returned as it is."""
        self.handlers[command] = reply if callable(reply) else (lambda _args, r=reply: r)

    def fail(self, command: str, desc: str, error_class: str = "GenericError") -> None:
        def refuse(_args: dict[str, Any]) -> Any:
            raise QmpError(desc, error_class)

        self.handlers[command] = refuse

    def lose_reply(self, command: str, *, ran: bool = True, times: int = 1) -> None:
        """The next `times` times `command` arrives, close the connection without a reply;
        with `ran` the command takes effect first (QEMU ran it; only its reply was lost)."""
        self._losses.append(_Loss(command, ran, times))

    def commands(self) -> list[str]:
        return [c for c, _ in self.received]

    # -- serving -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            await self._send(writer, GREETING)
            async for msg in _messages(reader):
                reply = self._answer(msg)
                if reply is None:  # a lost reply: hang up
                    break
                await self._send(writer, reply)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _answer(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        command = str(msg.get("execute", ""))
        args = dict(msg.get("arguments") or {})
        ident = {"id": msg["id"]} if "id" in msg else {}
        if command == "qmp_capabilities":
            return {"return": {}, **ident}
        self.received.append((command, args))
        loss = next((x for x in self._losses if x.command == command and x.times > 0), None)
        if loss is not None:
            loss.times -= 1
            if loss.ran:
                with contextlib.suppress(QmpError):
                    self._run(command, args)
            return None
        try:
            return {"return": self._run(command, args), **ident}
        except QmpError as e:
            return {"error": {"class": e.error_class, "desc": e.desc}, **ident}

    def _run(self, command: str, args: dict[str, Any]) -> Any:
        handler = self.handlers.get(command)
        if handler is None:
            raise QmpError(f"The command {command} has not been found", "CommandNotFound")
        return handler(args)

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write(json.dumps(obj).encode() + b"\n")
        await writer.drain()


async def _messages(reader: asyncio.StreamReader) -> Any:
    """JSON objects as they arrive (qemu.qmp sends them back to back, without newlines)."""
    decoder = json.JSONDecoder()
    buf = ""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            return
        buf += chunk.decode()
        while True:
            buf = buf.lstrip()
            if not buf:
                break
            try:
                obj, end = decoder.raw_decode(buf)
            except json.JSONDecodeError:
                break  # incomplete: wait for more
            buf = buf[end:]
            yield obj
