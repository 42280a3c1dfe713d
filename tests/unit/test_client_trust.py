"""The backup client trusts nothing it is told (issue 14, item 1): hostile agent replies, job
locations off the agent, hostile manifests and qcow2 headers, and a token on the command line;
and the agent refuses a disk whose serial is not a volume uuid.

A fake agent (aiohttp on loopback) answers the API with the reply under test. Where a copy
happens the export is real: qemu-nbd serving a scratch qcow2 over a unix socket, stopped by
pid. The CLI runs as a user runs it, in a subprocess: an error is one line on stderr and a
non-zero exit, and a refused reply leaves every directory as it was."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import stack
from aiohttp import web

from cbt_agent.client import chain
from cbt_agent.client.chain import CheckpointBackup, DiskBackup, Manifest, with_checkpoint
from cbt_agent.client.errors import BackupError
from cbt_agent.client.target import create_exclusive, path_in, publish
from cbt_agent.contract.replies import (
    CbtTaskInventory,
    CbtTaskResourceRefInventory,
    VolumeCbtBackupInfo,
    VolumeTO,
)
from cbt_agent.errors import OperationError
from cbt_agent.hypervisor.libvirt import parse_domain_xml
from cbt_agent.model import TaskStatus, checkpoint_name

REPO = Path(__file__).resolve().parents[2]
G = 64 * 1024
SIZE = 16 * G
TOKEN = "trust-test-token"
VM, VOL, TASK = "1" * 32, "2" * 32, "3456789abcde" + "0" * 20
CP1, CP2 = checkpoint_name(TASK, 1), checkpoint_name(TASK, 2)
P = "/zstack/v1"


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("qemu-img", "qemu-nbd", "qemu-io"):
        if shutil.which(tool) is None:
            stack.unavailable(f"{tool} (Debian package qemu-utils)")


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under `root` with its content (a link: where it points)."""
    out: dict[str, bytes | str] = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"-> {os.readlink(p)}"
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = "dir"
    return out


@dataclass
class Result:
    code: int
    out: str
    err: str

    def one_error_line(self) -> str:
        """The error as the user sees it: exactly one line, no traceback."""
        assert self.code != 0, self.out
        assert "Traceback" not in self.err, self.err
        lines = self.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("cbt-agent: "), self.err
        return lines[0]


async def cli(*args: str, token: str | None = TOKEN) -> Result:
    env = {k: v for k, v in os.environ.items() if k != "CBT_AGENT_TOKEN"}
    if token is not None:
        env["CBT_AGENT_TOKEN"] = token
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cbt_agent",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


# ---- a real export -------------------------------------------------------------------------


@dataclass(frozen=True)
class Export:
    socket: Path
    name: str
    image: Path


@pytest.fixture
def export(tmp_path: Path) -> Iterator[Export]:
    """qemu-nbd serving a qcow2 with data in clusters 0 and 5, read-only, over a unix socket."""
    image = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE))
    run(
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x5a 0 64k",
        "-c",
        f"write -P 0xa5 {5 * G} 64k",
        str(image),
    )
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(
        ["qemu-nbd", "-r", "-t", "-f", "qcow2", "-x", VOL, "-k", str(sock), str(image)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, "qemu-nbd exited"
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.01)
        yield Export(sock, VOL, image)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)


# ---- the fake agent ------------------------------------------------------------------------


def inventory(status: TaskStatus = TaskStatus.STOPPED) -> dict[str, Any]:
    now = datetime.now(UTC)
    ref = CbtTaskResourceRefInventory(
        id=1,
        task_uuid=TASK,
        resource_uuid=VM,
        resource_type="VmInstanceVO",
        create_date=now,
        last_op_date=now,
    )
    inv = CbtTaskInventory(
        uuid=TASK,
        name="t",
        status=status,
        create_date=now,
        last_op_date=now,
        resource_refs=[ref],
    )
    return inv.wire()


