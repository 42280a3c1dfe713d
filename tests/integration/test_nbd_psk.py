"""Issue 14.3 on the real stack: with [nbd] tls = "psk" an export needs the credential its Enable
handed out. QEMU refuses a plain client, a TLS client with a wrong key or identity, and the key
of an earlier Enable; the key reads the exact bytes; the key's file is private and gone after
Disable and after a crash; the reference client uses the key with nothing configured; a plain
NBD server on a non-loopback address is refused at start.

All NBD traffic is on 127.0.0.1 or a unix socket. Agents run in-process (CbtService) or as a
process (`cbt-agent serve`, stopped by pid); VMs come from vm_factory.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import stack
from agentproc import AgentProcess, cli, free_port, restored_disks, write_config
from cbtharness import Agent, by_volume, read_at
from offlinehelp import stop_daemons_of
from openapi_schema_validator import OAS31Validator

from cbt_agent import commands
from cbt_agent.api import replies
from cbt_agent.api.openapi import openapi_document
from cbt_agent.config import parse_config
from cbt_agent.errors import HypervisorError
from cbt_agent.qemu import nbd as nbdio
from cbt_agent.qemu.psk import Psk

pytestmark = pytest.mark.stack

KIB = 1024
MIB = 1 << 20
G = 64 * KIB
PORT_RANGE = "13300:13349"  # NBD ports of this module's agents (other modules use others)
PSK_ID = "cbt-nbd-psk"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory (unix socket paths must fit in 107 bytes; tmp_path may not)."""
    d = Path(tempfile.mkdtemp(prefix="cbt-psk-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


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
                "nbd": {"listen": "127.0.0.1", "port_range": PORT_RANGE, "tls": "psk", **nbd},
            }
        )
        agent = Agent(config)
        await agent.open()
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        await agent.close()


def key_of(info: dict[str, Any]) -> Psk:
    return Psk(info["nbdTlsPskIdentity"], info["nbdTlsPsk"])


def address(info: dict[str, Any], key: Psk | None) -> nbdio.NbdAddress:
    port = int(info["nbdPort"]) if info.get("nbdPort") else None
    return nbdio.NbdAddress(
        info.get("nbdServer"), port, info.get("nbdSocket"), info["exportName"], psk=key
    )


async def aread(addr: nbdio.NbdAddress, offset: int, length: int) -> bytes:
    return await asyncio.to_thread(read_at, addr, offset, length)


def exists(path: str | Path) -> bool:
    return os.path.lexists(path)


def psk_objects(vm: stack.TestVm) -> list[str]:
    return [o["name"] for o in vm.qmp("qom-list", {"path": "/objects"}) if o["name"] == PSK_ID]


def conforms(info: dict[str, Any]) -> None:
    doc = openapi_document()
    schema = {"$ref": "#/components/schemas/VolumeCbtBackupInfo", "components": doc["components"]}
    assert [e.message for e in OAS31Validator(schema).iter_errors(info)] == []


async def refused(addr: nbdio.NbdAddress, why: str) -> None:
    with pytest.raises(HypervisorError, match=why):
        await aread(addr, 0, 512)


async def test_only_the_key_of_the_current_enable_reads_and_disable_removes_it(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[16])
    vol = vm.volumes[0].volume_uuid
    agent = await make_agent()
    keys_dir = agent.config.state_dir / "nbd-psk"
    task = await agent.create(vm)
    await vm.write(vol, MIB, 64 * KIB, 0xD1)

    info = by_volume(await agent.enable(task))[vol]
    first = key_of(info)
    assert info["nbdTls"] is True and info["nbdServer"] == "127.0.0.1"
    meta = json.loads(info["metadata"])
    assert (meta["nbdTlsPskIdentity"], meta["nbdTlsPsk"]) == (first.identity, first.key)
    conforms(info)
    # QEMU reads the key from a private file named by the task, with a tls-creds-psk object
    path = keys_dir / task / "keys.psk"
    assert path.read_text() == first.line()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    assert psk_objects(vm) == [PSK_ID]
    await vm.write(vol, MIB, 4 * KIB, 0xEE)  # after the checkpoint: not in the export

    # no key, a wrong key for the right identity, the right key under another identity: refused
    await refused(address(info, None), "requires TLS")
    await refused(address(info, Psk(first.identity, Psk.new().key)), "NBD connect")
    await refused(address(info, Psk("cbt-0000000000000000", first.key)), "NBD connect")
    # the key reads the point-in-time bytes exactly
    assert await aread(address(info, first), MIB, 64 * KIB) == b"\xd1" * (64 * KIB)
    assert await aread(address(info, first), 0, 4 * KIB) == bytes(4 * KIB)
    assert await agent.areas(task, vol) == [(MIB, G)]  # the agent reads with the key too

    await agent.disable(task)
    assert not (keys_dir / task).exists() and os.listdir(keys_dir) == []
    assert psk_objects(vm) == [] and vm.qmp("query-block-exports") == []
    assert (await agent.server(task)).psk is False

    # the next Enable: a new identity and key; the first key no longer opens anything
    await vm.write(vol, 3 * MIB, 100, 0xD2)
    info = by_volume(await agent.enable(task))[vol]
    second = key_of(info)
    assert info["mode"] == "incremental" and info["changedBytes"] == 2 * G
    assert second.identity != first.identity and second.key != first.key
    assert path.read_text() == second.line()
    await refused(address(info, first), "NBD connect")
    await refused(address(info, Psk(second.identity, first.key)), "NBD connect")
    assert await aread(address(info, second), 3 * MIB, 100) == b"\xd2" * 100
    want = [(MIB, G), (3 * MIB, G)]
    assert await agent.areas(task, vol) == want
    runs = await asyncio.to_thread(
        nbdio.dirty_extents, address(info, second), info["dirtyBitmapContext"]
    )
    assert [(e.start, e.length) for e in runs] == want
    await agent.disable(task)
    assert os.listdir(keys_dir) == [] and psk_objects(vm) == []


