"""Issue 14.2 on the real stack: the host keeps its confinement. libvirtd runs with a stock-like
DAC qemu.conf (QEMU as the unprivileged `libvirt-qemu`, dynamic ownership), and the agent still
cuts full and incremental checkpoints and exports them: over TCP, over a unix socket with a
pre-shared key (through libvirt's monitor: a VM without ZStack's extra QMP socket), and with
x509 TLS. QEMU opens none of the agent's files itself: the scratch files, the NBD socket and
the state directory stay root's (0600 in 0700 directories) while QEMU holds the descriptors
the agent handed it; only the key QEMU reads by name is given to QEMU's user, privately.

The module's fixture rewrites /etc/libvirt/qemu.conf and restarts libvirtd by its pid, and
restores both at the end, pass or fail. On a shared machine run it under the real-stack lock.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import grp
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import stack
from cbtharness import Agent, by_volume, dirty_runs, expected_runs, read_at, read_export
from test_privilege import make_ca, make_server_cert

from cbt_agent.config import parse_config
from cbt_agent.dirtymap import DirtyExtent, bitmap_from_extents
from cbt_agent.errors import HypervisorError
from cbt_agent.qemu import nbd as nbdio
from cbt_agent.qemu.psk import Psk

pytestmark = pytest.mark.stack

KIB = 1024
MIB = 1 << 20
G = 64 * KIB
PORT_RANGE = "13400:13449"  # NBD ports of this module's agents (other modules use others)
QEMU_USER = "libvirt-qemu"  # Debian's libvirt-daemon-system makes it; setup.sh does too
# what a stock Debian host runs (libvirt's defaults: DAC with dynamic ownership, a mount
# namespace per QEMU), less what needs systemd here: cgroups and virtlogd
CONFINED_CONF = f"""# cbt-agent test (tests/integration/test_confinement.py): QEMU unprivileged
user = "{QEMU_USER}"
group = "{QEMU_USER}"
dynamic_ownership = 1
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
"""
KVM = Path("/dev/kvm")


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@contextlib.contextmanager
def kvm_group(user: str) -> Iterator[None]:
    """/dev/kvm as Debian's udev rule and libvirt package leave it: root:kvm 0660 with QEMU's
    user in group kvm; put back as it was afterwards. (libvirt 9.0 re-probes QEMU several
    times at every domain start while /dev/kvm exists but QEMU's user cannot open it: ~56 s
    a start here, against 0.5 s. The tests still run TCG.)"""
    if not KVM.exists():
        yield
        return
    st = KVM.stat()
    made_group = subprocess.run(["getent", "group", "kvm"], capture_output=True).returncode != 0
    if made_group:
        _run("groupadd", "--system", "kvm")
    joined = user not in grp.getgrnam("kvm").gr_mem
    if joined:
        _run("gpasswd", "-a", user, "kvm")
    try:
        os.chown(KVM, -1, grp.getgrnam("kvm").gr_gid)
        os.chmod(KVM, 0o660)
        yield
    finally:
        os.chown(KVM, st.st_uid, st.st_gid)
        os.chmod(KVM, stat.S_IMODE(st.st_mode))
        if joined:
            _run("gpasswd", "-d", user, "kvm")
        if made_group:
            _run("groupdel", "kvm")


@contextlib.contextmanager
def qemu_account() -> Iterator[pwd.struct_passwd]:
    """The user libvirt runs QEMU as (setup.sh makes it; made here, and removed, if not)."""
    try:
        existing: pwd.struct_passwd | None = pwd.getpwnam(QEMU_USER)
    except KeyError:
        existing = None
    if existing is not None:
        yield existing
        return
    _run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", QEMU_USER)
    try:
        yield pwd.getpwnam(QEMU_USER)
    finally:
        _run("userdel", QEMU_USER)


@contextlib.contextmanager
def file_replaced(path: Path, text: str) -> Iterator[None]:
    """`path` holds `text` meanwhile; its bytes and mode (or its absence) come back after."""
    original = path.read_bytes() if path.exists() else None
    mode = stat.S_IMODE(path.stat().st_mode) if original is not None else 0o644
    try:
        path.write_text(text)
        yield
    finally:
        if original is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(original)
            os.chmod(path, mode)


@pytest.fixture(scope="module")
def qemu_user(libvirt_stack: Any) -> Iterator[pwd.struct_passwd]:
    """libvirtd restarted with QEMU as libvirt-qemu for this module; the original qemu.conf,
    /dev/kvm and daemon are back afterwards, whatever happened."""
    pid = stack.serving_libvirtd(libvirt_stack.started_pid)
    if pid is None:
        stack.unavailable("cannot tell which libvirtd serves qemu:///system, to restart it")
    argv = stack.libvirtd_command(pid)
    try:
        with (
            qemu_account() as user,
            kvm_group(QEMU_USER),
            file_replaced(stack.QEMU_CONF, CONFINED_CONF),
        ):
            pid = stack.restart_libvirtd(pid, argv)
            yield user
    finally:
        stack.restart_libvirtd(pid, argv)


class ConfinedHost:
    """VMs whose images QEMU's user can reach (libvirt gives it the images; the directories
    above must let it through) and whose extra QMP socket QEMU can create (in a directory of
    its own, as ZStack's is)."""

    def __init__(self, user: pwd.struct_passwd) -> None:
        self.user = user
        self.root = Path(tempfile.mkdtemp(prefix="cbt-confine-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        self.sockets = self.root / "qmp"
        self.sockets.mkdir(mode=0o700)
        os.chown(self.sockets, user.pw_uid, user.pw_gid)
        self.vms: list[stack.TestVm] = []

    def vm(self, disks_mib: list[int], extra_qmp: bool = True) -> stack.TestVm:
        vm = stack.make_vm(
            self.root / "vms", disks_mib, extra_qmp=extra_qmp, socket_dir=self.sockets
        )
        self.vms.append(vm)
        pid = vm.qemu_pid()
        assert pid is not None and ps_user(pid) == QEMU_USER  # the configuration took
        return vm

    def close(self) -> None:
        errors = stack.destroy_all(self.vms)
        shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise errors[0]


@pytest.fixture
def host(qemu_user: pwd.struct_passwd) -> Iterator[ConfinedHost]:
    h = ConfinedHost(qemu_user)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
async def make_agent(host: ConfinedHost) -> AsyncIterator[Callable[..., Awaitable[Agent]]]:
    """In-process agents whose state directory is a short, root-only (0700) one."""
    agents: list[Agent] = []
    dirs: list[Path] = []
    sockets = host.sockets

    async def make(**nbd: Any) -> Agent:
        state = Path(tempfile.mkdtemp(prefix="cbt-cst-", dir="/tmp"))  # 0700, root's
        dirs.append(state)
        config = parse_config(
            {
                "api": {"tokens": ["test-token-0123456789abcdef"]},
                "state": {"dir": str(state)},
                "libvirt": {"uri": stack.LIBVIRT_URI},
                "qmp": {"socket_template": f"{sockets}/{{vm_uuid}}.sock"},
                "nbd": {"listen": "127.0.0.1", "port_range": PORT_RANGE, **nbd},
            }
        )
        agent = Agent(config)
        await agent.open()
        agents.append(agent)
        return agent

    try:
        yield make
    finally:
        for agent in agents:
            await agent.close()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


# ---- what the host sees ---------------------------------------------------------------------


def ps_user(pid: int) -> str:
    r = subprocess.run(["ps", "-o", "user=", "-p", str(pid)], capture_output=True, text=True)
    return r.stdout.strip()


def open_files(pid: int) -> set[str]:
    """What QEMU holds open, by path."""
    out: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            out.add(os.readlink(fd))
    return out


def can_open_as(user: pwd.struct_passwd, path: Path) -> bool:
    """Whether `user` can read `path` (what QEMU could open by name)."""
    r = subprocess.run(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
         "test", "-r", str(path)],
        capture_output=True,
    )  # fmt: skip
    return r.returncode == 0


def owner_and_mode(path: Path) -> tuple[int, int]:
    st = path.lstat()
    return st.st_uid, stat.S_IMODE(st.st_mode)


def gone(*paths: Path) -> bool:
    return not any(os.path.lexists(p) for p in paths)


def fdsets(vm: stack.TestVm) -> list[Any]:
    return list(vm.qmp("query-fdsets"))


def check_private_to_agent(path: Path) -> None:
    """A file or directory the agent made: root's, owner-only."""
    want = 0o700 if path.is_dir() else 0o600
    if stat.S_ISSOCK(path.lstat().st_mode):
        want = 0o600
    assert owner_and_mode(path) == (0, want), path


# ---- the tests --------------------------------------------------------------------------------


async def test_full_and_incremental_exports_with_qemu_unprivileged(
    host: ConfinedHost, make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = host.vm([16, 8])
    (v0, _, size0), (v1, _, size1) = vm.volumes
    pid = vm.qemu_pid()
    assert pid is not None
    agent = await make_agent()
    state = agent.config.state_dir
    task = await agent.create(vm)
    assert (await agent.router.channel(vm.vm_uuid)).kind == "socket"  # ZStack's extra socket
    await vm.write(v0, 0, MIB, 0xAA)
    await vm.write(v1, 2 * MIB, 128 * KIB, 0xAB)

    full = by_volume(await agent.enable(task))
    assert {i["mode"] for i in full.values()} == {"full"}
    assert (full[v0]["size"], full[v1]["size"]) == (size0, size1)
    # QEMU holds each scratch file open, though the file is root's (0600) in root's 0700
    # directories, which QEMU's user cannot open by name: the agent handed it the descriptor
    held = open_files(pid)
    for info in full.values():
        scratch = Path(info["target"])
        assert scratch.parent == agent.config.scratch_dir and str(scratch) in held
        check_private_to_agent(scratch)
        assert not can_open_as(host.user, scratch)
    for d in (state, agent.config.scratch_dir):
        check_private_to_agent(d)
    assert len(fdsets(vm)) == 2
    # the export is the disks as of Enable
    await vm.write(v0, 0, 64 * KIB, 0xBB)
    assert await asyncio.to_thread(read_export, full[v0], 0, 128 * KIB) == b"\xaa" * (128 * KIB)
    assert await asyncio.to_thread(read_export, full[v1], 2 * MIB, 128 * KIB) == b"\xab" * (
        128 * KIB
    )
    await agent.disable(task)
    assert os.listdir(agent.config.scratch_dir) == []
    assert fdsets(vm) == [] and not any(p.startswith(str(state)) for p in open_files(pid))

    writes0 = [(5 * MIB + 100, 1000), (15 * MIB, MIB)]
    writes1 = [(7 * MIB, 512), (7 * MIB + 65535, 2)]
    for off, n in writes0:
        await vm.write(v0, off, n, 0xC0)
    for off, n in writes1:
        await vm.write(v1, off, n, 0xC1)
    inc = by_volume(await agent.enable(task))
    assert {i["mode"] for i in inc.values()} == {"incremental"}
    want0 = expected_runs([(0, 64 * KIB), *writes0], size0)  # with the write during the export
    want1 = expected_runs(writes1, size1)
    assert await asyncio.to_thread(dirty_runs, inc[v0]) == want0
    assert await asyncio.to_thread(dirty_runs, inc[v1]) == want1 == [(7 * MIB, 2 * G)]
    for vol, want in ((v0, want0), (v1, want1)):
        extents = [DirtyExtent(s, n, True) for s, n in want]
        size = inc[vol]["size"]
        assert base64.b64decode(inc[vol]["bitmapBase64"]) == bitmap_from_extents(extents, size, G)
        assert inc[vol]["changedBytes"] == sum(n for _, n in want)
        assert await agent.areas(task, vol) == want
    assert await asyncio.to_thread(read_export, inc[v0], 0, 64 * KIB) == b"\xbb" * (64 * KIB)
    assert await asyncio.to_thread(read_export, inc[v0], 5 * MIB + 100, 1000) == b"\xc0" * 1000
    assert await asyncio.to_thread(read_export, inc[v1], 7 * MIB, 512) == b"\xc1" * 512
    await agent.disable(task)
    assert fdsets(vm) == [] and os.listdir(agent.config.scratch_dir) == []
    assert [s for _, s in await agent.history(task)][-3:] == ["Starting", "Running", "Stopped"]


def psk_address(info: dict[str, Any], key: Psk | None) -> nbdio.NbdAddress:
    return nbdio.NbdAddress(None, None, info["nbdSocket"], info["exportName"], psk=key)


async def test_a_key_over_a_unix_socket_through_libvirts_monitor(
    host: ConfinedHost, make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = host.vm([16], extra_qmp=False)  # descriptors go through libvirt's monitor
    vol = vm.volumes[0].volume_uuid
    agent = await make_agent(transport="unix", tls="psk")
    task = await agent.create(vm)
    assert (await agent.router.channel(vm.vm_uuid)).kind == "libvirt"
    await vm.write(vol, MIB, 64 * KIB, 0xD1)

    info = by_volume(await agent.enable(task))[vol]
    key = Psk(info["nbdTlsPskIdentity"], info["nbdTlsPsk"])
    sock = Path(info["nbdSocket"])
    # the socket is the agent's (QEMU listens on the descriptor), in the agent's directory
    check_private_to_agent(sock)
    check_private_to_agent(sock.parent)
    # QEMU's copy of the key is its user's alone (QEMU reads it by name at each handshake),
    # inside the agent's 0700 directories: QEMU reaches it through a descriptor of its own
    # directory only; the agent's copy (what it reads back) stays root's
    keys = agent.config.psk_dir / task
    qemu_keys = keys / "qemu"
    uid, gid = host.user.pw_uid, host.user.pw_gid
    for path, mode in (
        (qemu_keys, 0o700),
        (qemu_keys / "keys.psk", 0o600),
        (qemu_keys / "dh-params.pem", 0o600),
    ):
        st = path.lstat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, mode), path
    for path in (agent.config.psk_dir, keys, keys / "keys.psk"):
        check_private_to_agent(path)
    assert (qemu_keys / "keys.psk").read_text() == key.line()
    assert not can_open_as(host.user, qemu_keys / "keys.psk")  # not by name: the path is closed

    with pytest.raises(HypervisorError, match="requires TLS"):
        await asyncio.to_thread(read_at, psk_address(info, None), 0, 512)
    with pytest.raises(HypervisorError, match="NBD connect"):
        await asyncio.to_thread(
            read_at, psk_address(info, Psk(key.identity, Psk.new().key)), 0, 512
        )
    await vm.write(vol, MIB, 4 * KIB, 0xEE)  # after the checkpoint: not in this export
    got = await asyncio.to_thread(read_at, psk_address(info, key), MIB, 64 * KIB)
    assert got == b"\xd1" * (64 * KIB)
    await agent.disable(task)
    assert gone(keys, sock) and fdsets(vm) == []

    await vm.write(vol, 3 * MIB, 100, 0xD2)
    info = by_volume(await agent.enable(task))[vol]
    key = Psk(info["nbdTlsPskIdentity"], info["nbdTlsPsk"])
    assert info["mode"] == "incremental" and info["changedBytes"] == 2 * G
    runs = await asyncio.to_thread(
        nbdio.dirty_extents, psk_address(info, key), info["dirtyBitmapContext"]
    )
    assert [(e.start, e.length) for e in runs if e.dirty] == [(MIB, G), (3 * MIB, G)]
    assert await asyncio.to_thread(read_at, psk_address(info, key), 3 * MIB, 100) == b"\xd2" * 100
    await agent.disable(task)
    assert gone(keys, sock) and fdsets(vm) == []


async def test_x509_certificates_are_handed_to_qemu_as_a_private_copy(
    host: ConfinedHost, make_agent: Callable[..., Awaitable[Agent]], tmp_path: Path
) -> None:
    ca, nbd_dir = tmp_path / "ca", tmp_path / "nbd-tls"
    make_ca(ca)
    make_server_cert(ca, nbd_dir)
    shutil.copy(ca / "ca-cert.pem", nbd_dir / "ca-cert.pem")
    vm = host.vm([16])
    vol = vm.volumes[0].volume_uuid
    agent = await make_agent(tls_cert_dir=str(nbd_dir))
    task = await agent.create(vm)
    await vm.write(vol, 2 * MIB, 4 * KIB, 0xE1)
    info = by_volume(await agent.enable(task))[vol]
    assert info["nbdTls"] is True
    # QEMU read its copy when the TLS object was made: the copy and its descriptor are gone
    # (the one fd set left is the scratch file's), and the object serves on
    assert os.listdir(agent.config.tls_copy_dir) == []
    assert [":scratch:" in d["opaque"] for s in fdsets(vm) for d in s["fds"]] == [True]
    addr = nbdio.NbdAddress("127.0.0.1", int(info["nbdPort"]), None, vol, str(nbd_dir))
    assert await asyncio.to_thread(read_at, addr, 2 * MIB, 4 * KIB) == b"\xe1" * (4 * KIB)
    with pytest.raises(HypervisorError, match="requires TLS"):
        plain = nbdio.NbdAddress("127.0.0.1", int(info["nbdPort"]), None, vol)
        await asyncio.to_thread(read_at, plain, 0, 512)
    await agent.disable(task)
    assert fdsets(vm) == []