def backup_info(export: Export | None) -> dict[str, Any]:
    """One disk's VolumeCbtBackupInfo for a first (full) Enable, as the agent writes it."""
    info = VolumeCbtBackupInfo.build(
        volume=VolumeTO(
            volume_uuid=VOL,
            install_path="/var/lib/zstack/v.qcow2",
            device_id=0,
            device_type="file",
            format="qcow2",
            use_virtio=True,
        ),
        mode="full",
        bitmap_name=CP1,
        export_name=VOL,
        dirty_bitmap_context=None,
        since_bitmap_name=None,
        reason="first checkpoint of this disk",
        granularity=G,
        size=SIZE,
        changed_bytes=SIZE,
        nbd_socket=str(export.socket) if export else "/nonexistent.sock",
        bitmap_base64=base64.b64encode(bytes(SIZE // G // 8)).decode(),
        target="/var/lib/cbt-agent/scratch.qcow2",
        scratch_node_name="cbtsc-x",
    )
    return info.wire()


@dataclass
class Recorder:
    """A loopback HTTP server that records every request (method, path, Authorization)."""

    handler: Callable[[web.Request], Any] | None = None
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)
    base: str = ""

    async def _any(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path, request.headers.get("Authorization")))
        if self.handler is None:
            return web.json_response({})
        response: web.StreamResponse = await self.handler(request)
        return response


@contextlib.asynccontextmanager
async def serve(rec: Recorder) -> AsyncIterator[Recorder]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec._any)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    rec.base = f"http://{host}:{port}"
    try:
        yield rec
    finally:
        await runner.cleanup()


@dataclass
class FakeAgent:
    """The CBT task API with one Stopped task of VM; Enable's job result is `enable_reply`,
    its location `enable_location` (None: the agent's own)."""

    info: dict[str, Any]
    enable_location: str | None = None
    rec: Recorder = field(default_factory=Recorder)

    @property
    def base(self) -> str:
        return self.rec.base

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if request.method == "GET" and path == f"{P}/cbt-task":
            return web.json_response({"inventories": [inventory()]})
        if request.method == "POST" and path == f"{P}/cbt-task/enable/{TASK}":
            where = self.enable_location or f"{self.base}{P}/api-jobs/enable"
            return web.json_response({"location": where}, status=202)
        if request.method == "POST" and path == f"{P}/cbt-task/disable/{TASK}":
            return web.json_response({"location": f"{self.base}{P}/api-jobs/disable"}, status=202)
        if path == f"{P}/api-jobs/enable":
            return web.json_response({"volumeCbtBackupInfos": [self.info]})
        if path == f"{P}/api-jobs/disable":
            return web.json_response({"inventory": inventory()})
        if path == f"{P}/api-jobs/redirect":
            raise web.HTTPFound(self.enable_location or "/")
        return web.json_response({"error": {"code": "SYS.1007", "details": "no"}}, status=404)

    def requests(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, _ in self.rec.seen]


@contextlib.asynccontextmanager
async def fake_agent(info: dict[str, Any]) -> AsyncIterator[FakeAgent]:
    agent = FakeAgent(info)
    agent.rec.handler = agent.handle
    async with serve(agent.rec):
        yield agent


def backup_args(agent: FakeAgent, dest: Path) -> list[str]:
    return ["backup", "--url", agent.base, "--vm", VM, "--dest", str(dest), "--quiet"]


# ---- a hostile reply -----------------------------------------------------------------------


async def test_a_backup_from_the_fake_agent_completes_verifies_and_restores(
    export: Export, tmp_path: Path
) -> None:
    """The baseline every hostile case below differs from in one field only."""
    dest, out = tmp_path / "backup", tmp_path / "out"
    async with fake_agent(backup_info(export)) as agent:
        r = await cli(*backup_args(agent, dest))
        assert r.code == 0, r.err
        assert {auth for _, _, auth in agent.rec.seen} == {f"OAuth {TOKEN}"}
        assert ("POST", f"{P}/cbt-task/disable/{TASK}") in agent.requests()
    name = chain.disk_file_name(VOL, CP1, chain.FULL)
    assert sorted(p.name for p in dest.iterdir()) == sorted(["manifest.json", name])
    r = await cli("verify", str(dest))
    assert r.code == 0 and f"OK       {name}" in r.out, r.out + r.err
    r = await cli("restore", "--dest", str(dest), "--out", str(out), "--quiet")
    assert r.code == 0, r.err
    image, restored = str(export.image), str(out / f"{VOL}.qcow2")
    await asyncio.to_thread(run, "qemu-img", "compare", "-q", image, restored)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(info: dict[str, Any]) -> None:
        *parents, key = path.split(".")
        target = info
        for p in parents:
            target = target[p]
        target[key] = value

    return edit


