"""Real-stack test harness: libvirtd + QEMU (TCG) domains laid out the way ZStack does it.

Import it as `import stack` (tests/conftest.py puts tests/ on sys.path). Fixtures that use it
live in tests/conftest.py: `libvirt_stack`, `qmp_socket_dir`, `qmp_socket_template`,
`vm_factory`, `hypervisor`.

Conventions (ZStack's): domain <name> = vmInstanceUuid (32 hex), domain <uuid> = its dashed
form, disk <serial> = volumeUuid (32 hex), virtio targets vda, vdb, ...; the extra QMP socket is
`-qmp unix:<socket_dir>/<vmUuid>.sock,server=on,wait=off` through <qemu:commandline>.

Facts measured here (QEMU 7.2, libvirt 9.0, 2 cores, TCG): define ~25 ms, start ~0.4 s, the
extra socket exists when start returns; libvirt's destroy takes ~1.2-1.8 s (QEMU itself exits
in ~10 ms), QMP `quit` is noticed by libvirt in ~50 ms. A VM without an OS burns ~0.5 s CPU in
SeaBIOS, then idles at ~1 % CPU, ~45 MB RSS. HMP `qemu-io` prints its result on QEMU's stdout,
i.e. the domain log /var/log/libvirt/qemu/<name>.log, not in the HMP reply: `write` checks the
log for failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from testbed.domain import throwaway_domain_xml

LIBVIRT_URI = os.environ.get("CBT_TEST_LIBVIRT_URI", "qemu:///system")
LIBVIRT_SOCK = Path("/run/libvirt/libvirt-sock")
QEMU_RUN_DIR = Path("/run/libvirt/qemu")
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
TEST_VM_MARK = "cbt-agent test VM"  # in <description>, with the creating pid
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the NUL

REQUIRED_BINARIES = ("libvirtd", "virsh", "qemu-system-x86_64", "qemu-img", "nbdinfo")
REQUIRED_MODULES = ("libvirt", "libvirt_qemu", "nbd", "qemu.qmp")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(what: str) -> NoReturn:
    """A component a test needs is missing: the test fails under CI (CI=true), where every
    component must be there; elsewhere it is skipped, saying so. The one place tests skip."""
    import pytest

    if in_ci():
        pytest.fail(f"{what} (unavailable in CI)", pytrace=False)
    pytest.skip(f"{what} (with CI=true this is a failure)")


class StackUnavailable(RuntimeError):
    """libvirtd / QEMU / libnbd are missing or do not work. Fatal in CI (CI=true)."""


# ---- the stack ------------------------------------------------------------------------------


def missing_stack() -> list[str]:
    """What of the real stack is missing on this machine (empty = all there)."""
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    for mod in REQUIRED_MODULES:
        try:
            __import__(mod)
        except ImportError:
            missing.append(f"python module {mod}")
    return missing


def _virsh_version(timeout: float) -> bool:
    try:
        r = subprocess.run(
            ["virsh", "-c", LIBVIRT_URI, "version"],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except (subprocess.TimeoutExpired, OSError):
        return False
    return r.returncode == 0


def _socket_listening(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def ensure_libvirtd(timeout: float = 120.0) -> int | None:
    """Make qemu:///system answer. Returns the pid of a libvirtd started here (the caller stops
    THAT pid with stop_libvirtd), or None when one was already running.

    Raises StackUnavailable when the stack is missing or libvirtd does not come up.
    """
    missing = missing_stack()
    if missing:
        raise StackUnavailable(
            "real stack missing: " + ", ".join(missing) + " (run scripts/setup.sh)"
        )
    if LIBVIRT_URI != "qemu:///system":
        if _virsh_version(timeout):
            return None
        raise StackUnavailable(f"libvirt at {LIBVIRT_URI} does not answer")
    # A daemon may be running but still probing QEMU (the first answer takes ~8 s): never start
    # a second one while something listens on the socket.
    if _socket_listening(LIBVIRT_SOCK):
        if _virsh_version(timeout):
            return None
        raise StackUnavailable(f"a libvirtd listens on {LIBVIRT_SOCK} but does not answer")
    if _virsh_version(10):
        return None
    if not QEMU_CONF.is_file() or not QEMU_CONF.read_text().startswith("# cbt-agent setup"):
        hint = f" ({QEMU_CONF} was not written by scripts/setup.sh: domains may fail to start)"
    else:
        hint = ""
    for d in ("/run/libvirt", "/var/lib/libvirt/qemu", "/var/log/libvirt/qemu"):
        os.makedirs(d, exist_ok=True)
    os.makedirs("/var/cache/libvirt/qemu", exist_ok=True)
    piddir = Path(tempfile.mkdtemp(prefix="cbt-test-libvirtd-"))
    pidfile = piddir / "libvirtd.pid"
    r = subprocess.run(
        ["libvirtd", "-d", "-p", str(pidfile)], capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        raise StackUnavailable(f"libvirtd -d failed ({r.returncode}): {r.stderr.strip()}{hint}")
    deadline = time.monotonic() + timeout
    pid: int | None = None
    while time.monotonic() < deadline:
        if pid is None and pidfile.is_file():
            with contextlib.suppress(ValueError):
                pid = int(pidfile.read_text().strip())
        if pid is not None and not _pid_alive(pid):
            raise StackUnavailable(f"libvirtd (pid {pid}) exited during start{hint}")
        if pid is not None and _virsh_version(timeout):
            return pid
        time.sleep(0.2)
    if pid is not None:
        stop_libvirtd(pid)
    raise StackUnavailable(f"libvirtd did not answer on {LIBVIRT_URI} within {timeout:.0f} s")


def stop_libvirtd(pid: int, timeout: float = 15.0) -> None:
    """Stop the libvirtd with this pid (started by ensure_libvirtd); never by name."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return
    if comm != "libvirtd":  # pid reused by something else
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# libvirtd restarted by restart_libvirtd: old pid -> the pid that replaced it
_successors: dict[int, int] = {}
# where scripts/libvirtd.sh keeps the pid of the libvirtd it starts, and libvirtd's own default
LIBVIRTD_PIDFILES = (
    Path(os.environ.get("CBT_LIBVIRTD_PIDFILE", "/run/cbt-agent-libvirtd.pid")),
    Path("/run/libvirtd.pid"),
)


