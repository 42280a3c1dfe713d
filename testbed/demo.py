"""The demo (scripts/demo.sh): a throwaway TCG VM under libvirt, the agent as a real process,
and a full CBT cycle over the HTTP API: Create, Enable (full), write, Disable, writes around a
live snapshot, Enable (incremental), read the changes over NBD, Disable, Delete. Everything it
starts it stops again, by pid."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from xml.sax.saxutils import quoteattr

import aiohttp

from cbt_agent.hypervisor.libvirt import Hypervisor
from cbt_agent.qemu import images
from cbt_agent.qemu import nbd as nbdio
from testbed.domain import throwaway_domain_xml
from testbed.qemu_io import qemu_io

URI = "qemu:///system"
MIB = 1 << 20


async def _run(*cmd: str, show: bool = False) -> None:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=None if show else asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {err.decode(errors='replace').strip()}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(text: str = "") -> None:
    print(text, flush=True)


def step(n: int, text: str) -> None:
    say(f"\n\033[1m[{n}] {text}\033[0m")


class Api:
    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.headers = {"Authorization": f"OAuth {token}"}
        self.session = aiohttp.ClientSession()

    async def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """An asynchronous ZStack API: 202 + location, then poll until 200 or 503."""
        url = f"{self.base}/zstack/v1{path}"
        async with self.session.request(method, url, json=body, headers=self.headers) as r:
            reply = await r.json()
            if r.status != 202:
                raise RuntimeError(f"{method} {path}: HTTP {r.status} {reply}")
        location = reply["location"]
        say(f"    {method} {path} -> 202, polling {urlsplit(location).path}")
        while True:
            async with self.session.get(location, headers=self.headers) as r:
                if r.status == 202:
                    await asyncio.sleep(0.05)
                    continue
                result: dict[str, Any] = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"{method} {path} failed: {result}")
                return result

    async def close(self) -> None:
        await self.session.close()


async def _write(hv: Hypervisor, vm_uuid: str, alias: str, pattern: int, off: int, n: int) -> None:
    await qemu_io(
        hv, vm_uuid, f"/machine/peripheral/{alias}/virtio-backend", f"write -P {pattern} {off} {n}"
    )


async def _snapshot_disk0(hv: Hypervisor, vm_uuid: str, overlay: Path) -> None:
    """A live external disk-only snapshot of vda, vdb left out: ZStack's volume snapshot."""
    import libvirt

    xml = (
        "<domainsnapshot><name>demo-snap</name><disks>"
        f"<disk name='vda' snapshot='external'><source file={quoteattr(str(overlay))}/></disk>"
        "<disk name='vdb' snapshot='no'/></disks></domainsnapshot>"
    )
    flags = (
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    )
    conn = await hv.connection()
    dom = await asyncio.to_thread(conn.lookupByName, vm_uuid)
    await asyncio.to_thread(dom.snapshotCreateXML, xml, flags)


def _show_infos(infos: list[dict[str, Any]]) -> None:
    for i in infos:
        vol = i["volume"]["volumeUuid"]
        say(
            f"    disk {vol[:8]}  mode={i['mode']:<11} checkpoint={i['bitmapName']}  "
            f"nbd://{i['nbdServer']}:{i['nbdPort']}/{i['exportName'][:8]}…  "
            f"changed={i['changedBytes'] // 1024} KiB of {i['size'] // MIB} MiB"
        )
        if i["mode"] == "full":
            say(f"      reason: {i['reason']}")
        else:
            say(f"      since {i['sinceBitmapName']}, context {i['dirtyBitmapContext']}")


