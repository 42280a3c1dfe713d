"""libvirt access: find a VM (domain name = vmInstanceUuid) and its disks (serial = volumeUuid).

All blocking libvirt-python calls go through asyncio.to_thread, never on the event loop.

Facts this module relies on (verified on libvirt 9.0 / QEMU 7.2):
- `qemuMonitorCommand(dom, json, 0)` returns the raw reply text; a QMP error comes back as
  `{"error": {"class", "desc"}}` in that text, not as a libvirtError.
- `<source index='N'>` in the live XML is the index in libvirt's node names
  `libvirt-N-format` / `libvirt-N-storage`.
- `qemuMonitorCommandWithFiles(dom, json, [fd], 0)` sends the descriptor along with the command
  (for `getfd`/`add-fd`; libvirt passes at most one), whatever user QEMU runs as.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import libvirt
import libvirt_qemu

from cbt_agent.contract.constants import UUID_PATTERN
from cbt_agent.errors import (
    HypervisorError,
    NotFound,
    OperationError,
    QmpCommandError,
    QmpInterrupted,
)

T = TypeVar("T")

DEFAULT_QEMU_RUN_DIR = "/run/libvirt/qemu"
DEFAULT_QEMU_LOG_DIR = "/var/log/libvirt/qemu"
LOG_TAIL = 16384  # bytes of a domain log read to find why its last start failed


@dataclass(frozen=True)
class DiskInfo:
    volume_uuid: str  # <serial>
    alias: str  # libvirt device alias, e.g. "virtio-disk0"; QOM path /machine/peripheral/<alias>
    target: str  # "vda"
    device_id: int  # position among the VM's serial-carrying disks, in domain XML order (0 = root)
    install_path: str  # <source file=...> (or dev/name for block/network disks)
    format: str  # <driver type=...>: "qcow2", "raw"
    bus: str  # "virtio", "scsi", ...
    # <source index='N'> of a running domain: libvirt's node names are libvirt-N-format and
    # libvirt-N-storage. None when the domain is not running (or libvirt gave no index).
    source_index: int | None = None

    @property
    def qdev(self) -> str:
        """The `qdev` that `query-block` reports for this disk ("" when not running)."""
        if not self.alias:
            return ""
        if self.bus == "virtio":
            return f"/machine/peripheral/{self.alias}/virtio-backend"
        return f"/machine/peripheral/{self.alias}"


@dataclass(frozen=True)
class VmInfo:
    vm_uuid: str  # domain name
    running: bool
    disks: tuple[DiskInfo, ...]
    domain_uuid: str = ""  # libvirt <uuid> (dashed form of vm_uuid under ZStack)
    refused: tuple[str, ...] = ()  # disks left out: why (a <serial> that is no volume uuid)

    def require_volume_serials(self) -> None:
        """OperationError naming each disk whose serial is no volume uuid: no task may track
        (Create), cut (Enable) or export (Export) such a VM's disks."""
        if self.refused:
            raise OperationError("; ".join(self.refused))

    def disk(self, volume_uuid: str) -> DiskInfo | None:
        for d in self.disks:
            if d.volume_uuid == volume_uuid:
                return d
        return None


_VOLUME_UUID = re.compile(UUID_PATTERN)


def parse_domain_xml(xml: str) -> VmInfo:
    """VmInfo from a domain XML (live XML when running). Pure: used by find_vm and unit tests.

    A disk whose <serial> is not a volume uuid (32 hex digits) is left out and named in
    `refused`: the serial becomes the volume uuid of every reply and part of file names (scratch
    files here, backup files at the client), so anything else is never used. Create, Enable
    and Export refuse such a VM (`VmInfo.require_volume_serials`); Disable and Delete do not
    need its disks and go on."""
    root = ET.fromstring(xml)
    name = (root.findtext("name") or "").strip()
    domain_uuid = (root.findtext("uuid") or "").strip()
    running = root.get("id") not in (None, "-1")
    disks: list[DiskInfo] = []
    refused: list[str] = []
    devices = root.find("devices")
    if devices is not None:
        for disk in devices.findall("disk"):
            if disk.get("device", "disk") != "disk":
                continue
            serial = (disk.findtext("serial") or "").strip()
            if not serial:
                continue
            target = disk.find("target")
            alias = disk.find("alias")
            driver = disk.find("driver")
            source = disk.find("source")
            path = ""
            index: int | None = None
            if source is not None:
                path = source.get("file") or source.get("dev") or source.get("name") or ""
                idx = source.get("index")
                if idx is not None and idx.isdigit():
                    index = int(idx)
            if _VOLUME_UUID.fullmatch(serial) is None:
                dev = target.get("dev", "?") if target is not None else "?"
                refused.append(
                    f"VM [uuid: {name}]: disk {dev} ({path or 'no source'}) has <serial> "
                    f"{serial[:80]!r}, which is not a volume uuid (32 hex digits): the agent "
                    "names volumes by their serial; set the disk's serial to its volume uuid "
                    "or detach it"
                )
                continue
            disks.append(
                DiskInfo(
                    volume_uuid=serial,
                    alias=(alias.get("name", "") if alias is not None else ""),
                    target=(target.get("dev", "") if target is not None else ""),
                    device_id=len(disks),
                    install_path=path,
                    format=(driver.get("type", "") if driver is not None else ""),
                    bus=(target.get("bus", "") if target is not None else ""),
                    source_index=index,
                )
            )
    return VmInfo(
        vm_uuid=name,
        running=running,
        disks=tuple(disks),
        domain_uuid=domain_uuid,
        refused=tuple(refused),
    )


