"""A 1 TiB disk's dirty map through the API: the changed-areas listing and Enable's bitmapBase64.

On the real stack: a TCG libvirt VM (no OS) with one sparse 1 TiB qcow2 disk and ZStack's extra
QMP socket, and the agent as a real `cbt-agent serve` process on loopback (this tree's code),
driven over HTTP. A full checkpoint (Enable + Disable), then 64 KiB clusters dirtied at
scattered places, none touching another, so each is its own dirty extent: 1,000, then 9,000
more, then 90,000 more. After each batch an incremental Enable since the full checkpoint
(`bitmapName`) exports the cumulative 1,000 / 10,000 / 100,000 extents, and, interleaved:

- agent: the whole changed-areas listing through the API: `GET .../changed-areas`, page after
  page following `nextOffset` until it is null (at most 10,000 areas a page), each reply parsed;
- LIMIT: a bare libnbd block-status loop over the same export (bench/baseline.py: connect as
  the agent does over TCP, `block_status` in < 4 GiB requests collecting (offset, length,
  flags) tuples, disconnect).

Allowed at 100,000 extents: agent <= 2.0x the limit (median). Both sides are checked to see
exactly the written clusters as separate runs, and the Enable reply's bitmapBase64 to have
exactly their bits set.

bitmapBase64 (goal < 0.5 s at 100,000 extents): timed in this process on the Enable's live
export with the agent's own code, from the NBD connect to the finished base64 string: the map
read (`nbd.dirty_extents`), the bitmap and changed bytes (`dirtymap.bitmap_from_extents`,
`dirtymap.changed_bytes`) and the encoding (`dirtymap.bitmap_base64`) — what Enable does for
the disk's `bitmapBase64` and `changedBytes`. The whole Enable through the API (POST until the
job's reply is read) is printed for information.

The clusters are dirtied with NBD WRITE_ZEROES through a writable export of the disk's format
node (the domain's device has share-rw, set with libvirt's <qemu:override>), sent through
libvirt's QMP passthrough while no export of the agent is open: 100,000 writes take seconds,
and the recording bitmap's count is checked after each batch.

Run: .venv/bin/python -m bench.bench_dirtymap [--reps 9]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import libvirt
import libvirt_qemu
import nbd

from bench import baseline
from bench.agentproc import AgentProcess
from bench.stats import median_ms, row, run_guarded, verdict
from cbt_agent.dirtymap import bitmap_base64
from cbt_agent.engine.exports import read_changes
from cbt_agent.qemu import nbd as nbdio
from testbed.domain import throwaway_domain_xml

URI = "qemu:///system"
GIB = 1 << 30
DISK_SIZE = 1 << 40  # 1 TiB, sparse
CLUSTER = 64 << 10  # the bitmap's granularity (the qcow2 cluster size)
LEVELS = (1_000, 10_000, 100_000)  # cumulative dirty extents per incremental Enable
LIMIT = 2.0
BITMAP_GOAL = 0.5  # seconds: bitmapBase64 of the 100,000-extent map
AGENT_PORTS = "13000:13099"
TOKEN = "bench-token-0123456789abcdef"
IN_FLIGHT = 64  # zero writes in flight on the writable export
TIME_BUDGET = 115.0  # seconds: the whole run, setup and cleanup included
# tests/stack.py reaps domains with this mark whose creating pid is gone (a killed run)
VM_MARK = "cbt-agent test VM"


# ---- the VM and its disk, reached through libvirt's QMP passthrough ---------------------------


@dataclass
class BenchVm:
    vm_uuid: str
    volume_uuid: str
    disk: Path
    socket: Path
    conn: Any = None
    dom: Any = None

    def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """One QMP command through libvirt (blocking): the extra socket is the agent's."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(self.dom, json.dumps(msg), 0))
        if "error" in reply:
            raise RuntimeError(f"{command}: {reply['error'].get('desc')}")
        return reply["return"]

    def inserted(self) -> dict[str, Any]:
        for b in self.qmp("query-block"):
            if b.get("inserted") and "virtio-disk0" in str(b.get("qdev", "")):
                return dict(b["inserted"])
        raise RuntimeError("the VM's disk is not in query-block")


