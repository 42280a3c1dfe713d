"""What the agent hands a QEMU that may run as another user (issue 14.2), without QEMU: the
descriptors (a scratch file, the NBD socket, a credential's directory) really travel with the
command over the QMP socket, fd sets are found again by their task, the NBD socket is the
agent's (0600) and a stale server is stopped before it is bound, QEMU's user is read from
/proc, and the files QEMU reads by name are given to that user alone. The real-stack proof
under an unprivileged QEMU is tests/integration/test_confinement.py."""

from __future__ import annotations

import array
import asyncio
import json
import os
import socket
import stat
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fakeblock import FakeBlockLayer
from fakeqmp import FakeQmp

from cbt_agent.config import parse_config
from cbt_agent.engine import exports
from cbt_agent.errors import HypervisorError, QmpCommandError
from cbt_agent.qemu import fds, nbd_server, process, psk
from cbt_agent.qemu.process import QemuUser
from cbt_agent.qemu.qmp import SocketQmp
from cbt_agent.store import Store, SyncStore

TASK, OTHER, VM = "ab" * 16, "cd" * 16, "0f" * 16
# an owner other than the agent when the tests run as root (they do on the test machines)
STRANGER = QemuUser(65534, 65534) if os.geteuid() == 0 else QemuUser.agent()


# ---- pure rules ----------------------------------------------------------------------------


STATUS = """Name:\tqemu-system-x86
Umask:\t0022
State:\tS (sleeping)
Tgid:\t4242
Pid:\t4243
Uid:\t999\t999\t999\t998
Gid:\t995\t995\t995\t994
Groups:\t995
"""


def test_the_user_is_the_filesystem_uid_and_gid_of_the_status() -> None:
    assert process.parse_status(STATUS) == QemuUser(998, 994)
    own = process.parse_status(Path("/proc/self/status").read_text())
    assert own == QemuUser(os.geteuid(), os.getegid()) == QemuUser.agent()


@pytest.mark.parametrize(
    "text",
    ["Name:\tx\n", "Uid:\t1\t1\t1\t1\n", "Uid:\t1\t1\nGid:\t1\t1\t1\t1\n", "Uid:\ta\tb\tc\td\n"],
)
def test_a_status_without_both_ids_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        process.parse_status(text)


def test_thread_ids_of_query_cpus_fast() -> None:
    cpus = [{"cpu-index": 0, "thread-id": 11}, {"cpu-index": 1, "thread-id": 12}, {"x": 1}]
    assert process.thread_ids(cpus) == [11, 12]
    assert process.thread_ids({}) == [] and process.thread_ids([]) == []


def test_fdsets_are_found_by_their_task() -> None:
    sets = [
        {"fdset-id": 0, "fds": [{"fd": 30, "opaque": fds.opaque(TASK, "scratch:cbtsc-1")}]},
        {"fdset-id": 1, "fds": [{"fd": 31, "opaque": fds.opaque(OTHER, "psk")}]},
        {"fdset-id": 2, "fds": [{"fd": 32}]},  # not the agent's (libvirt's have no opaque)
        {"fdset-id": 3, "fds": [{"fd": 33, "opaque": fds.opaque(TASK, "psk")}]},
        {"fdset-id": 4, "fds": []},
    ]
    assert fds.fdsets_with_prefix(sets, fds.task_prefix(TASK)) == [0, 3]
    assert fds.fdsets_with_prefix(sets, fds.task_prefix(OTHER)) == [1]
    assert fds.fdsets_with_prefix(sets, fds.OPAQUE_PREFIX) == [0, 1, 3]
    passed = fds.PassedFd(7, 41)
    assert (passed.fdset_path, passed.proc_path) == ("/dev/fdset/7", "/proc/self/fd/41")


# ---- descriptors really travel with the command ---------------------------------------------


