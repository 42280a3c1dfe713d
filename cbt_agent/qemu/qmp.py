"""QMP to a VM: ZStack's extra QMP socket through qemu.qmp, or libvirt's passthrough.

The extra socket takes one client at a time (a second one hangs rather than being refused), so
the agent holds one connection per VM and serialises commands on it.

Both routes can hand QEMU a file descriptor with a command (SCM_RIGHTS on the unix socket; one
file through `virDomainQemuMonitorCommandWithFiles` on libvirt's): `getfd` and `add-fd` take it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, StateError

from cbt_agent.errors import HypervisorError, QmpCommandError, QmpInterrupted

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
WATCHED_EVENTS = ("STOP", "RESUME")  # execute_many notes when QEMU paused and resumed the VM
COMMAND_TIMEOUT = 60.0


class PassthroughTarget(Protocol):
    async def qmp_passthrough(
        self, vm_uuid: str, command: dict[str, Any], fd: int | None = None
    ) -> Any: ...


class QmpChannel(Protocol):
    """Something that runs a QMP command and returns its `return` value."""

    kind: str

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any: ...

    async def execute_with_fd(
        self, command: str, arguments: Mapping[str, object] | None, fd: int
    ) -> Any:
        """Run `command` with a copy of file descriptor `fd` passed along (for `getfd` and
        `add-fd`); the caller keeps and closes its own `fd`."""
        ...

    async def close(self) -> None: ...


class _Counted:
    """A channel that reports each failed command's QMP error class ("Interrupted" when no
    reply came) to `on_error`, for metrics."""

    on_error: Callable[[str], None] | None = None

    def _failed(self, error_class: str) -> None:
        if self.on_error is not None:
            self.on_error(error_class)


class SocketQmp(_Counted):
    """A held qemu.qmp connection to a VM's extra QMP socket."""

    kind = "socket"

    def __init__(self, vm_uuid: str, path: str) -> None:
        self.vm_uuid = vm_uuid
        self.path = path
        self._client = QMPClient(f"cbt-{vm_uuid[:8]}")
        self._lock = asyncio.Lock()
        # the run-state events the last execute_many saw, with QEMU's timestamps (seconds)
        self.last_events: list[tuple[str, float]] = []

    async def connect(self) -> None:
        try:
            await asyncio.wait_for(self._client.connect(self.path), CONNECT_TIMEOUT)
        except (TimeoutError, ConnectError, OSError) as e:
            await self._safe_disconnect()
            raise HypervisorError(f"cannot connect to QMP socket {self.path}: {e}") from None

    @property
    def connected(self) -> bool:
        return self._client.runstate.name == "RUNNING"

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        return await self._run(command, arguments, None)

    async def execute_with_fd(
        self, command: str, arguments: Mapping[str, object] | None, fd: int
    ) -> Any:
        return await self._run(command, arguments, fd)

    async def _run(
        self, command: str, arguments: Mapping[str, object] | None, fd: int | None
    ) -> Any:
        async with self._lock:
            try:
                if fd is not None:
                    if not self.connected:
                        raise ConnectionError("not connected")
                    # QEMU keeps the descriptor for the monitor's next command (this one); the
                    # lock keeps any other command from coming between
                    self._client.send_fd_scm(fd)
                return await asyncio.wait_for(
                    self._client.execute(command, arguments), COMMAND_TIMEOUT
                )
            except ExecuteError as e:
                self._failed(e.error_class)
                raise QmpCommandError(
                    command, dict(arguments or {}), str(e), e.error_class
                ) from None
            except (
                ExecInterruptedError,
                StateError,
                ConnectionError,
                TimeoutError,
                OSError,  # send_fd_scm on a socket that went away
            ) as e:
                self._failed("Interrupted")
                raise QmpInterrupted(
                    f"QMP {command} on {self.path} was interrupted: {e or type(e).__name__}"
                ) from None

    async def execute_many(
        self, commands: Sequence[tuple[str, Mapping[str, object] | None]]
    ) -> list[Any]:
        """Send `commands` back to back without waiting for each reply (QEMU runs them in
        order, one after the other) and collect the replies: each command's return value, or
        the QmpCommandError it failed with. Raises QmpInterrupted when a reply is lost."""
        async with self._lock:
            self.last_events = []
            with self._client.listener(WATCHED_EVENTS) as listener:
                sent = [self._client.execute(c, a) for c, a in commands]
                try:
                    replies = await asyncio.wait_for(
                        asyncio.gather(*sent, return_exceptions=True), COMMAND_TIMEOUT
                    )
                except TimeoutError as e:
                    self._failed("Interrupted")
                    raise QmpInterrupted(f"QMP commands on {self.path} timed out: {e}") from None
                # QEMU sends an event before the reply of the command that caused it
                for event in listener.clear():
                    stamp = cast(dict[str, Any], event.get("timestamp") or {})
                    seconds = float(stamp.get("seconds", 0)) + stamp.get("microseconds", 0) / 1e6
                    self.last_events.append((str(event.get("event")), seconds))
        out: list[Any] = []
        for (command, arguments), reply in zip(commands, replies, strict=True):
            if isinstance(reply, ExecuteError):
                self._failed(reply.error_class)
                out.append(
                    QmpCommandError(command, dict(arguments or {}), str(reply), reply.error_class)
                )
            elif isinstance(reply, BaseException):
                self._failed("Interrupted")
                raise QmpInterrupted(
                    f"QMP {command} on {self.path} was interrupted: {reply or type(reply).__name__}"
                ) from None
            else:
                out.append(reply)
        return out

    async def _safe_disconnect(self) -> None:
        try:
            await self._client.disconnect()
        except Exception as e:  # the peer may be gone already: nothing left to close
            log.debug("QMP disconnect from %s: %s", self.path, e)

    async def close(self) -> None:
        await self._safe_disconnect()