VICTIM = "victim-dir"  # beside the backup directory: nothing may reach it


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        # the finding: an absolute name made `backup` replace a file there and exit 0
        (_set("volume.volumeUuid", f"<tmp>/{VICTIM}/x"), "volumeUuid"),
        (_set("volume.volumeUuid", f"../{VICTIM}/" + "a" * 20), "volumeUuid"),
        # passes a `$`-anchored pattern: a newline would end up in a file name
        (_set("volume.volumeUuid", "a" * 32 + "\n"), "volumeUuid"),
        (_set("bitmapName", f"../{VICTIM}/x"), "bitmapName"),
        # a name the agent never cuts: not the agent's checkpoint form
        (_set("bitmapName", "Nightly.1"), "bitmapName 'Nightly.1'"),
        (_set("sinceBitmapName", "x/../../y"), "sinceBitmapName"),
    ],
)
async def test_a_reply_whose_names_would_become_paths_is_refused_and_nothing_is_written(
    export: Export, tmp_path: Path, edit: Callable[[dict[str, Any]], None], said: str
) -> None:
    victim_dir = tmp_path / VICTIM
    victim_dir.mkdir()
    victim = victim_dir / "x"
    victim.write_bytes(b"precious")
    dest = tmp_path / "backup"
    dest.mkdir()
    info = backup_info(export)
    edit(info)
    vol = info["volume"]["volumeUuid"]
    info["volume"]["volumeUuid"] = vol.replace("<tmp>", str(tmp_path))
    before = snapshot(tmp_path / VICTIM), snapshot(dest)
    async with fake_agent(info) as agent:
        r = await cli(*backup_args(agent, dest))
        line = r.one_error_line()
        assert said in line and ("refused" in line or "malformed" in line), line
        # the task is not left holding its exports
        assert ("POST", f"{P}/cbt-task/disable/{TASK}") in agent.requests()
    assert (snapshot(tmp_path / VICTIM), snapshot(dest)) == before


async def test_a_refused_reply_leaves_no_new_backup_directory(tmp_path: Path) -> None:
    info = backup_info(None)
    info["bitmapName"] = "Nightly.1"
    async with fake_agent(info) as agent:
        r = await cli(*backup_args(agent, tmp_path / "new" / "backup"))
    r.one_error_line()
    assert not (tmp_path / "new" / "backup").exists()


async def test_a_reply_naming_a_disk_twice_is_refused(export: Export, tmp_path: Path) -> None:
    info = backup_info(export)

    async with fake_agent(info) as agent:

        async def twice(request: web.Request) -> web.StreamResponse:
            if request.path == f"{P}/api-jobs/enable":
                return web.json_response({"volumeCbtBackupInfos": [info, info]})
            return await agent.handle(request)

        agent.rec.handler = twice
        dest = tmp_path / "backup"
        dest.mkdir()
        r = await cli(*backup_args(agent, dest))
    assert "returned a disk twice" in r.one_error_line()
    assert snapshot(dest) == {}