def start_error(log_text: str) -> str | None:
    """QEMU's last error in a domain log (`<time> qemu-system-x86_64: <where>: <error>`, maybe
    followed by a hint line), without the time and the command-line option it came from."""
    lines = log_text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i]
        if "qemu-system" not in line or ": " not in line:
            continue
        error = line.rsplit(": ", 1)[1].strip()
        hint = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if hint and not hint[:4].isdigit() and "qemu-system" not in hint:
            error = f"{error} ({hint})"
        return error
    return None


def _silence_libvirt_errors() -> None:
    # libvirt's default handler prints every error on stderr ("libvirt: QEMU Driver error : ...");
    # errors reach us as exceptions anyway.
    def _ignore(_ctx: object, _err: object) -> None:
        return None

    libvirt.registerErrorHandler(_ignore, None)


log = logging.getLogger(__name__)


class VmEventKind(enum.StrEnum):
    STARTED = "started"
    STOPPED = "stopped"  # a clean stop: shutdown, destroy (SIGTERM first), saved
    CRASHED = "crashed"  # QEMU died: persistent bitmaps were not saved
    MIGRATED_AWAY = "migrated-away"
    UNDEFINED = "undefined"


@dataclass(frozen=True)
class VmEvent:
    vm_uuid: str
    kind: VmEventKind
    detail: str  # libvirt's event and detail, for the log and the task's history


def lifecycle_event(vm_uuid: str, event: int, detail: int) -> VmEvent | None:
    """Map a libvirt lifecycle event to what the agent acts on (None: nothing to do)."""
    text = f"libvirt event {event}/{detail}"
    if event == libvirt.VIR_DOMAIN_EVENT_STARTED:
        return VmEvent(vm_uuid, VmEventKind.STARTED, text)
    if event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED:
        return VmEvent(vm_uuid, VmEventKind.UNDEFINED, text)
    if event != libvirt.VIR_DOMAIN_EVENT_STOPPED:
        return None
    if detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED:
        return VmEvent(vm_uuid, VmEventKind.MIGRATED_AWAY, text)
    if detail in (
        libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED,
        libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED,
    ):
        return VmEvent(vm_uuid, VmEventKind.CRASHED, text)
    return VmEvent(vm_uuid, VmEventKind.STOPPED, text)


# libvirt's answers when a guest has no agent to talk to: not configured (no channel), not
# connected, not answering, out of sync
_NO_AGENT = frozenset(
    {
        libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
        libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
        libvirt.VIR_ERR_AGENT_UNSYNCED,
    }
)


class GuestAgentUnavailable(HypervisorError):
    """The VM has no connected qemu-guest-agent (not configured, not running, not answering)."""


_events_lock = threading.Lock()
_events_running = False


def _ensure_event_loop() -> None:
    """libvirt's default event loop in one daemon thread, for the whole process.

    Not libvirtaio: it binds libvirt's (process-wide, register-once) event implementation to one
    asyncio loop and touches that loop from whatever thread libvirt calls it in, while the agent
    makes libvirt calls from worker threads. libvirt's own loop is thread-safe; events are
    handed to the agent's loop with call_soon_threadsafe. It must run before a connection is
    opened for that connection to deliver events.
    """
    global _events_running
    with _events_lock:
        if _events_running:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _events_running = True