class PassthroughQmp(_Counted):
    """QMP through libvirt's monitor (`qemuMonitorCommand`), when there is no extra socket."""

    kind = "libvirt"

    def __init__(self, vm_uuid: str, target: PassthroughTarget) -> None:
        self.vm_uuid = vm_uuid
        self._target = target

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        return await self._run(command, arguments, None)

    async def execute_with_fd(
        self, command: str, arguments: Mapping[str, object] | None, fd: int
    ) -> Any:
        return await self._run(command, arguments, fd)

    async def _run(
        self, command: str, arguments: Mapping[str, object] | None, fd: int | None
    ) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = dict(arguments)
        try:
            return await self._target.qmp_passthrough(self.vm_uuid, message, fd)
        except QmpCommandError as e:
            self._failed(e.error_class)
            raise
        except QmpInterrupted:
            self._failed("Interrupted")
            raise

    async def close(self) -> None:
        return None


def paused_seconds(qmp: QmpChannel) -> float | None:
    """How long the VM stood still in the last execute_many, by QEMU's own STOP and RESUME
    event timestamps (None: the channel delivers no events, or there was no pause)."""
    events: dict[str, float] = dict(getattr(qmp, "last_events", []))
    if "STOP" in events and "RESUME" in events:
        return max(events["RESUME"] - events["STOP"], 0.0)
    return None


async def execute_many(
    qmp: QmpChannel, commands: Sequence[tuple[str, Mapping[str, object] | None]]
) -> list[Any]:
    """`commands` in order, sent back to back where the channel can (a socket), else one by
    one; each command's return value or the QmpCommandError it failed with (the ones after a
    failed command still run). Raises QmpInterrupted when a reply is lost."""
    many = getattr(qmp, "execute_many", None)
    if many is not None:
        return list(await many(commands))
    out: list[Any] = []
    for command, arguments in commands:
        try:
            out.append(await qmp.execute(command, arguments))
        except QmpCommandError as e:
            out.append(e)
    return out


async def execute_all(
    qmp: QmpChannel, commands: Sequence[tuple[str, Mapping[str, object] | None]]
) -> list[Any]:
    """`commands` in one round trip where the channel can (see `execute_many`); their return
    values. Raises the first command's QmpCommandError (the commands after it ran too: each
    must be harmless after a failed one, as a rollback removes what exists), or QmpInterrupted
    when a reply is lost."""
    replies = await execute_many(qmp, commands)
    for reply in replies:
        if isinstance(reply, QmpCommandError):
            raise reply
    return replies


class QmpRouter:
    """Gives each VM its QMP channel: the held socket connection when the socket exists,
    otherwise libvirt's passthrough. A broken connection is dropped and made anew."""

    def __init__(
        self,
        socket_template: str,
        passthrough: PassthroughTarget,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.socket_template = socket_template
        self._passthrough = passthrough
        self._channels: dict[str, QmpChannel] = {}
        self.on_error = on_error  # each failed command's QMP error class (for metrics)

    def socket_path(self, vm_uuid: str) -> str:
        return self.socket_template.format(vm_uuid=vm_uuid)

    async def channel(self, vm_uuid: str) -> QmpChannel:
        """The VM's channel. The caller holds the VM's operation lock."""
        current = self._channels.get(vm_uuid)
        if isinstance(current, SocketQmp) and current.connected:
            return current
        if current is not None:
            await current.close()
            del self._channels[vm_uuid]
        path = self.socket_path(vm_uuid)
        chan: QmpChannel
        if await asyncio.to_thread(os.path.exists, path):
            sock = SocketQmp(vm_uuid, path)
            sock.on_error = self.on_error
            try:
                await sock.connect()
                chan = sock
            except HypervisorError as e:
                log.warning("VM %s: %s; using libvirt's QMP passthrough", vm_uuid, e)
                chan = PassthroughQmp(vm_uuid, self._passthrough)
        else:
            chan = PassthroughQmp(vm_uuid, self._passthrough)
        if isinstance(chan, PassthroughQmp):
            chan.on_error = self.on_error
        self._channels[vm_uuid] = chan
        return chan

    async def forget(self, vm_uuid: str) -> None:
        """Drop a VM's channel (VM stopped or gone); the next call reconnects."""
        chan = self._channels.pop(vm_uuid, None)
        if chan is not None:
            await chan.close()

    async def close(self) -> None:
        for vm_uuid in list(self._channels):
            await self.forget(vm_uuid)