# ---- job locations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "location",
    [
        "<thief>/zstack/v1/api-jobs/enable",  # another port on the same host
        "https://<agent-host-port>/zstack/v1/api-jobs/enable",  # another scheme
        "http://localhost:<agent-port>/zstack/v1/api-jobs/enable",  # another host name
        "http://user:pw@<agent-host-port>/zstack/v1/api-jobs/enable",  # credentials in it
        "redirect",  # the agent's own location answers 302 to the thief
    ],
)
async def test_a_job_location_off_the_agent_is_refused_and_never_gets_the_token(
    export: Export, tmp_path: Path, location: str
) -> None:
    dest = tmp_path / "backup"
    dest.mkdir()
    async with serve(Recorder()) as thief, fake_agent(backup_info(export)) as agent:
        hostport = agent.base.removeprefix("http://")
        if location == "redirect":
            agent.enable_location = f"{thief.base}{P}/api-jobs/enable"

            async def redirecting(request: web.Request) -> web.StreamResponse:
                if request.path == f"{P}/cbt-task/enable/{TASK}":
                    where = f"{agent.base}{P}/api-jobs/redirect"
                    return web.json_response({"location": where}, status=202)
                return await agent.handle(request)

            agent.rec.handler = redirecting
        else:
            agent.enable_location = (
                location.replace("<thief>", thief.base)
                .replace("<agent-host-port>", hostport)
                .replace("<agent-port>", hostport.rsplit(":", 1)[1])
            )
        r = await cli(*backup_args(agent, dest))
        line = r.one_error_line()
    if location == "redirect":
        assert "HTTP 302" in line, line
    else:
        assert "is not on" in line and "the token was not sent there" in line, line
    assert thief.seen == []
    assert snapshot(dest) == {}


# ---- the token -------------------------------------------------------------------------------


async def test_a_token_on_the_command_line_is_refused_saying_what_to_use(tmp_path: Path) -> None:
    async with fake_agent(backup_info(None)) as agent:
        r = await cli(*backup_args(agent, tmp_path / "b"), "--token", TOKEN, token=None)
        line = r.one_error_line()
        assert r.code == 2 and "ps" in line, line
        assert "$CBT_AGENT_TOKEN" in line and "--token-file" in line, line
        r = await cli(*backup_args(agent, tmp_path / "b"), token=None)
        line = r.one_error_line()
        assert r.code == 2 and "$CBT_AGENT_TOKEN" in line and "--token-file" in line, line
        r = await cli(*backup_args(agent, tmp_path / "b"), token="two\r\nX-Evil: 1")
        assert r.code == 2 and "one token" in r.one_error_line()
        assert agent.rec.seen == []
    assert not (tmp_path / "b").exists()