async def _start_agent(work: Path) -> tuple[asyncio.subprocess.Process, Api, Path]:
    """`cbt-agent serve` with a fresh config and token in `work`, answering /healthz."""
    token = secrets.token_hex(16)
    port = _free_port()
    config = work / "config.toml"
    config.write_text(
        f'[api]\nlisten = "127.0.0.1:{port}"\ntokens = ["{token}"]\n'
        f'[state]\ndir = "{work / "state"}"\n[libvirt]\nuri = "{URI}"\n'
        f'[qmp]\nsocket_template = "{work}/{{vm_uuid}}.sock"\n'
        f'[nbd]\nlisten = "127.0.0.1"\nport_range = "10501:10999"\n'
    )
    config.chmod(0o600)  # it holds the token: the agent refuses inline tokens others can read
    with (work / "agent.log").open("wb") as log:
        agent = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cbt_agent",
            "serve",
            "--config",
            str(config),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    api = Api(base, token)
    deadline = time.monotonic() + 30
    while True:
        try:
            async with api.session.get(f"{base}/healthz") as r:
                if r.status == 200:
                    break
        except aiohttp.ClientError:
            pass
        if agent.returncode is not None or time.monotonic() > deadline:
            await api.close()
            raise RuntimeError(f"agent did not start; see {work / 'agent.log'}")
        await asyncio.sleep(0.1)
    say(f"    agent pid {agent.pid} on {base}  (log {work / 'agent.log'})")
    return agent, api, config


async def _stop_agent(agent: asyncio.subprocess.Process | None, api: Api | None) -> None:
    if api is not None:
        await api.close()
    if agent is not None:
        if agent.returncode is None:
            agent.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(agent.wait(), 15)
        except TimeoutError:
            agent.kill()
            await agent.wait()


async def _remove(hv: Hypervisor, dom: Any, work: Path, keep: bool) -> None:
    """Stop and undefine the demo's domain, close libvirt, remove (or keep) the work dir."""
    if dom is not None:
        with contextlib.suppress(Exception):
            if await asyncio.to_thread(dom.isActive):
                await asyncio.to_thread(dom.destroy)
            await asyncio.to_thread(dom.undefine)
    await hv.close()
    if keep:
        say(f"(kept {work})")
    else:
        shutil.rmtree(work, ignore_errors=True)


