"""Least privilege on the real stack: NBD exports on owner-only unix sockets instead of a TCP
port, NBD with TLS (QEMU tls-creds-x509, libnbd verifying against the CA), the HTTP API over
HTTPS, and the config refusing a bad TLS or socket setup by key.

Certificates are made for each test with `openssl` (a throwaway CA and a server certificate for
localhost / 127.0.0.1). Agents run in-process (CbtService, as in test_cbt) or as a process
(`cbt-agent serve`, stopped by pid); VMs come from vm_factory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import stack
from agentproc import TOKEN, AgentProcess, free_port
from cbtharness import Agent, by_volume
from openapi_schema_validator import OAS31Validator

from cbt_agent.api.openapi import openapi_document
from cbt_agent.config import parse_config
from cbt_agent.errors import HypervisorError
from cbt_agent.qemu import nbd as nbdio
from cbt_agent.store import NbdServer, SyncStore

pytestmark = pytest.mark.stack

KIB = 1024
MIB = 1 << 20
G = 64 * KIB
PORT_RANGE = "13100:13199"  # NBD ports of this module's agents (other modules use others)
TLS_ID = "cbt-nbd-tls"
NBD_TLS_DIR = "<the test PKI's NBD directory>"


# ---- certificates -----------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"openssl {args[0]}: {r.stderr}"


def make_ca(d: Path, name: str = "cbt-agent test CA") -> None:
    """ca-cert.pem + ca-key.pem in `d`."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def make_server_cert(ca: Path, out: Path, prefix: str = "server") -> None:
    """<prefix>-cert.pem + <prefix>-key.pem (0600) in `out`, signed by the CA in `ca`, for
    localhost and 127.0.0.1."""
    out.mkdir(parents=True, exist_ok=True)
    ext = out / f"{prefix}.ext"
    ext.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{prefix}-key.pem",
        "-out", f"{prefix}.csr", "-subj", "/CN=localhost",
        cwd=out,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{prefix}.csr", "-CA", str(ca / "ca-cert.pem"),
        "-CAkey", str(ca / "ca-key.pem"), "-CAcreateserial", "-days", "2",
        "-out", f"{prefix}-cert.pem", "-extfile", str(ext),
        cwd=out,
    )  # fmt: skip
    os.chmod(out / f"{prefix}-key.pem", 0o600)
    (out / f"{prefix}.csr").unlink()
    ext.unlink()