def start_vm(work: Path) -> BenchVm:
    vm_uuid = uuid.uuid4().hex
    vm = BenchVm(vm_uuid, uuid.uuid4().hex, work / "disk.qcow2", work / f"{vm_uuid}.sock")
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", str(vm.disk), str(DISK_SIZE)]
    if os.spawnvp(os.P_WAIT, cmd[0], cmd) != 0:
        raise RuntimeError("qemu-img create failed")
    xml = throwaway_domain_xml(
        vm.vm_uuid,
        [(vm.volume_uuid, vm.disk)],
        vm.socket,
        description=f"{VM_MARK} pid={os.getpid()} (bench)",
        share_rw=True,
    )
    vm.conn = libvirt.open(URI)
    vm.dom = vm.conn.defineXML(xml)
    vm.dom.create()
    deadline = time.monotonic() + 10
    while not vm.socket.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"extra QMP socket {vm.socket} did not appear")
        time.sleep(0.01)
    return vm


def remove_vm(vm: BenchVm) -> None:
    if vm.dom is not None:
        with contextlib.suppress(libvirt.libvirtError):
            if vm.dom.isActive():
                vm.dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            vm.dom.undefine()
        vm.dom = None
    if vm.conn is not None:
        with contextlib.suppress(libvirt.libvirtError):
            vm.conn.close()
        vm.conn = None


def dirty_clusters(vm: BenchVm, work: Path, offsets: list[int]) -> float:
    """Dirty the 64 KiB clusters at `offsets` through a writable NBD export of the disk's format
    node (NBD WRITE_ZEROES, IN_FLIGHT at once; QEMU's dirty bitmaps record it like any guest
    write), then end the export and its server. Returns the seconds the writes took."""
    node = vm.inserted()["node-name"]
    sock = str(work / "writer.sock")
    vm.qmp("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    try:
        vm.qmp(
            "block-export-add",
            {"type": "nbd", "id": "bench-writer", "node-name": node, "name": "w", "writable": True},
        )
        h = nbd.NBD()
        h.set_export_name("w")
        h.connect_unix(sock)
        t0 = time.perf_counter()
        try:
            i = 0
            while i < len(offsets) or h.aio_in_flight() > 0:
                while i < len(offsets) and h.aio_in_flight() < IN_FLIGHT:
                    h.aio_zero(CLUSTER, offsets[i])
                    i += 1
                h.poll(-1)
                # in flight counts the completed ones until retired: peek never sees none
                while h.aio_in_flight() > 0:
                    cookie = h.aio_peek_command_completed()
                    if cookie == 0:
                        break
                    h.aio_command_completed(cookie)  # raises if the write failed
            h.flush()
            took = time.perf_counter() - t0
        finally:
            nbdio.close(h)
        vm.qmp("block-export-del", {"id": "bench-writer"})
        deadline = time.monotonic() + 10
        while any(e.get("id") == "bench-writer" for e in vm.qmp("query-block-exports")):
            if time.monotonic() > deadline:
                raise RuntimeError("the writer export did not go away")
            time.sleep(0.01)
    finally:
        vm.qmp("nbd-server-stop")
    return took


def bitmap_count(vm: BenchVm, name: str) -> int:
    for b in vm.inserted().get("dirty-bitmaps", []):
        if b.get("name") == name:
            return int(b["count"])
    raise RuntimeError(f"bitmap {name} not on the disk")


# ---- the agent as a real process, driven over HTTP --------------------------------------------


class AgentApi:
    """The agent's ZStack API as a client calls it over HTTP, with the bench's token."""

    def __init__(self, base: str, token: str) -> None:
        self.base = f"{base}/zstack/v1"
        self.session = aiohttp.ClientSession(headers={"Authorization": f"OAuth {token}"})

    async def close(self) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, body: Any) -> Any:
        """An asynchronous API, polled to its end; the reply body (fails unless 200)."""
        async with self.session.request(method, f"{self.base}{path}", json=body) as r:
            if r.status != 202:
                raise RuntimeError(f"{method} {path}: {r.status} {await r.text()}")
            location = (await r.json())["location"]
        while True:
            async with self.session.get(location) as r:
                if r.status == 200:
                    return await r.json()
                if r.status != 202:
                    raise RuntimeError(f"{method} {path}: {r.status} {await r.text()}")
            await asyncio.sleep(0.005)

    async def listing(self, task: str, volume: str) -> tuple[list[tuple[int, int]], int]:
        """The whole changed-areas answer, page by page: (runs, pages)."""
        url = f"{self.base}/cbt-task/{task}/volumes/{volume}/changed-areas"
        runs: list[tuple[int, int]] = []
        offset: int | None = 0
        pages = 0
        while offset is not None:
            async with self.session.get(url, params={"startOffset": str(offset)}) as r:
                if r.status != 200:
                    raise RuntimeError(f"changed-areas at {offset}: {r.status} {await r.text()}")
                page = await r.json()
            runs += [(a["start"], a["length"]) for a in page["changedAreas"]]
            offset = page["nextOffset"]
            pages += 1
        return runs, pages