async def run_demo(keep: bool = False) -> int:
    work = Path(tempfile.mkdtemp(prefix="cbt-demo-", dir="/var/tmp"))
    os.chmod(work, 0o700)
    vm_uuid = uuid.uuid4().hex
    disks = [(uuid.uuid4().hex, work / f"disk{i}.qcow2") for i in range(2)]
    sizes = [64 * MIB, 32 * MIB]
    sock = work / f"{vm_uuid}.sock"
    hv = Hypervisor(URI)
    agent: asyncio.subprocess.Process | None = None
    api: Api | None = None
    defined = False
    try:
        step(1, f"A throwaway VM {vm_uuid} (TCG, 2 virtio disks, ZStack's extra QMP socket)")
        for (_vol, path), size in zip(disks, sizes, strict=True):
            await images.create(str(path), size)
        await hv.open()
        conn = await hv.connection()
        await asyncio.to_thread(conn.defineXML, throwaway_domain_xml(vm_uuid, disks, sock))
        defined = True
        dom = await asyncio.to_thread(conn.lookupByName, vm_uuid)
        await asyncio.to_thread(dom.create)
        for vol, path in disks:
            say(f"    disk serial (volumeUuid) {vol}  {path.name}")

        step(2, "Start cbt-agent serve with a fresh config and token")
        agent, api, config = await _start_agent(work)

        step(3, "CreateCbtTask")
        inv = (
            await api.call(
                "POST", "/cbt-task/create", {"params": {"name": "demo", "vmInstanceUuid": vm_uuid}}
            )
        )["inventory"]
        task = inv["uuid"]
        say(f"    task {task} status={inv['status']} created {inv['createDate']}")
        say(
            "    refs: "
            + ", ".join(f"{r['resourceType']}:{r['resourceUuid'][:8]}" for r in inv["resourceRefs"])
        )

        step(4, "The guest writes 1 MiB of 0xAA at 0 on disk 0, then EnableCbtTask (first: full)")
        await _write(hv, vm_uuid, "virtio-disk0", 0xAA, 0, MIB)
        infos = (await api.call("POST", f"/cbt-task/enable/{task}", {"params": {}}))[
            "volumeCbtBackupInfos"
        ]
        _show_infos(infos)
        first = infos[0]["bitmapName"]

        step(5, "The guest overwrites 64 KiB with 0xBB; the export still shows the checkpoint")
        await _write(hv, vm_uuid, "virtio-disk0", 0xBB, 0, 64 * 1024)
        address = nbdio.NbdAddress("127.0.0.1", int(infos[0]["nbdPort"]), None, disks[0][0])
        h = await asyncio.to_thread(nbdio.connect, address)
        data = await asyncio.to_thread(h.pread, 16, 0)
        nbdio.close(h)
        say(f"    NBD read at 0: {data.hex(' ')}  (0xAA: the data as of the checkpoint)")

        step(6, "DisableCbtTask: export, fleecing job and scratch file removed; tracking goes on")
        inv = (await api.call("POST", f"/cbt-task/disable/{task}", {"params": {"force": False}}))[
            "inventory"
        ]
        say(f"    status={inv['status']}")

        writes = [
            (0, 0xC1, 5 * MIB, 64 * 1024),
            (0, 0xC2, 20 * MIB + 4096, 100 * 1024),
            (1, 0xC3, 7 * MIB, 512),
        ]
        step(
            7,
            "The guest writes 3 more times, with a live snapshot of disk 0 in between (as "
            "ZStack takes one), then EnableCbtTask again (incremental)",
        )
        for k, (disk, pattern, off, n) in enumerate(writes):
            if k == 1:
                overlay = work / "disk0-snap1.qcow2"
                await _snapshot_disk0(hv, vm_uuid, overlay)
                say(f"    live snapshot of disk 0: its top image is now {overlay.name}")
            await _write(hv, vm_uuid, f"virtio-disk{disk}", pattern, off, n)
            say(f"    wrote {n:>6} bytes of {pattern:#x} at {off:>9} on disk {disk}")
        infos = (
            await api.call("POST", f"/cbt-task/enable/{task}", {"params": {"bitmapName": first}})
        )["volumeCbtBackupInfos"]
        _show_infos(infos)

        step(8, "The dirty extents over NBD (qemu:dirty-bitmap, libnbd block status)")
        for i in infos:
            a = nbdio.NbdAddress(i["nbdServer"], int(i["nbdPort"]), None, i["exportName"])
            extents = await asyncio.to_thread(nbdio.dirty_extents, a, i["dirtyBitmapContext"])
            dirty = [(e.start, e.length) for e in extents if e.dirty]
            say(
                f"    disk {i['exportName'][:8]}: "
                + ", ".join(f"[{s // 1024} KiB +{n // 1024} KiB]" for s, n in dirty)
            )
        say("    (the 64 KiB write before step 6 is in too: it came after the first checkpoint;")
        say("     so is the write made before the snapshot, kept on the layer below the new top)")

        step(9, "DisableCbtTask, DeleteCbtTask (bitmaps removed from every disk)")
        await api.call("POST", f"/cbt-task/disable/{task}", {"params": {}})
        await api.call("DELETE", f"/cbt-task/{task}?deleteMode=Permissive&force=false")
        say("    deleted")

        step(10, "cbt-agent tasks — straight from the database, as an operator would read it")
        await _run(
            sys.executable, "-m", "cbt_agent", "tasks", "--config", str(config), task, show=True
        )
        say("\n\033[1mDemo complete.\033[0m")
        return 0
    finally:
        await _stop_agent(agent, api)
        dom = None
        if defined:
            conn = await hv.connection()
            with contextlib.suppress(Exception):
                dom = await asyncio.to_thread(conn.lookupByName, vm_uuid)
        await _remove(hv, dom, work, keep)


def _guest_agent(dom: Any, command: str, arguments: dict[str, Any] | None = None) -> Any:
    import libvirt_qemu

    message: dict[str, Any] = {"execute": command}
    if arguments:
        message["arguments"] = arguments
    return json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps(message), 30, 0))["return"]