class Pki:
    """A throwaway CA; `nbd_dir` is what [nbd] tls_cert_dir wants (ca-cert.pem,
    server-cert.pem, server-key.pem), `client_dir` holds only ca-cert.pem (what a backup client
    needs), `other_ca_dir` a CA that signed nothing here."""

    def __init__(self, root: Path) -> None:
        self.ca = root / "ca"
        make_ca(self.ca)
        self.nbd_dir = root / "nbd-tls"
        make_server_cert(self.ca, self.nbd_dir)
        shutil.copy(self.ca / "ca-cert.pem", self.nbd_dir / "ca-cert.pem")
        self.client_dir = root / "client"
        self.client_dir.mkdir()
        shutil.copy(self.ca / "ca-cert.pem", self.client_dir / "ca-cert.pem")
        self.other_ca_dir = root / "other-ca"
        make_ca(self.other_ca_dir, "some other CA")
        (self.other_ca_dir / "ca-key.pem").unlink()
        self.api_dir = root / "api"
        make_server_cert(self.ca, self.api_dir, "api")
        self.api_cert = self.api_dir / "api-cert.pem"
        self.api_key = self.api_dir / "api-key.pem"
        self.ca_cert = self.ca / "ca-cert.pem"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory (unix socket paths must fit in 107 bytes; tmp_path may not)."""
    d = Path(tempfile.mkdtemp(prefix="cbt-priv-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- the agent in-process ---------------------------------------------------------------------


@pytest.fixture
async def make_agent(
    short_dir: Path, qmp_socket_template: str
) -> AsyncIterator[Callable[..., Awaitable[Agent]]]:
    agents: list[Agent] = []

    async def make(**nbd: Any) -> Agent:
        config = parse_config(
            {
                "api": {"tokens": ["test-token-0123456789abcdef"]},
                "state": {"dir": str(short_dir / "state")},
                "libvirt": {"uri": stack.LIBVIRT_URI},
                "qmp": {"socket_template": qmp_socket_template},
                "nbd": {"listen": "127.0.0.1", "port_range": PORT_RANGE, **nbd},
            }
        )
        agent = Agent(config)
        await agent.open()
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        await agent.close()


# ---- helpers ----------------------------------------------------------------------------------


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def tcp_listeners(pid: int) -> list[str]:
    """host:port (hex, as /proc/net shows them) of the TCP sockets `pid` listens on."""
    mine = socket_inodes(pid)
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and int(f[9]) in mine:  # 0A = LISTEN
                found.append(f[1])
    return found


def unix_listeners(pid: int) -> list[str]:
    """Paths of the unix sockets `pid` listens on."""
    mine = socket_inodes(pid)
    found = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        # Flags 00010000 = __SO_ACCEPTCON (listening)
        if len(f) >= 8 and int(f[6]) in mine and int(f[3], 16) & 0x10000:
            found.append(f[7])
    return found


def exists(path: str | Path) -> bool:
    return os.path.lexists(path)


def read(address: nbdio.NbdAddress, offset: int, length: int) -> bytes:
    h = nbdio.connect(address)
    try:
        return bytes(h.pread(length, offset))
    finally:
        nbdio.close(h)


def dirty(address: nbdio.NbdAddress, context: str) -> list[tuple[int, int]]:
    return [(e.start, e.length) for e in nbdio.dirty_extents(address, context)]


def conforms(info: dict[str, Any]) -> None:
    """The reply matches the OpenAPI document's VolumeCbtBackupInfo."""
    doc = openapi_document()
    schema = {
        "$ref": "#/components/schemas/VolumeCbtBackupInfo",
        "components": doc["components"],
    }
    errors = [e.message for e in OAS31Validator(schema).iter_errors(info)]
    assert errors == []


def tls_objects(vm: stack.TestVm) -> list[str]:
    return [o["name"] for o in vm.qmp("qom-list", {"path": "/objects"}) if o["name"] == TLS_ID]


# ---- (a) unix sockets -------------------------------------------------------------------------