# ---- measuring --------------------------------------------------------------------------------


@dataclass
class Level:
    extents: int
    checkpoint: str = ""  # the checkpoint this level's Enable cut (now the recording bitmap)
    enable_api: float = 0.0
    bitmap: list[float] = field(default_factory=list)
    bitmap_parts: list[tuple[float, float]] = field(default_factory=list)
    agent: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    pages: int = 0


def raw_runs(tuples: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """The dirty tuples of a raw read, merged into maximal runs."""
    runs: list[tuple[int, int]] = []
    for off, n, flags in tuples:
        if not flags & nbdio.DIRTY:
            continue
        if runs and runs[-1][0] + runs[-1][1] == off:
            runs[-1] = (runs[-1][0], runs[-1][1] + n)
        else:
            runs.append((off, n))
    return runs


def bitmap_for_reply(
    address: nbdio.NbdAddress, context: str, size: int, granularity: int
) -> tuple[str, int, tuple[float, float]]:
    """What Enable does for one disk's bitmapBase64 and changedBytes, with the agent's code
    (`engine.exports.read_changes`, then the reply's `dirtymap.bitmap_base64`): (base64,
    changed bytes, (map read + bitmap + changed bytes, base64) seconds)."""
    t0 = time.perf_counter()
    bits, changed, _ = read_changes(address, context, size, granularity)
    t1 = time.perf_counter()
    text = bitmap_base64(bits)
    t2 = time.perf_counter()
    return text, changed, (t1 - t0, t2 - t1)


def check_bitmap(b64: str, offsets: list[int], what: str) -> None:
    bits = base64.b64decode(b64)
    if len(bits) != DISK_SIZE // CLUSTER // 8:
        raise RuntimeError(f"{what}: bitmap of {len(bits)} bytes")
    want = bytearray(len(bits))
    for off in offsets:
        c = off // CLUSTER
        want[c >> 3] |= 1 << (c & 7)
    if bits != want:
        raise RuntimeError(f"{what}: bitmap differs from the written clusters")


async def measure_level(
    api: AgentApi, task: str, vm: BenchVm, since: str, offsets: list[int], reps: int
) -> Level:
    level = Level(len(offsets))
    want = [(o, CLUSTER) for o in sorted(offsets)]
    t0 = time.perf_counter()
    reply = await api.call("POST", f"/cbt-task/enable/{task}", {"params": {"bitmapName": since}})
    level.enable_api = time.perf_counter() - t0
    (info,) = reply["volumeCbtBackupInfos"]
    level.checkpoint = info["bitmapName"]
    try:
        if info["mode"] != "incremental" or info["changedBytes"] != len(offsets) * CLUSTER:
            raise RuntimeError(
                f"Enable: mode {info['mode']}, changedBytes {info['changedBytes']}, "
                f"want incremental and {len(offsets) * CLUSTER}"
            )
        check_bitmap(info["bitmapBase64"], offsets, "Enable's bitmapBase64")
        context = info["dirtyBitmapContext"]
        export = info["exportName"]
        port = int(info["nbdPort"])
        address = nbdio.NbdAddress(info["nbdServer"], port, None, export)

        # correctness first: both sides see exactly the written clusters, one run each
        listed, level.pages = await api.listing(task, vm.volume_uuid)
        raw = await asyncio.to_thread(baseline.read_extents, context, export, port=port)
        if listed != want or raw_runs(raw) != want:
            raise RuntimeError(
                f"extents differ: API {len(listed)} runs, raw {len(raw_runs(raw))}, "
                f"written {len(want)}"
            )
        text, changed, _ = await asyncio.to_thread(
            bitmap_for_reply, address, context, DISK_SIZE, CLUSTER
        )
        if text != info["bitmapBase64"] or changed != info["changedBytes"]:
            raise RuntimeError("the replayed bitmap differs from the Enable reply's")

        # interleaved, order flipped each round, so background load hits both sides alike
        async def agent_side() -> None:
            t = time.perf_counter()
            await api.listing(task, vm.volume_uuid)
            level.agent.append(time.perf_counter() - t)

        async def raw_side() -> None:
            t = time.perf_counter()
            await asyncio.to_thread(baseline.read_extents, context, export, port=port)
            level.raw.append(time.perf_counter() - t)

        for i in range(reps):
            for side in (agent_side, raw_side) if i % 2 == 0 else (raw_side, agent_side):
                await side()
            t = time.perf_counter()
            _, _, parts = await asyncio.to_thread(
                bitmap_for_reply, address, context, DISK_SIZE, CLUSTER
            )
            level.bitmap.append(time.perf_counter() - t)
            level.bitmap_parts.append(parts)
    finally:
        await api.call("POST", f"/cbt-task/disable/{task}", {"params": {}})
    return level


def report(levels: list[Level]) -> bool:
    ok = True
    for lv in levels:
        print(
            f"\n1 TiB qcow2, {lv.extents:,} dirty 64 KiB extents; listing = {lv.pages} pages "
            f"of <= 10,000 areas; {len(lv.agent)} runs each (interleaved)"
        )
        print(row("agent changed-areas listing via HTTP API", lv.agent))
        print(row("LIMIT raw libnbd block_status -> list", lv.raw))
        if lv.extents == max(LEVELS):
            ok &= verdict(f"agent listing / raw, {lv.extents:,} extents", lv.agent, lv.raw, LIMIT)
        else:
            print(
                f"  ratio agent listing / raw: {median_ms(lv.agent) / median_ms(lv.raw):.2f}x "
                "(information)"
            )
        print(row("bitmapBase64 (map read + bitmap + base64)", lv.bitmap))
        build, b64 = (median_ms([p[i] for p in lv.bitmap_parts]) for i in range(2))
        print(
            f"  of which (medians, ms): NBD map read + bitmap + changedBytes {build:.1f}, "
            f"base64 {b64:.1f}; whole Enable via API {lv.enable_api * 1000:.0f} ms "
            "(1 sample, information)"
        )
        if lv.extents == max(LEVELS):
            took = median_ms(lv.bitmap) / 1000
            good = took < BITMAP_GOAL
            ok &= good
            print(
                f"  BITMAP bitmapBase64 of {lv.extents:,} extents: {took:.3f} s  "
                f"goal < {BITMAP_GOAL:.1f} s -> {'PASS' if good else 'FAIL'}"
            )
    print("\ngrowth (medians, ms):")
    print(f"  {'extents':>8}  {'API listing':>12}  {'raw loop':>10}  {'ratio':>6}  {'bitmap':>8}")
    for lv in levels:
        print(
            f"  {lv.extents:>8,}  {median_ms(lv.agent):>12.1f}  {median_ms(lv.raw):>10.1f}  "
            f"{median_ms(lv.agent) / median_ms(lv.raw):>5.2f}x  {median_ms(lv.bitmap):>8.1f}"
        )
    return ok


async def main_async(reps: int) -> int:
    work = Path(tempfile.mkdtemp(prefix="cbtbd-", dir="/tmp"))  # short: unix socket paths
    vm: BenchVm | None = None
    agent: AgentProcess | None = None
    api: AgentApi | None = None
    levels: list[Level] = []
    try:
        async with asyncio.timeout(TIME_BUDGET):
            t0 = time.monotonic()
            vm = await asyncio.to_thread(start_vm, work)
            # the guest writes nothing while exported: a 1 TiB disk's default budget (25 %)
            # would not fit on this machine's filesystem
            agent = AgentProcess(
                work, TOKEN, AGENT_PORTS, extra={"checkpoints": {"scratch_budget": "1G"}}
            )
            await agent.start()
            api = AgentApi(agent.base, TOKEN)
            created = await api.call(
                "POST",
                "/cbt-task/create",
                {"params": {"name": "bench-dirtymap", "vmInstanceUuid": vm.vm_uuid}},
            )
            task = created["inventory"]["uuid"]
            full = await api.call("POST", f"/cbt-task/enable/{task}", {"params": {}})
            (info,) = full["volumeCbtBackupInfos"]
            if info["mode"] != "full":
                raise RuntimeError(f"first Enable: mode {info['mode']}")
            since = info["bitmapName"]
            await api.call("POST", f"/cbt-task/disable/{task}", {"params": {}})
            print(
                f"bench_dirtymap: VM {vm.vm_uuid[:8]}, agent pid {agent.pid} on port {agent.port}, "
                f"full checkpoint {since}; setup {time.monotonic() - t0:.1f} s",
                flush=True,
            )
            # even clusters only: no two dirty clusters touch, each is its own extent
            order = random.Random(42).sample(range(DISK_SIZE // CLUSTER // 2), max(LEVELS))
            done = 0
            recording = since  # the latest checkpoint's bitmap records the next batch
            for n in LEVELS:
                batch = sorted(c * 2 * CLUSTER for c in order[done:n])
                took = await asyncio.to_thread(dirty_clusters, vm, work, batch)
                count = await asyncio.to_thread(bitmap_count, vm, recording)
                if count != len(batch) * CLUSTER:
                    raise RuntimeError(
                        f"bitmap {recording} counts {count} bytes, want {len(batch) * CLUSTER}"
                    )
                print(
                    f"  dirtied {len(batch):,} more clusters in {took:.1f} s (WRITE_ZEROES, "
                    f"{IN_FLIGHT} in flight); bitmap {recording} counts exactly them",
                    flush=True,
                )
                done = n
                offsets = [c * 2 * CLUSTER for c in order[:n]]
                level = await measure_level(api, task, vm, since, offsets, reps)
                levels.append(level)
                recording = level.checkpoint
            ok = report(levels)
    finally:
        if api is not None:
            await api.close()
        if agent is not None:
            if agent.returncode is not None:
                print(f"agent exited early: {agent.log_tail()}")
            await asyncio.shield(agent.stop(grace=15))
        if vm is not None:
            await asyncio.shield(asyncio.to_thread(remove_vm, vm))
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nbench_dirtymap: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=9, help="runs of each measurement per level")
    args = parser.parse_args()

    run_guarded(__name__, lambda: main_async(args.reps))


if __name__ == "__main__":
    main()