async def _guest_sh(dom: Any, script: str) -> str:
    """Run a shell command inside the guest through its agent (guest-exec); its output."""
    args = {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True}
    pid = (await asyncio.to_thread(_guest_agent, dom, "guest-exec", args))["pid"]
    while True:
        st = await asyncio.to_thread(_guest_agent, dom, "guest-exec-status", {"pid": pid})
        if st.get("exited"):
            out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
            if st.get("exitcode") != 0:
                raise RuntimeError(f"in the guest: {script!r} exited {st.get('exitcode')}")
            return out
        await asyncio.sleep(0.1)


async def run_guest_demo(image: Path, keep: bool = False) -> int:
    """The cycle on a real guest (scripts/guest-image.sh's Debian in `image`): files written
    through the guest's own filesystem, checkpoints quiesced through its guest agent."""
    import libvirt

    work = Path(tempfile.mkdtemp(prefix="cbt-demo-", dir="/var/tmp"))
    os.chmod(work, 0o700)
    vm_uuid, volume_uuid = uuid.uuid4().hex, uuid.uuid4().hex
    root = work / "root.qcow2"
    hv = Hypervisor(URI)
    agent: asyncio.subprocess.Process | None = None
    api: Api | None = None
    dom: Any = None
    try:
        step(1, f"A Debian guest {vm_uuid} (TCG, direct kernel boot, qemu-guest-agent)")
        await images.create(str(root), None, backing=str(image / "disk.qcow2"))
        await hv.open()
        conn = await hv.connection()
        xml = throwaway_domain_xml(
            vm_uuid,
            [(volume_uuid, root)],
            work / f"{vm_uuid}.sock",
            memory_mib=512,
            kernel=(image / "vmlinuz", image / "initrd.img"),
        )
        dom = await asyncio.to_thread(conn.defineXML, xml)
        await asyncio.to_thread(dom.create)
        began = time.monotonic()
        while True:
            try:
                await asyncio.to_thread(_guest_agent, dom, "guest-ping")
                break
            except libvirt.libvirtError:
                if time.monotonic() - began > 240:
                    raise RuntimeError("the guest agent did not answer within 240 s") from None
                await asyncio.sleep(1)
        say(f"    booted; its guest agent answered after {time.monotonic() - began:.0f} s")

        step(2, "Start cbt-agent serve with a fresh config and token")
        agent, api, config = await _start_agent(work)
        body = {"params": {"name": "demo", "vmInstanceUuid": vm_uuid}}
        task = (await api.call("POST", "/cbt-task/create", body))["inventory"]["uuid"]
        quiesced = {"params": {}, "systemTags": ["quiesce::true"]}
        for n, script in enumerate(
            (
                "mkdir -p /data && dd if=/dev/urandom of=/data/a bs=64k count=16 status=none",
                "echo hello > /data/b && dd if=/dev/urandom of=/data/a bs=4k count=2 seek=3 "
                "conv=notrunc status=none",
            ),
            start=1,
        ):
            step(2 + n, f"The guest writes files, then a quiesced EnableCbtTask: {script}")
            await _guest_sh(dom, script)
            infos = (await api.call("POST", f"/cbt-task/enable/{task}", quiesced))[
                "volumeCbtBackupInfos"
            ]
            _show_infos(infos)
            say(f"    quiesced={infos[0]['quiesced']}")
            await api.call("POST", f"/cbt-task/disable/{task}", {"params": {}})

        step(5, "cbt-agent tasks: each Running transition says how long the guest was frozen")
        await _run(
            sys.executable, "-m", "cbt_agent", "tasks", "--config", str(config), task, show=True
        )
        await api.call("DELETE", f"/cbt-task/{task}?deleteMode=Permissive&force=false")
        say("\n\033[1mDemo complete.\033[0m")
        return 0
    finally:
        await _stop_agent(agent, api)
        await _remove(hv, dom, work, keep)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m testbed.demo", description="a throwaway VM through a full CBT cycle"
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--guest",
        metavar="IMAGE_DIR",
        help="a real guest instead (scripts/guest-image.sh's directory): quiesced checkpoints",
    )
    args = p.parse_args(argv)
    if args.guest:
        return asyncio.run(run_guest_demo(Path(args.guest), keep=args.keep))
    return asyncio.run(run_demo(keep=args.keep))


if __name__ == "__main__":
    sys.exit(main())