async def test_unix_transport_private_socket_no_tcp_port_removed_at_disable(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[32, 16])
    (v0, _, size0), (v1, _, _) = vm.volumes
    agent = await make_agent(transport="unix")
    sock_dir = agent.config.state_dir / "nbd"
    path = sock_dir / f"{vm.vm_uuid}.sock"
    pid = vm.qemu_pid()
    assert pid is not None
    tcp_before, unix_before = tcp_listeners(pid), set(unix_listeners(pid))
    task = await agent.create(vm)
    await vm.write(v0, 0, MIB, 0xA1)
    await vm.write(v1, 2 * MIB, 64 * KIB, 0xA2)
    # a stale file where the socket goes (a QEMU killed with its server up leaves one)
    sock_dir.mkdir(mode=0o700)
    path.write_text("stale")

    full = by_volume(await agent.enable(task))
    for info in full.values():
        assert info["nbdSocket"] == str(path)
        assert (info.get("nbdServer"), info.get("nbdPort")) == (None, None)  # absent on the wire
        assert "nbdTls" not in info
        assert json.loads(info["metadata"])["nbdSocket"] == str(path)
        conforms(info)
    st = path.lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(sock_dir.stat().st_mode) == 0o700
    assert await agent.server(task) == NbdServer(None, None, str(path), False)
    # QEMU listens on the socket and on no TCP port at all
    assert set(unix_listeners(pid)) - unix_before == {str(path)}
    assert tcp_listeners(pid) == tcp_before == []

    # a client reads the point-in-time data through the socket
    a0 = nbdio.NbdAddress(None, None, str(path), v0)
    await vm.write(v0, 0, 64 * KIB, 0xB1)  # after the checkpoint: not in the export
    assert await asyncio.to_thread(read, a0, 0, 128 * KIB) == b"\xa1" * (128 * KIB)
    a1 = nbdio.NbdAddress(None, None, str(path), v1)
    assert await asyncio.to_thread(read, a1, 2 * MIB, 64 * KIB) == b"\xa2" * (64 * KIB)
    assert await agent.areas(task, v0) == [(0, MIB)]  # full: the allocated data
    await agent.disable(task)
    assert not exists(path)
    assert set(unix_listeners(pid)) == unix_before
    assert await agent.server(task) == NbdServer()

    # incremental: the agent's own dirty-map read and changed-areas go through the socket too
    await vm.write(v0, 5 * MIB, 4 * KIB, 0xC1)
    inc = by_volume(await agent.enable(task))
    assert inc[v0]["mode"] == "incremental" and inc[v0]["nbdSocket"] == str(path)
    want = [(0, G), (5 * MIB, G)]
    assert inc[v0]["changedBytes"] == 2 * G
    assert await asyncio.to_thread(dirty, a0, inc[v0]["dirtyBitmapContext"]) == want
    assert await agent.areas(task, v0) == want
    assert await asyncio.to_thread(read, a0, 5 * MIB, 4 * KIB) == b"\xc1" * (4 * KIB)
    assert inc[v0]["size"] == size0
    assert tcp_listeners(pid) == []
    await agent.disable(task)
    assert not exists(path) and os.listdir(sock_dir) == []
    assert vm.qmp("query-block-exports") == []


async def test_socket_of_a_vm_that_died_is_removed_at_disable(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[16])
    agent = await make_agent(transport="unix")
    task = await agent.create(vm)
    info = next(iter((by_volume(await agent.enable(task))).values()))
    path = info["nbdSocket"]
    assert exists(path)
    pid = vm.qemu_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # QEMU dies with its server up: the socket file stays
    for _ in range(200):
        if not vm.is_running():
            break
        await asyncio.sleep(0.05)
    assert exists(path)
    await agent.disable(task)
    assert not exists(path)


# ---- (b) NBD with TLS -------------------------------------------------------------------------


async def test_nbd_tls_refuses_plain_clients_and_serves_verified_ones(
    vm_factory: Callable[..., stack.TestVm],
    make_agent: Callable[..., Awaitable[Agent]],
    pki: Pki,
) -> None:
    vm = vm_factory(disks_mib=[16])
    vol = vm.volumes[0].volume_uuid
    agent = await make_agent(tls_cert_dir=str(pki.nbd_dir))
    task = await agent.create(vm)
    await vm.write(vol, MIB, 64 * KIB, 0xD1)

    info = (by_volume(await agent.enable(task)))[vol]
    assert info["nbdTls"] is True and json.loads(info["metadata"])["nbdTls"] is True
    assert info["nbdServer"] == "127.0.0.1" and "nbdSocket" not in info
    conforms(info)
    port = int(info["nbdPort"])
    assert 13100 <= port <= 13199
    assert tls_objects(vm) == [TLS_ID]
    plain = nbdio.NbdAddress("127.0.0.1", port, None, vol)
    with pytest.raises(HypervisorError, match="requires TLS"):
        await asyncio.to_thread(read, plain, 0, 512)
    wrong_ca = nbdio.NbdAddress("127.0.0.1", port, None, vol, str(pki.other_ca_dir))
    with pytest.raises(HypervisorError, match="certificate"):
        await asyncio.to_thread(read, wrong_ca, 0, 512)
    good = nbdio.NbdAddress("127.0.0.1", port, None, vol, str(pki.client_dir))
    assert await asyncio.to_thread(read, good, MIB, 64 * KIB) == b"\xd1" * (64 * KIB)
    assert await agent.areas(task, vol) == [(MIB, G)]
    await agent.disable(task)
    assert tls_objects(vm) == []

    # incremental: the agent reads the dirty map over TLS itself
    await vm.write(vol, 3 * MIB, 100, 0xD2)
    info = (by_volume(await agent.enable(task)))[vol]
    assert info["mode"] == "incremental" and info["changedBytes"] == G
    good = nbdio.NbdAddress("127.0.0.1", int(info["nbdPort"]), None, vol, str(pki.client_dir))
    assert await asyncio.to_thread(dirty, good, info["dirtyBitmapContext"]) == [(3 * MIB, G)]
    assert await agent.areas(task, vol) == [(3 * MIB, G)]
    await agent.disable(task)
    assert vm.qmp("query-block-exports") == [] and tls_objects(vm) == []


