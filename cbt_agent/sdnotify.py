"""systemd's notify protocol (sd_notify(3)), spoken directly: one datagram per message to
`$NOTIFY_SOCKET`. `READY=1` once the API listens, `STATUS=` lines saying what the agent does,
`WATCHDOG=1` from the running event loop, `STOPPING=1` on the way out.

The watchdog pings come from a task on the event loop itself, so a loop blocked longer than
`WatchdogSec=` stops them and systemd restarts the service. Outside systemd (no
`$NOTIFY_SOCKET`) every call does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls) -> Notifier:
        """From systemd's variables, which are then removed from the environment so that no
        child process (qemu-img, qemu-nbd) talks to systemd in the agent's name."""
        address = os.environ.pop("NOTIFY_SOCKET", None) or None
        usec_text = os.environ.pop("WATCHDOG_USEC", None)
        pid_text = os.environ.pop("WATCHDOG_PID", None)
        usec: int | None = None
        if usec_text:
            try:
                usec = int(usec_text)
            except ValueError:
                log.warning("WATCHDOG_USEC=%r is not a number: no watchdog pings", usec_text)
            if pid_text and pid_text != str(os.getpid()):
                usec = None  # the watchdog is another process's
            if usec is not None and usec <= 0:
                usec = None
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> None:
        """One datagram of `KEY=value` lines; failures are logged once, never raised."""
        if self.address is None:
            return
        address = self.address
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(fields).encode(), address)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self.address, e)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self, status: str = "stopping: finishing running operations") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    async def run(self, describe: Callable[[], Awaitable[str]], status_every: float = 5.0) -> None:
        """Until cancelled: `WATCHDOG=1` every half of `WATCHDOG_USEC` (when systemd asked for
        it), and `STATUS=` from `describe()` every `status_every` seconds when it changed. The
        two run apart: a slow `describe()` never delays a ping."""
        if self.address is None:
            return
        await asyncio.gather(self._watchdog(), self._statuses(describe, status_every))

    async def _watchdog(self) -> None:
        if self.watchdog_usec is None:
            return
        interval = self.watchdog_usec / 2_000_000
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _statuses(self, describe: Callable[[], Awaitable[str]], every: float) -> None:
        last: str | None = None
        while True:
            try:
                text = await describe()
            except Exception as e:  # the status line is news, never a reason to stop
                log.debug("status for systemd: %s", e)
            else:
                if text != last:
                    last = text
                    self.status(text)
            await asyncio.sleep(every)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