class FdReceivingQmp:
    """A one-connection QMP server that reads with recvmsg, so it sees the descriptors sent
    along (SCM_RIGHTS), as QEMU's monitor does: each command is answered with the inode of
    the descriptor that came with it (None without one)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.seen: list[tuple[str, int | None]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:

            def send(obj: object) -> None:
                conn.sendall(json.dumps(obj).encode() + b"\n")

            send({"QMP": {"version": {"qemu": {"major": 7, "minor": 2}}, "capabilities": []}})
            decoder = json.JSONDecoder()
            buf, pending = "", None
            while True:
                fdbuf = array.array("i")
                data, anc, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
                if not data:
                    return
                for level, kind, raw in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fdbuf.frombytes(raw[: len(raw) - len(raw) % 4])
                for fd in fdbuf:
                    pending = os.fstat(fd).st_ino
                    os.close(fd)
                buf += data.decode()
                while (buf := buf.lstrip()) != "":
                    try:
                        msg, end = decoder.raw_decode(buf)
                    except json.JSONDecodeError:
                        break
                    buf = buf[end:]
                    ident = {"id": msg["id"]} if "id" in msg else {}
                    if msg["execute"] != "qmp_capabilities":
                        self.seen.append((msg["execute"], pending))
                    send({"return": {"fdset-id": 5, "fd": 77, "ino": pending}, **ident})
                    pending = None

    def close(self) -> None:
        self.listener.close()


async def test_the_descriptor_goes_with_its_command_and_only_with_it(tmp_path: Path) -> None:
    server = FdReceivingQmp(tmp_path / "qmp.sock")
    chan = SocketQmp(VM, str(server.path))
    await chan.connect()
    scratch = tmp_path / "scratch.qcow2"
    scratch.write_bytes(b"")
    try:
        fd = fds.open_file(str(scratch))
        try:
            passed = await fds.add_fd(chan, fd, fds.opaque(TASK, "scratch:x"))
        finally:
            os.close(fd)
        assert passed == fds.PassedFd(5, 77)
        await chan.execute("query-fdsets")
    finally:
        await chan.close()
        server.close()
    assert server.seen == [("add-fd", scratch.stat().st_ino), ("query-fdsets", None)]


async def test_a_descriptor_to_a_closed_channel_is_an_interruption(tmp_path: Path) -> None:
    from cbt_agent.errors import QmpInterrupted

    chan = SocketQmp(VM, str(tmp_path / "none.sock"))  # never connected
    with pytest.raises(QmpInterrupted):
        await chan.execute_with_fd("getfd", {"fdname": "x"}, 0)


# ---- against the fake QEMU ------------------------------------------------------------------


@pytest.fixture
async def qemu(tmp_path: Path) -> AsyncIterator[tuple[FakeQmp, FakeBlockLayer, SocketQmp]]:
    fake = FakeQmp(tmp_path / "qmp.sock")
    layer = FakeBlockLayer()
    layer.install(fake)
    # the fake QEMU "runs" in this process: its vCPU thread is this thread
    fake.on("query-cpus-fast", [{"cpu-index": 0, "thread-id": threading.get_native_id()}])
    fake.on("object-add", lambda a: {})
    await fake.start()
    chan = SocketQmp(VM, str(fake.path))
    await chan.connect()
    yield fake, layer, chan
    await chan.close()
    await fake.close()


def short_socket_dir() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="cbt-fd-", dir="/tmp"))


async def test_the_nbd_socket_is_the_agents_and_a_stale_server_stops_before_it_is_bound(
    qemu: tuple[FakeQmp, FakeBlockLayer, SocketQmp],
) -> None:
    fake, layer, chan = qemu
    d = short_socket_dir()
    path = d / "vm.sock"
    try:
        layer.state.nbd = {"type": "unix", "data": {"path": str(path)}}  # left by a dead Enable
        path.write_bytes(b"")  # and a stale file where the socket goes
        fake.received.clear()
        await nbd_server.start_unix_fd(chan, str(path), "creds")
        assert fake.commands() == [
            "getfd",
            "nbd-server-start",  # "already running"
            "closefd",
            "nbd-server-stop",  # before the new socket is bound (QEMU unlinks the old path)
            "getfd",
            "nbd-server-start",
        ]
        start = fake.received[-1][1]
        assert start == {
            "addr": {"type": "fd", "data": {"str": nbd_server.SOCKET_FD_NAME}},
            "tls-creds": "creds",
        }
        assert layer.state.named_fds == set()  # the server took the descriptor
        st = path.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()  # the agent's, whatever user QEMU runs as
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


async def test_a_refused_start_leaves_no_named_descriptor_and_no_socket(
    qemu: tuple[FakeQmp, FakeBlockLayer, SocketQmp],
) -> None:
    fake, layer, chan = qemu
    fake.fail("nbd-server-start", "Failed to set up listener")
    d = short_socket_dir()
    path = d / "vm.sock"
    try:
        with pytest.raises(QmpCommandError):
            await nbd_server.start_unix_fd(chan, str(path))
        assert layer.state.named_fds == set() and not path.exists()
    finally:
        d.rmdir()


async def test_the_key_goes_to_qemus_user_by_descriptor_and_teardown_takes_it_back(
    qemu: tuple[FakeQmp, FakeBlockLayer, SocketQmp], tmp_path: Path
) -> None:
    fake, layer, chan = qemu
    d = short_socket_dir()
    config = parse_config(
        {
            "api": {"tokens": ["test-token-0123456789abcdef"]},
            "state": {"dir": str(tmp_path / "state")},
            "nbd": {"transport": "unix", "socket_dir": str(d), "tls": "psk"},
        }
    )
    store = Store(config.db_path)
    await store.open()
    try:
        await store.run(SyncStore.create_task, TASK, "t", None, VM, [])
        fake.received.clear()
        server = await exports.start_nbd_server(config, store, chan, TASK, VM, by_fd=True)
        assert server.psk and server.socket == str(config.nbd.socket_path(VM))
        assert fake.commands() == [
            "query-cpus-fast",  # which user QEMU runs as
            "add-fd",  # the key's directory
            "object-del",
            "object-add",
            "getfd",  # the socket
            "nbd-server-start",
        ]
        args = dict(fake.received)
        ((set_id, opaque),) = layer.state.fdsets.items()
        assert opaque == fds.opaque(TASK, "psk")
        assert args["object-add"]["dir"] == f"/proc/self/fd/{100 + set_id}"
        key_dir = exports.psk_dir(config, TASK)
        qemu_dir = key_dir / psk.QEMU_SUBDIR  # QEMU's copy: what the passed descriptor opens
        assert sorted(p.name for p in qemu_dir.iterdir()) == [psk.DH_PARAMS_FILE, psk.KEYS_FILE]
        for p in (qemu_dir, qemu_dir / psk.KEYS_FILE, qemu_dir / psk.DH_PARAMS_FILE):
            st = p.stat()
            assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())  # QEMU's user here
            assert stat.S_IMODE(st.st_mode) == (0o700 if p == qemu_dir else 0o600)
        key = await exports.export_psk(config, server, TASK)  # the agent's own copy
        assert key is not None and (qemu_dir / psk.KEYS_FILE).read_text() == key.line()

        await exports.teardown_exports(config, store, chan, TASK, force=True)
        assert layer.state.fdsets == {} and not key_dir.exists()
        assert not await asyncio.to_thread(os.path.exists, str(server.socket))
    finally:
        await store.close()
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


async def test_qemus_user_comes_from_its_vcpu_thread(
    qemu: tuple[FakeQmp, FakeBlockLayer, SocketQmp],
) -> None:
    fake, _, chan = qemu
    assert await process.user_of(chan) == QemuUser.agent()
    fake.on("query-cpus-fast", [])
    with pytest.raises(HypervisorError, match="which user QEMU runs as"):
        await process.user_of(chan)


# ---- files QEMU reads by name ----------------------------------------------------------------


def test_a_key_directory_given_to_qemus_user_stays_private_to_it(tmp_path: Path) -> None:
    d = tmp_path / "nbd-psk" / TASK
    key = psk.Psk.new()
    qemu_dir = psk.write_server_dir(d, key, STRANGER)
    assert qemu_dir == d / psk.QEMU_SUBDIR
    # QEMU's copy is its user's alone; the one the agent reads back stays the agent's (a
    # secret the agent reads must be its own: secretfiles refuses a stranger's)
    for p in (qemu_dir, qemu_dir / psk.KEYS_FILE, qemu_dir / psk.DH_PARAMS_FILE):
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (STRANGER.uid, STRANGER.gid)
        assert stat.S_IMODE(st.st_mode) == (0o700 if p == qemu_dir else 0o600)
    for p in (d, d / psk.KEYS_FILE):
        st = p.stat()
        assert st.st_uid == os.geteuid()
        assert stat.S_IMODE(st.st_mode) == (0o700 if p == d else 0o600)
    assert psk.read_server_dir(d) == key
    # the next Enable's key replaces both, QEMU's still its user's alone
    second = psk.Psk.new()
    psk.write_server_dir(d, second, STRANGER)
    assert psk.read_server_dir(d) == second
    assert (qemu_dir / psk.KEYS_FILE).read_text() == second.line()
    assert (qemu_dir / psk.KEYS_FILE).stat().st_uid == STRANGER.uid
    assert sorted(p.name for p in qemu_dir.iterdir()) == [psk.DH_PARAMS_FILE, psk.KEYS_FILE]
    assert psk.remove_server_dir(d) and not d.exists()
    # without an owner (the agent's own storage daemon reads it): one directory, as before
    assert psk.write_server_dir(d, key) == d and not qemu_dir.exists()


def test_a_certificate_copy_holds_what_qemu_reads_private_to_its_user(tmp_path: Path) -> None:
    source = tmp_path / "tls"
    source.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem", "dh-params.pem", "x.txt"):
        (source / name).write_text(name)
    os.chmod(source / "server-key.pem", 0o600)
    copy = tmp_path / "nbd-tls" / TASK
    copy.parent.mkdir(mode=0o700)
    exports._copy_tls_dir(source, copy, STRANGER)
    names = ["ca-cert.pem", "dh-params.pem", "server-cert.pem", "server-key.pem"]
    assert sorted(p.name for p in copy.iterdir()) == names  # no CRL there: none copied
    for p in (copy, *copy.iterdir()):
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (STRANGER.uid, STRANGER.gid)
        assert stat.S_IMODE(st.st_mode) == (0o700 if p == copy else 0o600)
    assert (copy / "server-key.pem").read_text() == "server-key.pem"
    exports._copy_tls_dir(source, copy, STRANGER)  # again: a fresh copy, no error
    exports.remove_tls_copy(copy)
    assert not copy.exists()


def test_giving_follows_no_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("x")
    link = tmp_path / "link"
    link.symlink_to(target)
    process.give(link, STRANGER)
    assert target.stat().st_uid == os.geteuid()
    assert link.lstat().st_uid == STRANGER.uid


class PortsOfTheHost:
    """QEMUs binding NBD ports on one host: a port bound by one is refused to the others."""

    def __init__(self) -> None:
        self.bound: set[int] = set()
        self.tries = 0

    def channel(self) -> PortChannel:
        return PortChannel(self)


class PortChannel:
    kind = "fake"

    def __init__(self, host: PortsOfTheHost) -> None:
        self.host = host

    async def execute(self, command: str, arguments: dict[str, object] | None = None) -> object:
        assert command == "nbd-server-start" and arguments is not None
        self.host.tries += 1
        await asyncio.sleep(0.001)  # a round trip: the other starts go on meanwhile
        port = int(arguments["addr"]["data"]["port"])  # type: ignore[index]
        if port in self.host.bound:
            raise QmpCommandError(command, arguments, "Failed to bind socket: Address in use")
        self.host.bound.add(port)
        return {}


async def test_concurrent_starts_each_try_a_port_no_other_start_is_trying() -> None:
    host = PortsOfTheHost()
    host.bound.add(11001)  # taken by someone else
    claimed: set[int] = set()
    ports = list(range(11000, 11100))

    started = await asyncio.gather(
        *(
            nbd_server.start_inet(host.channel(), "127.0.0.1", ports, None, claimed)  # type: ignore[arg-type]
            for _ in range(50)
        )
    )

    assert len(set(started)) == 50 and 11001 not in started
    assert host.tries == 51  # one refusal (the foreign port), not one per start before
    assert claimed == set(started)  # the caller releases each once it is recorded