class Hypervisor:
    """One libvirt connection; every call runs in a worker thread."""

    def __init__(
        self,
        uri: str,
        *,
        qemu_run_dir: str = DEFAULT_QEMU_RUN_DIR,
        qemu_log_dir: str = DEFAULT_QEMU_LOG_DIR,
    ) -> None:
        self.uri = uri
        self.qemu_run_dir = Path(qemu_run_dir)
        self.qemu_log_dir = Path(qemu_log_dir)
        self._conn: Any = None
        self._reopen_lock = asyncio.Lock()
        self._watch: Callable[[VmEvent], Awaitable[None]] | None = None
        self._watch_id: int | None = None
        self._event_tasks: set[asyncio.Task[None]] = set()

    # ---- connection -------------------------------------------------------------------------

    async def open(self) -> None:
        if self._conn is not None:
            return
        _silence_libvirt_errors()
        _ensure_event_loop()
        self._conn = await self._call(libvirt.open, self.uri)

    async def watch(self, handler: Callable[[VmEvent], Awaitable[None]]) -> None:
        """Call `handler` on this loop for every VM lifecycle event (one at a time, in order)."""
        self._watch = handler
        await self._subscribe(self._conn)

    async def _subscribe(self, conn: Any) -> None:
        if self._watch is None or conn is None:
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[VmEvent] = asyncio.Queue()

        def callback(_conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
            # runs in the libvirt-events thread
            ev = lifecycle_event(dom.name(), event, detail)
            if ev is not None:
                loop.call_soon_threadsafe(queue.put_nowait, ev)

        async def deliver() -> None:
            while True:
                ev = await queue.get()
                if self._watch is None:
                    return
                try:
                    await self._watch(ev)
                except Exception:
                    log.exception("handling %s of VM %s failed", ev.kind, ev.vm_uuid)

        self._watch_id = await self._call(
            conn.domainEventRegisterAny, None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, callback, None
        )
        task = asyncio.create_task(deliver(), name="libvirt-lifecycle")
        self._event_tasks.add(task)
        task.add_done_callback(self._event_tasks.discard)

    async def close(self) -> None:
        self._watch = None
        for task in list(self._event_tasks):
            task.cancel()
        conn, self._conn = self._conn, None
        if conn is not None and self._watch_id is not None:
            with contextlib.suppress(libvirt.libvirtError):
                await asyncio.to_thread(conn.domainEventDeregisterAny, self._watch_id)
            self._watch_id = None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                await asyncio.to_thread(conn.close)

    async def __aenter__(self) -> Hypervisor:
        await self.open()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def connection(self) -> Any:
        """The open connection; reopened once if libvirtd went away (e.g. was restarted)."""
        if self._conn is None:
            raise HypervisorError(f"libvirt connection to {self.uri} is not open")
        if await asyncio.to_thread(self._alive, self._conn):
            return self._conn
        async with self._reopen_lock:
            if not await asyncio.to_thread(self._alive, self._conn):
                old, self._conn = self._conn, None
                with contextlib.suppress(libvirt.libvirtError):
                    await asyncio.to_thread(old.close)
                self._conn = await self._call(libvirt.open, self.uri)
                for task in list(self._event_tasks):
                    task.cancel()
                await self._subscribe(self._conn)
        return self._conn

    @staticmethod
    def _alive(conn: Any) -> bool:
        try:
            return bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    @staticmethod
    async def _call(fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except libvirt.libvirtError as e:
            raise HypervisorError(str(e)) from e

    async def _lookup(self, vm_uuid: str) -> Any | None:
        conn = await self.connection()

        def lookup() -> Any | None:
            try:
                return conn.lookupByName(vm_uuid)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise

        return await self._call(lookup)

    async def _domain(self, vm_uuid: str) -> Any:
        dom = await self._lookup(vm_uuid)
        if dom is None:
            raise NotFound(f"VM {vm_uuid} not found on this host", field="vmInstanceUuid")
        return dom

    # ---- queries ----------------------------------------------------------------------------

    async def find_vm(self, vm_uuid: str) -> VmInfo | None:
        """The domain named vm_uuid with its serial-carrying disks, or None if there is none."""
        dom = await self._lookup(vm_uuid)
        if dom is None:
            return None

        def xml() -> str | None:
            try:
                return cast(str, dom.XMLDesc(0))
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:  # undefined meanwhile
                    return None
                raise

        text = await self._call(xml)
        return None if text is None else parse_domain_xml(text)

    async def list_vms(self) -> list[VmInfo]:
        """Every domain defined on this host, running or not, with its disks."""
        conn = await self.connection()

        def xmls() -> list[str]:
            out: list[str] = []
            for dom in conn.listAllDomains(0):
                try:
                    out.append(cast(str, dom.XMLDesc(0)))
                except libvirt.libvirtError as e:
                    if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:  # undefined meanwhile
                        raise
            return out

        return [parse_domain_xml(text) for text in await self._call(xmls)]

    async def is_running(self, vm_uuid: str) -> bool:
        dom = await self._lookup(vm_uuid)
        if dom is None:
            return False
        return bool(await self._call(dom.isActive))

    async def qemu_pid(self, vm_uuid: str) -> int | None:
        """The QEMU process id of a running domain (libvirt's pidfile), None when not running."""
        if not await self.is_running(vm_uuid):
            return None
        pidfile = self.qemu_run_dir / f"{vm_uuid}.pid"
        try:
            text = await asyncio.to_thread(pidfile.read_text)
        except OSError:
            return None
        try:
            pid = int(text.strip())
        except ValueError:
            return None
        return pid if pid > 0 else None

    async def start_failure(self, vm_uuid: str) -> str | None:
        """Why the VM's last start failed, when it is shut off for that reason (libvirt's
        `shut off (failed)`; a failed start sends no lifecycle event): QEMU's own words from the
        end of the domain log, e.g. `Failed to get "write" lock (Is another process using the
        image [...]?)`. None when the VM runs, or stopped for another reason."""
        dom = await self._lookup(vm_uuid)
        if dom is None:
            return None
        state, reason = await self._call(dom.state)
        if state != libvirt.VIR_DOMAIN_SHUTOFF or reason != libvirt.VIR_DOMAIN_SHUTOFF_FAILED:
            return None
        path = self.qemu_log_dir / f"{vm_uuid}.log"

        def tail() -> str:
            try:
                with path.open("rb") as f:
                    f.seek(max(0, f.seek(0, 2) - LOG_TAIL))
                    return f.read().decode(errors="replace")
            except OSError:
                return ""

        return start_error(await asyncio.to_thread(tail)) or "the last start of the VM failed"

    # ---- guest agent ------------------------------------------------------------------------

    async def fs_freeze(self, vm_uuid: str) -> int:
        """Freeze the guest's filesystems through its qemu-guest-agent; how many it froze.
        Raises GuestAgentUnavailable when the VM has no connected, answering agent."""
        dom = await self._domain(vm_uuid)
        return int(await self._agent_call(dom, dom.fsFreeze))

    async def fs_thaw(self, vm_uuid: str) -> int:
        """Thaw the guest's filesystems; how many it thawed (0: none was frozen)."""
        dom = await self._domain(vm_uuid)
        return int(await self._agent_call(dom, dom.fsThaw))

    @staticmethod
    async def _agent_call(dom: Any, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(fn)
        except libvirt.libvirtError as e:
            if e.get_error_code() in _NO_AGENT:
                raise GuestAgentUnavailable(str(e)) from e
            # a paused VM's agent is not asked ("domain is not running"): its guest runs no
            # code, so it writes nothing and has nothing to freeze
            if e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                with contextlib.suppress(libvirt.libvirtError):
                    state, _reason = await asyncio.to_thread(dom.state)
                    if state == libvirt.VIR_DOMAIN_PAUSED:
                        raise GuestAgentUnavailable(f"the VM is paused: {e}") from e
            raise HypervisorError(str(e)) from e

    # ---- monitor ----------------------------------------------------------------------------

    async def qmp_passthrough(
        self, vm_uuid: str, command: dict[str, Any], fd: int | None = None
    ) -> Any:
        """Run one QMP command through libvirt, with a copy of file descriptor `fd` passed
        along when given (for `getfd`/`add-fd`); returns the "return" value."""
        name = str(command.get("execute", ""))
        arguments = command.get("arguments", {})
        dom = await self._domain(vm_uuid)
        text_cmd = json.dumps(command)

        def run() -> str:
            if fd is None:
                return cast(str, libvirt_qemu.qemuMonitorCommand(dom, text_cmd, 0))
            text, _files = libvirt_qemu.qemuMonitorCommandWithFiles(dom, text_cmd, [fd], 0)
            return str(text)

        try:
            text = await asyncio.to_thread(run)
        except libvirt.libvirtError as e:
            # the monitor went away or timed out: whether QEMU ran the command is unknown
            raise QmpInterrupted(f"QMP {name} through libvirt was interrupted: {e}") from e
        try:
            reply = json.loads(text)
        except ValueError as e:
            raise HypervisorError(f"QMP {name}: unparsable reply from libvirt: {text!r}") from e
        if not isinstance(reply, dict):
            raise HypervisorError(f"QMP {name}: unexpected reply from libvirt: {text!r}")
        if "error" in reply:
            err = reply["error"]
            desc = err.get("desc", str(err)) if isinstance(err, dict) else str(err)
            cls = err.get("class", "GenericError") if isinstance(err, dict) else "GenericError"
            raise QmpCommandError(name, arguments, str(desc), str(cls))
        return reply.get("return")


__all__ = [
    "DiskInfo",
    "GuestAgentUnavailable",
    "Hypervisor",
    "VmInfo",
    "parse_domain_xml",
]