async def test_nbd_tls_over_a_unix_socket(
    vm_factory: Callable[..., stack.TestVm],
    make_agent: Callable[..., Awaitable[Agent]],
    pki: Pki,
) -> None:
    vm = vm_factory(disks_mib=[16])
    vol = vm.volumes[0].volume_uuid
    agent = await make_agent(transport="unix", tls_cert_dir=str(pki.nbd_dir))
    task = await agent.create(vm)
    await vm.write(vol, 0, 4 * KIB, 0xE1)
    info = (by_volume(await agent.enable(task)))[vol]
    assert info["nbdTls"] is True and info.get("nbdPort") is None
    conforms(info)
    path = info["nbdSocket"]
    assert await agent.server(task) == NbdServer(None, None, path, True)
    with pytest.raises(HypervisorError, match="requires TLS"):
        await asyncio.to_thread(read, nbdio.NbdAddress(None, None, path, vol), 0, 512)
    good = nbdio.NbdAddress(None, None, path, vol, str(pki.client_dir))
    assert await asyncio.to_thread(read, good, 0, 4 * KIB) == b"\xe1" * (4 * KIB)
    assert await agent.areas(task, vol) == [(0, G)]
    await agent.disable(task)
    assert not exists(path)


# ---- the agent as a process: HTTPS, and the backup client over all of it -----------------------


def write_config(path: Path, port: int, state: Path, qmp_template: str, **extra: str) -> None:
    """A config; extra keys are "section.key" = TOML value text."""
    sections: dict[str, dict[str, str]] = {
        "api": {"listen": f'"127.0.0.1:{port}"', "tokens": f'["{TOKEN}"]'},
        "state": {"dir": f'"{state}"'},
        "libvirt": {"uri": f'"{stack.LIBVIRT_URI}"'},
        "qmp": {"socket_template": f'"{qmp_template}"'},
        "nbd": {"listen": '"127.0.0.1"', "port_range": f'"{PORT_RANGE}"'},
    }
    for dotted, value in extra.items():
        section, key = dotted.split(".")
        sections[section][key] = value
    path.write_text(
        "".join(
            f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
            for name, keys in sections.items()
        )
    )
    path.chmod(0o600)  # it holds the token


class HttpsAgent(AgentProcess):
    """AgentProcess on https://, trusting only the test CA."""

    def __init__(self, config: Path, port: int, ca: Path) -> None:
        super().__init__(config, port)
        self.base = f"https://localhost:{port}"
        self.ca = ca

    async def use_ca(self) -> None:
        await self.session.close()
        context = ssl.create_default_context(cafile=str(self.ca))
        self.session = aiohttp.ClientSession(
            headers={"Authorization": f"OAuth {TOKEN}"},
            connector=aiohttp.TCPConnector(ssl=context),
        )


