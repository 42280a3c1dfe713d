"""What a backup costs the guest: write latency, the pause for the cut, the scratch.

On a real TCG libvirt VM (no OS; ZStack's extra QMP socket) whose disks hold data, CbtService
built as the app builds it:

- guest write latency: 64 KiB writes, each to a cluster not written since the checkpoint (so
  each costs a copy into the scratch while exported), through the device's backend (HMP
  `qemu-io`, whose own timing of the request is taken: no monitor overhead). Three cases:
  no export (LIMIT), an export open and idle, an export open while a client reads it all
  (and trims what it read). Allowed: idle export <= 3.0x the LIMIT (median); printed for
  the reading case.
- the pause of a running VM for the cut (the agent's own measure, in the task's history),
  over N Enables of a 2-disk VM: p50 and p99; allowed: p99 < 10 ms.
- the scratch's peak size during a full read of a disk the guest rewrites just behind the
  reader, with and without the client's trim: with trim it must stay under 2 read steps.

Run: .venv/bin/python -m bench.bench_guest [--writes 200] [--cuts 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import shutil
import statistics
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import cbt_agent.qemu.nbd as nbdio
from bench.stats import run_guarded
from cbt_agent.api import replies, validate
from cbt_agent.config import ApiConfig, CheckpointConfig, Config, NbdConfig, Share
from cbt_agent.engine.service import CbtService
from cbt_agent.hypervisor.libvirt import Hypervisor
from cbt_agent.qemu.qmp import QmpRouter
from cbt_agent.store import Store, SyncStore
from testbed.domain import throwaway_domain_xml
from testbed.qemu_io import qemu_io

URI = "qemu:///system"
MIB = 1 << 20
DISK_SIZE = 256 * MIB
CLUSTER = 64 * 1024
STEP = 4 * MIB  # the reader's request size
VM_MARK = "cbt-agent test VM"  # tests/stack.py reaps marked domains of dead processes
OPS = re.compile(r"and ([0-9.]+) ops/sec")
PAUSE = re.compile(r"VM paused ([0-9.]+) ms for the cut")
TIME_BUDGET = 170.0


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


async def run_cmd(*cmd: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {err.decode(errors='replace').strip()}")


class Bench:
    def __init__(self, work: Path, hv: Hypervisor) -> None:
        self.work = work
        self.hv = hv
        self.vm_uuid = uuid.uuid4().hex
        self.volumes = [uuid.uuid4().hex, uuid.uuid4().hex]
        self.defined = False
        config = Config(
            api=ApiConfig(tokens=("bench-token-0123456789",)),
            state_dir=work / "state",
            libvirt_uri=URI,
            qmp_socket_template=str(work / "{vm_uuid}.sock"),
            nbd=NbdConfig(listen="127.0.0.1", port_first=13300, port_last=13399),
            checkpoints=CheckpointConfig(quiesce="never", scratch_budget=Share(fraction=1.0)),
        )
        self.config = config
        self.store = Store(config.db_path)
        self.router = QmpRouter(config.qmp_socket_template, hv)
        self.service = CbtService(config, self.store, hv, self.router)
        self.task = ""
        self.qdev = ["/machine/peripheral/virtio-disk0/virtio-backend"]

    async def start(self) -> None:
        disks = []
        for i, vol in enumerate(self.volumes):
            path = self.work / f"disk{i}.qcow2"
            await run_cmd("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(DISK_SIZE))
            await run_cmd("qemu-io", "-f", "qcow2", "-c", f"write -P 0x11 0 {DISK_SIZE}", str(path))
            disks.append((vol, path))
        xml = throwaway_domain_xml(
            self.vm_uuid,
            disks,
            self.work / f"{self.vm_uuid}.sock",
            description=f"{VM_MARK} (bench) pid={os.getpid()}",
        )
        conn = await self.hv.connection()
        await asyncio.to_thread(conn.defineXML, xml)
        self.defined = True
        dom = await asyncio.to_thread(conn.lookupByName, self.vm_uuid)
        await asyncio.to_thread(dom.create)
        await self.store.open()
        cmd = validate.create_task({"params": {"name": "bench", "vmInstanceUuid": self.vm_uuid}})
        self.task = (await self.service.create(cmd)).task.uuid

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.router.close()
        with contextlib.suppress(Exception):
            await self.store.close()
        if self.defined:
            conn = await self.hv.connection()
            dom = await asyncio.to_thread(conn.lookupByName, self.vm_uuid)
            if await asyncio.to_thread(dom.isActive):
                await asyncio.to_thread(dom.destroy)
            await asyncio.to_thread(dom.undefine)

    async def enable(self) -> list[dict[str, Any]]:
        volumes = await self.service.enable(validate.enable_task(self.task, {}))
        return list(replies.enable_reply(volumes)["volumeCbtBackupInfos"])

    async def disable(self) -> None:
        await self.service.disable(validate.disable_task(self.task, {"params": {"force": True}}))

    async def write_latency(self, offset: int) -> float:
        out = await qemu_io(self.hv, self.vm_uuid, self.qdev[0], f"write -P 0x22 {offset} 64k")
        m = OPS.search(out)
        if m is None:
            raise RuntimeError(f"qemu-io gave no timing: {out!r}")
        return 1.0 / float(m.group(1))


def read_all(info: dict[str, Any], trim: bool, done: threading.Event, peak: list[int]) -> None:
    """Read the export in STEP requests (trimming each when asked), noting the scratch peak."""
    h = nbdio.connect(
        nbdio.NbdAddress(info["nbdServer"], int(info["nbdPort"]), None, info["exportName"])
    )
    try:
        for offset in range(0, DISK_SIZE, STEP):
            h.pread(STEP, offset)
            if trim:
                h.trim(STEP, offset)
            with contextlib.suppress(FileNotFoundError):
                peak[0] = max(peak[0], os.stat(info["target"]).st_blocks * 512)
    finally:
        nbdio.close(h)
        done.set()


async def latencies(b: Bench, n: int, base: int) -> list[float]:
    return [await b.write_latency(base + i * CLUSTER) for i in range(n)]


async def main_async(writes: int, cuts: int) -> int:
    work = Path(tempfile.mkdtemp(prefix="cbtbg-", dir="/tmp"))
    hv = Hypervisor(URI)
    b = Bench(work, hv)
    ok = True
    try:
        async with asyncio.timeout(TIME_BUDGET):
            await hv.open()
            await b.start()
            span = writes * CLUSTER

            none = await latencies(b, writes, 0)
            infos = await b.enable()
            idle = await latencies(b, writes, span)
            # a client reads the whole disk while the guest writes (trimming what it read)
            done, peak = threading.Event(), [0]
            reader = asyncio.create_task(asyncio.to_thread(read_all, infos[0], True, done, peak))
            reading: list[float] = []
            offset = 2 * span
            while not done.is_set() and offset + CLUSTER <= DISK_SIZE:
                reading.append(await b.write_latency(offset))
                offset += CLUSTER
            await reader
            await b.disable()

            print("guest write latency, 64 KiB to a cluster not written since the checkpoint:")
            for label, values in (
                ("no export (LIMIT)", none),
                ("export open, idle", idle),
                ("export open, client reading", reading),
            ):
                print(
                    f"  {label:<30} n={len(values):<4d} p50 {pct(values, 50) * 1000:7.2f} ms"
                    f"   p99 {pct(values, 99) * 1000:7.2f} ms"
                )
            ratio = statistics.median(idle) / statistics.median(none)
            good = ratio <= 3.0
            ok &= good
            verdict = "PASS" if good else "FAIL"
            print(f"  RATIO idle export / none: {ratio:.2f}x  limit <= 3.0x -> {verdict}")
            if reading:
                busy = statistics.median(reading) / statistics.median(none)
                print(f"  (reading / none: {busy:.2f}x)")

            # the scratch during a full read of a disk the guest rewrites behind the reader
            peaks: dict[bool, int] = {}
            for trim in (False, True):
                infos = await b.enable()
                done, peak = threading.Event(), [0]

                reader = asyncio.create_task(
                    asyncio.to_thread(read_all, infos[0], trim, done, peak)
                )
                offset = 0
                while not done.is_set():
                    # the guest rewrites the whole disk, 1 MiB at a time, from the start
                    await qemu_io(b.hv, b.vm_uuid, b.qdev[0], f"write -P 0x33 {offset} 1M")
                    offset = (offset + MIB) % DISK_SIZE
                await reader
                peaks[trim] = peak[0]
                await b.disable()
            print("scratch peak during a full read while the guest rewrites the disk:")
            print(f"  without trim {peaks[False] / MIB:8.1f} MiB")
            print(
                f"  with trim    {peaks[True] / MIB:8.1f} MiB   (one read step: {STEP // MIB} MiB)"
            )
            good = peaks[True] <= 2 * STEP + MIB
            ok &= good
            print(f"  with trim <= 2 read steps + 1 MiB -> {'PASS' if good else 'FAIL'}")

            # the pause for the cut, 2 disks
            pauses: list[float] = []
            for _ in range(cuts):
                await b.enable()
                rows = await b.store.run(SyncStore.history_rows, b.task)
                m = PAUSE.search(str(rows[-1]["reason"]))
                if m is None:
                    raise RuntimeError(f"no pause in {rows[-1]['reason']!r}")
                pauses.append(float(m.group(1)))
                await b.disable()
            p50, p99 = pct(pauses, 50), pct(pauses, 99)
            good = p99 < 10.0
            ok &= good
            print(f"pause of the running VM for the cut (2 disks, n={len(pauses)}):")
            print(f"  p50 {p50:.2f} ms   p99 {p99:.2f} ms   max {max(pauses):.2f} ms")
            print(f"  p99 < 10 ms -> {'PASS' if good else 'FAIL'}")
    finally:
        await b.stop()
        await hv.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nbench_guest: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--writes", type=int, default=200, help="timed writes per case")
    parser.add_argument("--cuts", type=int, default=30, help="Enables timed for the pause")
    args = parser.parse_args()
    run_guarded(__name__, lambda: main_async(args.writes, args.cuts))


if __name__ == "__main__":
    main()