async def test_a_token_file_must_be_the_users_alone(export: Export, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    dest = tmp_path / "backup"
    async with fake_agent(backup_info(export)) as agent:
        for mode in (0o644, 0o640, 0o604):
            token_file.chmod(mode)
            r = await cli(*backup_args(agent, dest), "--token-file", str(token_file), token=None)
            line = r.one_error_line()
            assert r.code == 2 and f"chmod 600 {token_file}" in line, line
        assert agent.rec.seen == []
        token_file.chmod(0o600)
        r = await cli(*backup_args(agent, dest), "--token-file", str(token_file), token="wrong")
        assert r.code == 0, r.err
        assert {auth for _, _, auth in agent.rec.seen} == {f"OAuth {TOKEN}"}
    token_file.write_text("two\ntokens\n")
    r = await cli(
        "backup",
        "--url",
        "http://127.0.0.1:9",
        "--vm",
        VM,
        "--dest",
        str(dest),
        "--token-file",
        str(token_file),
        token=None,
    )
    assert "one token on one line" in r.one_error_line()


# ---- a hostile backup directory ----------------------------------------------------------------


def qemu_img_create(path: Path, *opts: str) -> None:
    run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        f"cluster_size={G}",
        *opts,
        str(path),
        str(SIZE),
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def disk(file: str, backing: str | None, path: Path, since: str | None = None) -> DiskBackup:
    return DiskBackup(
        volume_uuid=VOL,
        file=file,
        backing_file=backing,
        mode=chain.INCREMENTAL if backing else chain.FULL,
        size=SIZE,
        granularity=G,
        copied_bytes=G,
        sha256=sha256(path),
        reason=None if backing else "first",
        since=since,
    )


def write_manifest(dest: Path, doc: dict[str, Any]) -> None:
    (dest / "manifest.json").write_text(json.dumps(doc, indent=2))


def backup_dir(
    dest: Path, full_opts: tuple[str, ...] = (), inc_backing: str | None = None
) -> Manifest:
    """A backup directory made by hand as the client makes it: a full at CP1 and an
    incremental at CP2; `full_opts` / `inc_backing` make a hostile header with the same
    manifest (its sha256 then matching the hostile file, as an attacker would write it)."""
    dest.mkdir()
    full = dest / chain.disk_file_name(VOL, CP1, chain.FULL)
    inc = dest / chain.disk_file_name(VOL, CP2, chain.INCREMENTAL)
    qemu_img_create(full, *full_opts)
    if not full_opts:
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", str(full))
    qemu_img_create(inc, "-u", "-b", inc_backing or full.name, "-F", "qcow2")
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x22 {G} 64k", str(inc))
    m = Manifest(vm_uuid=VM)
    d1 = disk(full.name, None, full)
    m = with_checkpoint(m, CheckpointBackup(CP1, "full", "2026-01-01T00:00:00+00:00", (d1,)), TASK)
    d2 = disk(inc.name, full.name, inc, since=CP1)
    m = with_checkpoint(
        m, CheckpointBackup(CP2, "incremental", "2026-01-02T00:00:00+00:00", (d2,)), TASK
    )
    write_manifest(dest, m.to_dict())
    return m


def test_a_chain_made_as_the_client_makes_it_verifies_and_restores(tmp_path: Path) -> None:
    dest, out = tmp_path / "backup", tmp_path / "out"
    backup_dir(dest)
    r = asyncio.run(cli("verify", str(dest)))
    assert r.code == 0, r.out + r.err
    r = asyncio.run(cli("restore", "--dest", str(dest), "--out", str(out), "--quiet"))
    assert r.code == 0, r.err
    raw = tmp_path / "r.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(out / f"{VOL}.qcow2"), str(raw))
    data = raw.read_bytes()
    assert data[:G] == b"\x11" * G and data[G : 2 * G] == b"\x22" * G


SECRET = b"\x5e" * G  # stands for /etc/shadow, /dev/sda: a host file outside the directory


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("raw backing", "a full file backed by"),
        ("qcow2 backing", "a full file backed by"),
        ("data file", "external file"),
        ("incremental backed elsewhere", "the manifest says"),
    ],
)
def test_a_header_naming_a_host_file_fails_verify_and_restore_reads_nothing(
    tmp_path: Path, kind: str, said: str
) -> None:
    secret = tmp_path / "secret.raw"
    secret.write_bytes(SECRET + bytes(SIZE - G))
    elsewhere = tmp_path / "elsewhere.qcow2"
    qemu_img_create(elsewhere, "-b", str(secret), "-F", "raw")
    dest, out = tmp_path / "backup", tmp_path / "out"
    if kind == "raw backing":
        backup_dir(dest, full_opts=("-u", "-b", str(secret), "-F", "raw"))
    elif kind == "qcow2 backing":
        backup_dir(dest, full_opts=("-u", "-b", str(elsewhere), "-F", "qcow2"))
    elif kind == "data file":
        # made with a throwaway data file, then pointed at the secret (the secret untouched)
        backup_dir(dest, full_opts=("-o", f"data_file={tmp_path / 'throwaway'},data_file_raw=on"))
        full = dest / chain.disk_file_name(VOL, CP1, chain.FULL)
        run("qemu-img", "amend", "-f", "qcow2", "-o", f"data_file={secret}", str(full))
        m = json.loads((dest / "manifest.json").read_text())
        m["checkpoints"][0]["disks"][0]["sha256"] = sha256(full)
        write_manifest(dest, m)
    else:
        backup_dir(dest, inc_backing=str(elsewhere))
    assert secret.read_bytes()[:G] == SECRET
    r = asyncio.run(cli("verify", str(dest)))
    assert r.code == 1, r.out
    assert said in r.out and "UNSAFE" in r.out, r.out
    r = asyncio.run(cli("restore", "--dest", str(dest), "--out", str(out), "--quiet"))
    line = r.one_error_line()
    assert "refused" in line and said in line, line
    assert snapshot(out) == {}