@pytest.fixture
async def https_agent(
    short_dir: Path, qmp_socket_template: str, pki: Pki, request: pytest.FixtureRequest
) -> AsyncIterator[HttpsAgent]:
    """`cbt-agent serve` with HTTPS. Indirect parametrization adds config keys ("section.key":
    TOML value text; the value NBD_TLS_DIR stands for the test PKI's NBD directory)."""
    extra = {
        k: f'"{pki.nbd_dir}"' if v == NBD_TLS_DIR else v
        for k, v in getattr(request, "param", {}).items()
    }
    port = free_port()
    config = short_dir / "agent.toml"
    write_config(
        config,
        port,
        short_dir / "state",
        qmp_socket_template,
        **{
            "api.tls_cert": f'"{pki.api_cert}"',
            "api.tls_key": f'"{pki.api_key}"',
            # the name the certificate carries: job locations are built from it (never from
            # the request's Host header)
            "api.public_url": f'"https://localhost:{port}"',
            **extra,
        },
    )
    agent = HttpsAgent(config, port, pki.ca_cert)
    await agent.use_ca()
    try:
        await agent.start()
        yield agent
    finally:
        await agent.close()


async def test_https_api_verifies_with_the_ca_and_refuses_plain_http(
    https_agent: HttpsAgent, pki: Pki
) -> None:
    base = https_agent.base
    async with https_agent.session.get(f"{base}/healthz") as r:
        assert r.status == 200
    # an async API: its job location is https too, and pollable
    async with https_agent.session.post(
        f"{base}/zstack/v1/cbt-task/create",
        json={"params": {"name": "x", "vmInstanceUuid": "0" * 32}},
    ) as r:
        assert r.status == 202
        location = (await r.json())["location"]
    assert location.startswith(f"{base}/zstack/v1/api-jobs/")
    for _ in range(200):
        async with https_agent.session.get(location) as r:
            if r.status != 202:
                break
        await asyncio.sleep(0.02)
    assert r.status == 503  # that VM does not exist: a ZStack error, over HTTPS
    # the same certificate seen through the standard library's verification
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    port = int(base.rsplit(":", 1)[1])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    # without the CA the certificate does not verify; plain http gets no HTTP answer
    async with aiohttp.ClientSession() as plain:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await plain.get(f"{base}/healthz")
        with pytest.raises(aiohttp.ClientError):
            async with plain.get(f"http://127.0.0.1:{port}/healthz") as r:
                await r.read()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cbt_agent",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "CBT_AGENT_TOKEN": TOKEN},  # never on the command line
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _raw(image: Path, out: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "convert", "-U", "-q", "-O", "raw", str(image), str(out),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    digest = await asyncio.to_thread(_sha256, out)
    os.unlink(out)
    return digest


@pytest.mark.parametrize(
    "https_agent",
    [{"nbd.transport": '"unix"', "nbd.tls_cert_dir": NBD_TLS_DIR}],
    indirect=True,
    ids=["unix+tls"],
)
async def test_backup_client_over_https_unix_socket_and_nbd_tls(
    vm_factory: Callable[..., stack.TestVm],
    https_agent: HttpsAgent,
    pki: Pki,
    short_dir: Path,
) -> None:
    vm = vm_factory(disks_mib=[16, 8])
    (v0, _, size0), (v1, _, size1) = vm.volumes
    disks = {v0: bytearray(size0), v1: bytearray(size1)}  # what each disk must hold

    async def write(vol: str, offset: int, length: int, byte: int) -> None:
        await vm.write(vol, offset, length, byte)
        disks[vol][offset : offset + length] = bytes([byte]) * length

    dest = short_dir / "backup"
    args = [
        "backup", "--url", https_agent.base, "--vm", vm.vm_uuid,
        "--dest", str(dest), "--cacert", str(pki.ca_cert),
    ]  # fmt: skip
    await write(v0, 0, MIB, 0x11)
    await write(v1, 3 * MIB, 64 * KIB, 0x12)
    # an export that requires TLS, and a client not told where the CA is: a clear refusal
    code, _, err = await _cli(*args)
    assert code == 1 and "requires TLS (nbdTls): pass --nbd-tls-dir" in err, err
    args += ["--nbd-tls-dir", str(pki.client_dir)]
    code, _, err = await _cli(*args)
    assert code == 0, err
    await write(v0, 5 * MIB, 4 * KIB, 0x13)
    code, _, err = await _cli(*args)
    assert code == 0, err
    cps = json.loads((dest / "manifest.json").read_text())["checkpoints"]
    assert [c["mode"] for c in cps] == ["full", "incremental"]
    assert {d["volumeUuid"]: d["copiedBytes"] for d in cps[1]["disks"]} == {v0: G, v1: 0}
    # the latest checkpoint restores to exactly what was written
    restored = short_dir / "restored"
    code, _, err = await _cli(
        "restore", "--dest", str(dest), "--checkpoint", cps[1]["name"], "--out", str(restored)
    )
    assert code == 0, err
    for vol, data in disks.items():
        got = await _raw(restored / f"{vol}.qcow2", short_dir / "r.raw")
        assert got == hashlib.sha256(data).hexdigest(), vol
    socket_dir = short_dir / "state" / "nbd"
    assert os.listdir(socket_dir) == []  # the client disabled the task: socket gone


# ---- the store: where each task's NBD server listens ------------------------------------------


def test_schema_1_database_gains_the_socket_columns(tmp_path: Path) -> None:
    """A database made before unix sockets and TLS (schema 1) migrates in place; `status`'s
    read-only view of an unmigrated one still answers."""
    import sqlite3

    from cbt_agent.store.schema import _MIGRATIONS, SCHEMA_VERSION

    path = tmp_path / "cbt-agent.db"
    conn = sqlite3.connect(path)
    for statement in _MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute(
        "INSERT INTO tasks (uuid, name, vm_uuid, status, create_date, last_op_date, nbd_host, "
        "nbd_port) VALUES ('t1', 'n', 'vm1', 'Running', '2026-01-01T00:00:00+00:00', "
        "'2026-01-01T00:00:00+00:00', '127.0.0.1', 10501)"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    old = SyncStore(path, readonly=True)
    assert old.nbd_server("t1") == NbdServer("127.0.0.1", 10501, None, False)
    old.close()
    store = SyncStore(path)
    try:
        assert store.schema_version() == SCHEMA_VERSION == 4
        assert store.nbd_server("t1") == NbdServer("127.0.0.1", 10501, None, False)
        assert store.nbd_endpoint("t1") == ("127.0.0.1", 10501)
        store.set_server("t1", NbdServer(socket="/run/x.sock", tls=True))
        assert store.nbd_server("t1") == NbdServer(None, None, "/run/x.sock", True)
        assert store.used_nbd_ports() == set()
        store.clear_exports("t1")
        assert store.nbd_server("t1") == NbdServer()
        assert store.nbd_server("missing") == NbdServer()
    finally:
        store.close()


# ---- (d) config refused by key ----------------------------------------------------------------


def test_serve_refuses_bad_tls_and_socket_config_naming_the_key(tmp_path: Path, pki: Pki) -> None:
    cases = {
        "api.tls_key": {"api.tls_cert": f'"{pki.api_cert}"'},
        "api.tls_cert": {"api.tls_cert": f'"{pki.nbd_dir}/server-cert.pem"',
                         "api.tls_key": f'"{pki.api_key}"'},
        "nbd.tls_cert_dir": {"nbd.tls_cert_dir": f'"{pki.client_dir}"'},
        "nbd.transport": {"nbd.transport": '"vsock"'},
        "nbd.socket_dir": {"nbd.transport": '"unix"', "nbd.socket_dir": f'"/{"x" * 80}"'},
    }  # fmt: skip
    for key, extra in cases.items():
        config = tmp_path / "bad.toml"
        write_config(config, free_port(), tmp_path / "state", "/tmp/{vm_uuid}.sock", **extra)
        r = subprocess.run(
            [sys.executable, "-m", "cbt_agent", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2, (key, r.stderr)
        assert r.stderr.startswith(f"cbt-agent: invalid configuration: config {key}: "), r.stderr
        assert "Traceback" not in r.stderr