async def test_a_key_over_a_unix_socket(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    vm = vm_factory(disks_mib=[16])
    vol = vm.volumes[0].volume_uuid
    agent = await make_agent(transport="unix")
    task = await agent.create(vm)
    await vm.write(vol, 0, 4 * KIB, 0xE1)
    info = by_volume(await agent.enable(task))[vol]
    assert info["nbdTls"] is True and info.get("nbdPort") is None and info["nbdSocket"]
    conforms(info)
    await refused(address(info, None), "requires TLS")
    await refused(address(info, Psk(info["nbdTlsPskIdentity"], Psk.new().key)), "NBD connect")
    assert await aread(address(info, key_of(info)), 0, 4 * KIB) == b"\xe1" * (4 * KIB)
    assert await agent.areas(task, vol) == [(0, G)]
    await agent.disable(task)
    assert not exists(info["nbdSocket"])
    assert os.listdir(agent.config.state_dir / "nbd-psk") == []


# ---- the agent as a process ---------------------------------------------------------------------


@pytest.fixture
async def psk_agent(short_dir: Path, qmp_socket_template: str) -> AsyncIterator[AgentProcess]:
    port = free_port()
    config = short_dir / "agent.toml"
    write_config(
        config, port, short_dir / "state", qmp_socket_template, PORT_RANGE, 'tls = "psk"\n'
    )
    agent = AgentProcess(config, port)
    try:
        yield agent
    finally:
        await agent.close()


async def test_reference_client_backs_up_with_the_handed_out_key(
    vm_factory: Callable[..., stack.TestVm], psk_agent: AgentProcess, short_dir: Path
) -> None:
    vm = vm_factory(disks_mib=[16, 8])
    (v0, _, size0), (v1, _, size1) = vm.volumes
    disks = {v0: bytearray(size0), v1: bytearray(size1)}

    async def write(vol: str, offset: int, length: int, byte: int) -> None:
        await vm.write(vol, offset, length, byte)
        disks[vol][offset : offset + length] = bytes([byte]) * length

    await psk_agent.start()
    dest = short_dir / "backup"
    args = ["backup", "--url", psk_agent.base, "--vm", vm.vm_uuid]
    args += ["--dest", str(dest)]
    await write(v0, 0, MIB, 0x11)
    await write(v1, 3 * MIB, 64 * KIB, 0x12)
    await cli(*args)  # no TLS option: the key comes with the Enable
    after_full = {v: bytes(d) for v, d in disks.items()}
    await write(v0, 5 * MIB, 4 * KIB, 0x13)
    await cli(*args)
    cps = json.loads((dest / "manifest.json").read_text())["checkpoints"]
    assert [c["mode"] for c in cps] == ["full", "incremental"]
    assert {d["volumeUuid"]: d["copiedBytes"] for d in cps[1]["disks"]} == {v0: G, v1: 0}
    for cp, want in ((cps[0], after_full), (cps[1], {v: bytes(d) for v, d in disks.items()})):
        got = await restored_disks(dest, cp["name"], short_dir / f"restored-{cp['name']}")
        assert {v: hashlib.sha256(b).digest() for v, b in got.items()} == {
            v: hashlib.sha256(b).digest() for v, b in want.items()
        }
    # the client disabled the task: no key left on disk or in QEMU
    assert os.listdir(short_dir / "state" / "nbd-psk") == []
    assert psk_objects(vm) == []
    await psk_agent.stop()


async def test_a_key_left_by_a_crash_is_removed_at_start(
    vm_factory: Callable[..., stack.TestVm], psk_agent: AgentProcess, short_dir: Path
) -> None:
    vm = vm_factory(disks_mib=[16])
    keys_dir = short_dir / "state" / "nbd-psk"
    await psk_agent.start()
    status, reply = await psk_agent.call(
        "POST", "/cbt-task/create", {"params": {"name": "psk", "vmInstanceUuid": vm.vm_uuid}}
    )
    assert status == 200, reply
    task = reply["inventory"]["uuid"]
    await psk_agent.stop()
    # killed with the key made and the NBD server up: the restart rolls the Enable back
    await psk_agent.start(crash_at="enable:nbd-server")
    await psk_agent.killed_by("POST", f"/cbt-task/enable/{task}", {})
    assert (keys_dir / task / "keys.psk").exists()
    # and a key no task refers to (a database restored from an older copy)
    stray = keys_dir / ("f" * 32)
    stray.mkdir(mode=0o700)
    (stray / "keys.psk").write_text(Psk.new().line())
    await psk_agent.start()
    assert os.listdir(keys_dir) == []
    assert psk_objects(vm) == [] and vm.qmp("query-block-exports") == []
    # and the next Enable works, with a key of its own
    status, reply = await psk_agent.call("POST", f"/cbt-task/enable/{task}", {})
    assert status == 200, reply
    (info,) = reply["volumeCbtBackupInfos"]
    assert await aread(address(info, key_of(info)), 0, 512) == bytes(512)
    status, reply = await psk_agent.call("POST", f"/cbt-task/disable/{task}", {})
    assert status == 200, reply
    assert os.listdir(keys_dir) == []
    await psk_agent.stop()


def test_serve_refuses_plain_nbd_on_a_non_loopback_address(tmp_path: Path) -> None:
    for listen in ("0.0.0.0", "192.0.2.10"):
        config = tmp_path / "agent.toml"
        write_config(config, free_port(), tmp_path / "state", "/tmp/{vm_uuid}.sock")
        config.write_text(
            config.read_text().replace('listen = "127.0.0.1"\n', f'listen = "{listen}"\n')
        )
        r = subprocess.run(
            [sys.executable, "-m", "cbt_agent", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith(
            f"cbt-agent: invalid configuration: config nbd.listen: {listen} is not a loopback "
            "address"
        ), r.stderr
        assert 'nbd.tls = "psk"' in r.stderr and "Traceback" not in r.stderr


async def test_an_offline_export_hands_out_a_key_too(
    vm_factory: Callable[..., stack.TestVm], make_agent: Callable[..., Awaitable[Agent]]
) -> None:
    """ExportNbdVolumes of a shut-off VM with [nbd] tls = "psk": the qemu-storage-daemon's
    exports need the key the reply hands out (its incremental map was read with it), and
    UnexportNbdVolumes removes it."""
    vm = vm_factory(disks_mib=[16])
    vol = vm.volumes[0].volume_uuid
    agent = await make_agent()
    task = await agent.create(vm)
    first = by_volume(await agent.enable(task))[vol]["bitmapName"]
    await agent.disable(task)
    await vm.write(vol, MIB, 4 * KIB, 0xE2)
    vm.shutdown()
    try:
        cmd = commands.ExportVolumes(vm.vm_uuid, (), first, False)
        reply = replies.export_reply(await agent.service.export_volumes(cmd))
        info = by_volume(reply["volumeInfos"])[vol]
        assert (info["mode"], info["sinceBitmapName"], info["nbdTls"]) == (
            "incremental",
            first,
            True,
        )
        conforms(info)
        key = key_of(info)
        assert base64.b64decode(info["bitmapBase64"])[MIB // G // 8] == 1 << (MIB // G % 8)
        await refused(address(info, None), "requires TLS")
        await refused(address(info, Psk(key.identity, Psk.new().key)), "NBD connect")
        assert await aread(address(info, key), MIB, 4 * KIB) == b"\xe2" * (4 * KIB)
        assert await agent.areas(task, vol) == [(MIB, G)]
        await agent.service.unexport_volumes(commands.UnexportVolumes(vm.vm_uuid, ()))
        assert os.listdir(agent.config.state_dir / "nbd-psk") == []
        await refused(address(info, key), "NBD connect")
    finally:
        await stop_daemons_of(agent.config.state_dir)