@pytest.mark.parametrize(
    ("field_", "value"),
    [
        ("volumeUuid", "../escape"),
        ("volumeUuid", "<tmp>/escape"),  # an absolute name
        ("file", "../escape.qcow2"),
        ("file", "other.qcow2"),  # plain, but not the name the client gives that file
    ],
)
def test_a_manifest_naming_paths_is_refused_by_verify_and_restore(
    tmp_path: Path, field_: str, value: str
) -> None:
    dest, out = tmp_path / "backup", tmp_path / "out"
    m = backup_dir(dest).to_dict()
    value = value.replace("<tmp>", str(tmp_path))
    if field_ == "volumeUuid":  # the whole chain, consistently: the finding's manifest
        for cp in m["checkpoints"]:
            cp["disks"][0][field_] = value
    else:
        m["checkpoints"][1]["disks"][0][field_] = value
    write_manifest(dest, m)
    before = snapshot(tmp_path)
    r = asyncio.run(cli("restore", "--dest", str(dest), "--out", str(out), "--quiet"))
    assert field_ in r.one_error_line()
    r = asyncio.run(cli("verify", str(dest)))
    assert field_ in r.one_error_line()
    assert snapshot(tmp_path) == before


def test_restore_never_replaces_a_file_in_out(tmp_path: Path) -> None:
    dest, out = tmp_path / "backup", tmp_path / "out"
    backup_dir(dest)
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (out / f"{VOL}.qcow2").symlink_to(victim)
    r = asyncio.run(cli("restore", "--dest", str(dest), "--out", str(out), "--quiet"))
    assert "symbolic link" in r.one_error_line()
    assert victim.read_bytes() == b"precious"


# ---- the file tools ------------------------------------------------------------------------------


def test_files_are_made_exclusively_inside_their_directory(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    d = tmp_path / "d"
    d.mkdir()
    for bad in ("../victim", "/etc/passwd", "a/b", "..", "", "x\0y"):
        with pytest.raises(BackupError, match="not a plain file name"):
            path_in(d, bad)
    (d / "link").symlink_to(victim)
    with pytest.raises(BackupError, match="symbolic link"):
        path_in(d, "link")
    with pytest.raises(BackupError, match="already exists"):
        create_exclusive(d / "link")  # O_EXCL: a link there is not followed
    (d / "new.part").write_bytes(b"new")
    with pytest.raises(BackupError, match="already exists"):
        publish(d / "new.part", d / "link")  # never replaces what is there
    assert victim.read_bytes() == b"precious"
    assert (d / "new.part").read_bytes() == b"new"
    publish(d / "new.part", d / "new")
    assert (d / "new").read_bytes() == b"new" and not (d / "new.part").exists()


# ---- the agent: a disk's serial --------------------------------------------------------------


def domain_xml(serial: str) -> str:
    return (
        f"<domain type='kvm' id='3'><name>{VM}</name><devices>"
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='/v/root.qcow2' index='1'/><target dev='vda' bus='virtio'/>"
        f"<serial>{'4' * 32}</serial></disk>"
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='/v/data.qcow2' index='2'/><target dev='vdb' bus='virtio'/>"
        f"<serial>{serial}</serial></disk>"
        "</devices></domain>"
    )


@pytest.mark.parametrize("serial", ["../../etc/x", "/var/lib/x", "abc", "4" * 31 + "g", "a" * 33])
def test_the_agent_refuses_a_disk_whose_serial_is_not_a_volume_uuid(serial: str) -> None:
    odd = parse_domain_xml(domain_xml(serial))
    # the disk is never used (not a DiskInfo); Disable and Delete, which need no disk, go on
    assert [d.volume_uuid for d in odd.disks] == ["4" * 32]
    with pytest.raises(OperationError) as e:
        odd.require_volume_serials()  # what Create, Enable and Export call
    assert "disk vdb (/v/data.qcow2)" in e.value.message
    assert "not a volume uuid" in e.value.message and "\n" not in e.value.message
    vm = parse_domain_xml(domain_xml("AB" * 16))  # either case, as ZStack's uuids
    assert [d.volume_uuid for d in vm.disks] == ["4" * 32, "AB" * 16]