def successor(pid: int) -> int:
    """The pid of the libvirtd that now stands for `pid` (itself unless restarted here)."""
    while pid in _successors:
        pid = _successors[pid]
    return pid


def _is_libvirtd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "libvirtd" and _pid_alive(pid)
    except OSError:
        return False


def serving_libvirtd(started_pid: int | None) -> int | None:
    """The pid of the libvirtd serving qemu:///system: the one this session started, or the
    one a pidfile names (scripts/libvirtd.sh's, libvirtd's default). None when none is known."""
    if started_pid is not None and _is_libvirtd(successor(started_pid)):
        return successor(started_pid)
    for pidfile in LIBVIRTD_PIDFILES:
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            continue
        if _is_libvirtd(pid):
            return pid
    return None


def libvirtd_command(pid: int) -> list[str]:
    """The command line the libvirtd with this pid was started with."""
    return [a for a in Path(f"/proc/{pid}/cmdline").read_text().split("\0") if a]


def _pidfile_of(argv: list[str]) -> Path:
    for i, arg in enumerate(argv):
        if arg in ("-p", "--pid-file") and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--pid-file="):
            return Path(arg.split("=", 1)[1])
    return Path("/run/libvirtd.pid")


def restart_libvirtd(pid: int, argv: list[str], timeout: float = 120.0) -> int:
    """Stop the libvirtd with this pid (if it still runs) and start `argv` (its command line,
    from libvirtd_command: a daemon, -d), so qemu.conf is read anew; returns the new pid once
    qemu:///system answers. Running domains keep running (libvirtd reconnects to them).
    Raises StackUnavailable when it does not come up (and stops what it started)."""
    if "-d" not in argv and "--daemon" not in argv:
        raise StackUnavailable(f"libvirtd pid {pid} was not started as a daemon (-d): {argv}")
    pidfile = _pidfile_of(argv)
    stop_libvirtd(pid)
    pidfile.unlink(missing_ok=True)
    close_connection()
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise StackUnavailable(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    deadline = time.monotonic() + timeout
    new: int | None = None
    while time.monotonic() < deadline:
        if new is None and pidfile.is_file():
            with contextlib.suppress(ValueError):
                new = int(pidfile.read_text().strip())
        if new is not None and not _pid_alive(new):
            raise StackUnavailable(f"libvirtd (pid {new}) exited during start")
        if new is not None and _virsh_version(timeout):
            _successors[pid] = new
            return new
        time.sleep(0.1)
    if new is not None:
        stop_libvirtd(new)
    raise StackUnavailable(f"libvirtd did not answer on {LIBVIRT_URI} within {timeout:.0f} s")


# ---- libvirt connection ---------------------------------------------------------------------

_conn_lock = threading.Lock()
_conn: Any = None


def connection() -> Any:
    """The harness's own libvirt connection (independent of the agent's Hypervisor)."""
    global _conn
    import libvirt

    with _conn_lock:
        if _conn is not None:
            try:
                if _conn.isAlive():
                    return _conn
            except libvirt.libvirtError:
                pass
            with contextlib.suppress(libvirt.libvirtError):
                _conn.close()
            _conn = None
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _conn = libvirt.open(LIBVIRT_URI)
        return _conn


def close_connection() -> None:
    global _conn
    import libvirt

    with _conn_lock:
        if _conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                _conn.close()
            _conn = None


def _lookup(name: str) -> Any | None:
    import libvirt

    try:
        return connection().lookupByName(name)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


# ---- VMs ------------------------------------------------------------------------------------


class TestVolume(NamedTuple):
    volume_uuid: str
    path: Path
    size: int  # bytes (virtual size)


def _domain_xml(
    vm_uuid: str,
    volumes: list[TestVolume],
    qmp_socket: Path | None,
    memory_mib: int,
) -> str:
    return throwaway_domain_xml(
        vm_uuid,
        [(v.volume_uuid, v.path) for v in volumes],
        qmp_socket,
        memory_mib=memory_mib,
        description=f"{TEST_VM_MARK} pid={os.getpid()}",
    )


@dataclass
class TestVm:
    """A libvirt domain made by make_vm. Methods are synchronous (a few ms each, `shutdown`,
    `kill` and `destroy` up to ~2 s) except `write`, `qmp_async` and `qmp_connection`."""

    __test__ = False  # not a pytest test class

    vm_uuid: str
    volumes: list[TestVolume]
    qmp_socket: Path | None
    workdir: Path
    destroyed: bool = field(default=False, init=False)

    @property
    def domain_uuid(self) -> str:
        return str(uuid.UUID(hex=self.vm_uuid))

    @property
    def log_path(self) -> Path:
        return QEMU_LOG_DIR / f"{self.vm_uuid}.log"

    def volume(self, volume_uuid: str) -> TestVolume:
        for v in self.volumes:
            if v.volume_uuid == volume_uuid:
                return v
        raise KeyError(f"volume {volume_uuid} is not a disk of VM {self.vm_uuid}")

    # -- state --

    def domain(self) -> Any:
        dom = _lookup(self.vm_uuid)
        if dom is None:
            raise RuntimeError(f"domain {self.vm_uuid} is not defined")
        return dom

    def is_running(self) -> bool:
        dom = _lookup(self.vm_uuid)
        return dom is not None and bool(dom.isActive())

    def state(self) -> tuple[int, int]:
        """libvirt (state, reason), e.g. (5, 3) = shut off, crashed."""
        s = self.domain().state()
        return int(s[0]), int(s[1])

    def qemu_pid(self) -> int | None:
        if not self.is_running():
            return None
        try:
            return int((QEMU_RUN_DIR / f"{self.vm_uuid}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def alias(self, volume_uuid: str) -> str:
        """libvirt's device alias of the disk (running domain), e.g. virtio-disk0."""
        self.volume(volume_uuid)
        root = ET.fromstring(self.domain().XMLDesc(0))
        for disk in root.iterfind("devices/disk"):
            if (disk.findtext("serial") or "").strip() == volume_uuid:
                a = disk.find("alias")
                if a is None or not a.get("name"):
                    raise RuntimeError(f"VM {self.vm_uuid} is not running: no alias")
                return str(a.get("name"))
        raise KeyError(volume_uuid)

    def qdev(self, volume_uuid: str) -> str:
        return f"/machine/peripheral/{self.alias(volume_uuid)}/virtio-backend"

    # -- monitor (libvirt passthrough; the extra socket stays free for the agent) --

    def qmp(self, execute: str, arguments: dict[str, Any] | None = None) -> Any:
        """QMP through libvirt; returns "return", raises RuntimeError on an error reply."""
        import libvirt_qemu

        cmd: dict[str, Any] = {"execute": execute}
        if arguments is not None:
            cmd["arguments"] = arguments
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(self.domain(), json.dumps(cmd), 0))
        if "error" in reply:
            raise RuntimeError(f"QMP {execute} failed: {reply['error']}")
        return reply.get("return")

    async def qmp_async(self, execute: str, arguments: dict[str, Any] | None = None) -> Any:
        return await asyncio.to_thread(self.qmp, execute, arguments)

    def hmp(self, command_line: str) -> str:
        import libvirt_qemu

        return str(
            libvirt_qemu.qemuMonitorCommand(
                self.domain(), command_line, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
            )
        )

    def block_entry(self, volume_uuid: str) -> dict[str, Any]:
        """This disk's `query-block` entry (matched on qdev)."""
        qdev = self.qdev(volume_uuid)
        for entry in self.qmp("query-block"):
            if entry.get("qdev") == qdev:
                return dict(entry)
        raise KeyError(f"no query-block entry with qdev {qdev}")

    def node_name(self, volume_uuid: str) -> str:
        """The disk's format node (`inserted.node-name`), e.g. libvirt-2-format. Not valid while
        a fleecing job runs (then the copy-before-write filter is `inserted`)."""
        return str(self.block_entry(volume_uuid)["inserted"]["node-name"])

    def bitmaps(self, volume_uuid: str) -> list[dict[str, Any]]:
        """Named dirty bitmaps of the disk's format node (query-named-block-nodes)."""
        node = self.node_name(volume_uuid)
        for n in self.qmp("query-named-block-nodes", {"flat": True}):
            if n.get("node-name") == node:
                return [b for b in n.get("dirty-bitmaps", []) if b.get("name")]
        return []

    @contextlib.asynccontextmanager
    async def qmp_connection(self) -> AsyncIterator[Any]:
        """A qemu.qmp QMPClient on the extra socket (it takes ONE client at a time)."""
        from qemu.qmp import QMPClient

        if self.qmp_socket is None:
            raise RuntimeError(f"VM {self.vm_uuid} has no extra QMP socket")
        client = QMPClient(f"test-{self.vm_uuid[:8]}")
        await client.connect(str(self.qmp_socket))
        try:
            yield client
        finally:
            await client.disconnect()

    # -- writes --

    def _qemu_io(self, volume_uuid: str, command: str) -> str:
        qdev = self.qdev(volume_uuid)
        try:
            before = self.log_path.stat().st_size
        except OSError:
            before = None
        reply = self.hmp(f'qemu-io -d {qdev} "{command}"')
        if reply.strip():  # HMP-level errors (device not found, ...) come back here
            raise RuntimeError(f"qemu-io {command!r} on {qdev}: {reply.strip()}")
        if before is None:
            return ""
        with self.log_path.open("rb") as f:
            f.seek(before)
            printed = f.read().decode("utf-8", "replace")
        low = printed.lower()
        if "failed" in low or "error" in low or "not found" in low or "wrote" not in low:
            raise RuntimeError(f"qemu-io {command!r} on {qdev}: {printed.strip()!r}")
        return printed

    def _check_range(self, volume_uuid: str, offset: int, length: int) -> None:
        size = self.volume(volume_uuid).size
        if offset < 0 or length <= 0 or offset + length > size:
            raise ValueError(f"write {offset}+{length} outside the {size}-byte disk")

    def write_sync(
        self, volume_uuid: str, offset: int, length: int, pattern_byte: int = 0xAB
    ) -> str:
        """Write `length` bytes of `pattern_byte` at `offset` through the block layer (as a guest
        would: dirty bitmaps and copy-before-write see it). Returns qemu-io's output."""
        self._check_range(volume_uuid, offset, length)
        if not 0 <= pattern_byte <= 0xFF:
            raise ValueError("pattern_byte must be 0..255")
        return self._qemu_io(volume_uuid, f"write -P 0x{pattern_byte:02x} {offset} {length}")

    def write_zeroes_sync(
        self, volume_uuid: str, offset: int, length: int, unmap: bool = False
    ) -> str:
        """`write -z` (write-zeroes request; `-u` lets QEMU unmap)."""
        self._check_range(volume_uuid, offset, length)
        flags = "-z -u" if unmap else "-z"
        return self._qemu_io(volume_uuid, f"write {flags} {offset} {length}")

    async def write(
        self, volume_uuid: str, offset: int, length: int, pattern_byte: int = 0xAB
    ) -> str:
        return await asyncio.to_thread(self.write_sync, volume_uuid, offset, length, pattern_byte)

    async def write_zeroes(
        self, volume_uuid: str, offset: int, length: int, unmap: bool = False
    ) -> str:
        return await asyncio.to_thread(self.write_zeroes_sync, volume_uuid, offset, length, unmap)

    # -- lifecycle --

    def _wait_inactive(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() > deadline:
                raise TimeoutError(f"domain {self.vm_uuid} still running after {timeout} s")
            time.sleep(0.02)

    def start(self, paused: bool = False) -> None:
        import libvirt

        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        try:
            self.domain().createWithFlags(flags)
        except libvirt.libvirtError as e:
            raise RuntimeError(
                f"starting domain {self.vm_uuid} failed: {e}; see {self.log_path} "
                f"(is {QEMU_CONF} set up by scripts/setup.sh?)"
            ) from e
        if self.qmp_socket is not None:
            deadline = time.monotonic() + 10
            while not self.qmp_socket.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"extra QMP socket {self.qmp_socket} did not appear")
                time.sleep(0.01)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Clean QEMU exit, like a guest poweroff (an OS-less guest ignores ACPI): QMP `quit`.
        Persistent bitmaps are written to the qcow2; libvirt reports shut off / shutdown."""
        import libvirt

        if not self.is_running():
            return
        with contextlib.suppress(libvirt.libvirtError):  # "Unable to read from monitor"
            self.qmp("quit")
        self._wait_inactive(timeout)

    def kill(self, timeout: float = 30.0) -> None:
        """SIGKILL the QEMU process (a crash): libvirt reports shut off / crashed; runtime-added
        persistent bitmaps are lost, loaded ones become inconsistent; the socket file stays."""
        pid = self.qemu_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self._wait_inactive(timeout)

    def destroy(self) -> None:
        """Stop (fast, clean QMP quit; libvirt destroy as fallback), undefine, remove disks,
        socket and domain log. Idempotent; never raises for an already gone domain."""
        import libvirt

        if self.destroyed:
            return
        dom = _lookup(self.vm_uuid)
        if dom is not None:
            if dom.isActive():
                with contextlib.suppress(TimeoutError, RuntimeError, libvirt.libvirtError):
                    self.shutdown(timeout=5)
                if dom.isActive():
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.destroy()
            flags = (
                libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            )
            try:
                dom.undefineFlags(flags)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
        for vol in self.volumes:
            vol.path.unlink(missing_ok=True)
        if self.qmp_socket is not None:
            self.qmp_socket.unlink(missing_ok=True)
        self.log_path.unlink(missing_ok=True)
        self.destroyed = True


def make_vm(
    workdir: Path,
    disks_mib: list[int],
    extra_qmp: bool = True,
    start: bool = True,
    *,
    socket_dir: Path | None = None,
    paused: bool = False,
    memory_mib: int = 64,
    cluster_size: int | None = None,
) -> TestVm:
    """Create qcow2 disks in workdir, define (and start) a TCG q35 domain with them.

    The extra QMP socket is `<socket_dir>/<vm_uuid>.sock` (socket_dir defaults to
    workdir/"qmp"; keep it short: a unix socket path is at most 107 bytes).
    On failure everything made so far is removed.
    """
    if not disks_mib or len(disks_mib) > 26:
        raise ValueError("1..26 disks")
    workdir.mkdir(parents=True, exist_ok=True)
    vm_uuid = uuid.uuid4().hex
    qmp_socket: Path | None = None
    if extra_qmp:
        sdir = socket_dir if socket_dir is not None else workdir / "qmp"
        sdir.mkdir(parents=True, exist_ok=True)
        qmp_socket = sdir / f"{vm_uuid}.sock"
        if len(str(qmp_socket)) > UNIX_PATH_MAX:
            raise ValueError(f"socket path too long for AF_UNIX: {qmp_socket}")
    vm = TestVm(vm_uuid=vm_uuid, volumes=[], qmp_socket=qmp_socket, workdir=workdir)
    try:
        for mib in disks_mib:
            vol_uuid = uuid.uuid4().hex
            path = workdir / f"{vol_uuid}.qcow2"
            cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
            if cluster_size is not None:
                cmd += ["-o", f"cluster_size={cluster_size}"]
            subprocess.run([*cmd, str(path), f"{mib}M"], check=True, capture_output=True)
            vm.volumes.append(TestVolume(vol_uuid, path, mib * 1024 * 1024))
        connection().defineXML(_domain_xml(vm_uuid, vm.volumes, qmp_socket, memory_mib))
        if start:
            vm.start(paused=paused)
    except BaseException:
        with contextlib.suppress(Exception):
            vm.destroy()
        raise
    return vm


def destroy_all(vms: list[TestVm]) -> list[BaseException]:
    """Destroy VMs in parallel (libvirt's stop takes ~1.5 s each); returns the errors."""
    errors: list[BaseException] = []

    def one(vm: TestVm) -> None:
        try:
            vm.destroy()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(vm,)) for vm in vms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def reap_orphans() -> list[str]:
    """Destroy test domains (marked in <description>) whose creating process is gone, e.g.
    after a killed pytest run. Domains of live test sessions are left alone."""
    import libvirt

    reaped: list[str] = []
    for dom in connection().listAllDomains(0):
        try:
            xml = dom.XMLDesc(0)
        except libvirt.libvirtError:
            continue
        desc = ET.fromstring(xml).findtext("description") or ""
        if not desc.startswith(TEST_VM_MARK):
            continue
        try:
            pid = int(desc.rsplit("pid=", 1)[1])
        except (IndexError, ValueError):
            continue
        if _pid_alive(pid):
            continue
        root = ET.fromstring(xml)
        paths = [
            Path(s.get("file", "")) for s in root.iterfind("devices/disk/source") if s.get("file")
        ]
        vm = TestVm(
            vm_uuid=dom.name(),
            volumes=[TestVolume("", p, 0) for p in paths],
            qmp_socket=None,
            workdir=Path("/nonexistent"),
        )
        with contextlib.suppress(Exception):
            vm.destroy()
            reaped.append(vm.vm_uuid)
    return reaped
