"""Enable + Disable through CbtService against the same QMP sequence sent raw.

On a real TCG libvirt VM (1 disk, then 4, then 16) with ZStack's extra QMP socket:

- agent: `CbtService.enable` then `CbtService.disable` (built as cbt_agent/api/app.py does:
  Store, Hypervisor, QmpRouter, CbtService), one full cycle then N incremental ones;
- LIMIT: one qemu.qmp QMPClient on the same socket sending only what a minimal hand-written
  client must: per disk `qemu-img create`, `add-fd` of the scratch (so a QEMU that runs as
  another user can use it, as the agent does) + `blockdev-add` of the scratch on its fd set and
  of its copy-before-write filter; `stop`, a `qom-set` of each device's drive, one `transaction`
  (bitmap disable + add), `cont`; per disk `blockdev-add` of the snapshot-access node,
  temporary bitmap add + merge on it; `nbd-server-start`, `block-export-add`; then
  `block-export-del`, `nbd-server-stop` (waiting on BLOCK_EXPORT_DELETED), per disk
  `blockdev-del` of the access node, `qom-set` back, `blockdev-del` of filter and scratch,
  `remove-fd`, unlink. Node names and devices are known up front (no queries).

The socket takes one client at a time, so the two alternate cycle by cycle (order flipped every
cycle): the agent's QmpRouter is closed before the raw client connects and the other way round;
connecting is outside the timing for both. A few qemu-io writes go to every disk before each
cycle (untimed).

The contract makes Enable return each disk's bitmapBase64 and changedBytes, which only an NBD
read of the dirty map gives, so a minimal client pays for it too: the LIMIT is the raw QMP
cycle plus the raw libnbd map reads (bench/baseline.py; all disks at once, in threads).
Allowed: agent cycle <= 1.5x that (median), for every disk count. The QMP-only ratio is printed
for information, and at the end how Enable and Enable+Disable grow per added disk (least-squares
slope of the medians over the disk counts, ms per disk) for the agent and the LIMIT.

Run: .venv/bin/python -m bench.bench_enable [--cycles 20] [--disks 1 4 16]
(variants of more than 4 disks run a quarter of the cycles, at least 5: see cycles_for)
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import random
import shutil
import statistics
import tempfile
import time
import types
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from qemu.qmp import QMPClient

import cbt_agent.qemu.nbd as nbdio
from bench import baseline
from bench.stats import median_ms, row, run_guarded, verdict
from cbt_agent.api import replies, validate
from cbt_agent.config import ApiConfig, Config, NbdConfig
from cbt_agent.engine import checkpoints
from cbt_agent.engine.service import CbtService
from cbt_agent.hypervisor.libvirt import DiskInfo, Hypervisor
from cbt_agent.qemu.qmp import QmpChannel, QmpRouter
from cbt_agent.store import Store
from testbed.domain import throwaway_domain_xml
from testbed.qemu_io import qemu_io

URI = "qemu:///system"
GIB = 1 << 30
DISK_SIZE = 8 * GIB
LIMIT = 1.5
AGENT_PORTS = (13000, 13099)
RAW_PORTS = range(13100, 13200)
WRITES_PER_DISK = 3
TIME_BUDGET = 150.0  # seconds for the whole run, every variant, setup and cleanup
# tests/stack.py reaps domains with this mark whose creating pid is gone (a killed run)
VM_MARK = "cbt-agent test VM"


# ---- instrumentation of the agent (attributes replaced on instances; restored afterwards) -----


@dataclass
class Meter:
    """Where one agent operation spent its time; reset before each operation."""

    qmp: list[str] = field(default_factory=list)  # every command sent
    trips: int = 0  # round trips: a batch sent back to back (execute_many) counts once
    qmp_s: float = 0.0
    store_n: int = 0
    store_s: float = 0.0
    img_s: float = 0.0
    nbd_s: float = 0.0
    libvirt_s: float = 0.0

    def take(self) -> Meter:
        """What was measured since the last take; starts afresh."""
        out = dataclasses.replace(self, qmp=list(self.qmp))
        self.qmp.clear()
        self.qmp_s = self.store_s = self.img_s = self.nbd_s = self.libvirt_s = 0.0
        self.store_n = self.trips = 0
        return out


class Instrument:
    """Wraps the agent's QMP channel, store, libvirt lookups, scratch creation and NBD map
    read with timers. Undo with `restore()`."""

    def __init__(self, router: QmpRouter, store: Store, hv: Hypervisor, meter: Meter) -> None:
        self.meter = meter
        self._undo: list[Callable[[], None]] = []
        m = meter

        orig_channel = router.channel

        async def channel(vm_uuid: str) -> QmpChannel:
            chan = await orig_channel(vm_uuid)
            if "execute" not in vars(chan):  # each new connection is wrapped once
                inner = chan.execute
                inner_fd = chan.execute_with_fd
                inner_many = getattr(chan, "execute_many", None)

                async def execute(
                    command: str, arguments: Mapping[str, object] | None = None
                ) -> Any:
                    t0 = time.perf_counter()
                    try:
                        return await inner(command, arguments)
                    finally:
                        m.qmp_s += time.perf_counter() - t0
                        m.qmp.append(command)
                        m.trips += 1

                async def execute_with_fd(
                    command: str, arguments: Mapping[str, object] | None, fd: int
                ) -> Any:
                    t0 = time.perf_counter()
                    try:
                        return await inner_fd(command, arguments, fd)
                    finally:
                        m.qmp_s += time.perf_counter() - t0
                        m.qmp.append(command)
                        m.trips += 1

                setattr(chan, "execute", execute)  # noqa: B010
                setattr(chan, "execute_with_fd", execute_with_fd)  # noqa: B010
                if inner_many is not None:

                    async def execute_many(
                        commands: Sequence[tuple[str, Mapping[str, object] | None]],
                    ) -> Any:
                        t0 = time.perf_counter()
                        try:
                            return await inner_many(commands)
                        finally:
                            m.qmp_s += time.perf_counter() - t0
                            m.qmp.extend(c for c, _a in commands)
                            m.trips += 1

                    setattr(chan, "execute_many", execute_many)  # noqa: B010
            return chan

        self._patch(router, "channel", channel)

        orig_run = store.run

        async def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await orig_run(fn, *args, **kwargs)
            finally:
                m.store_s += time.perf_counter() - t0
                m.store_n += 1

        self._patch(store, "run", run)

        orig_find = hv.find_vm

        async def find_vm(vm_uuid: str) -> Any:
            t0 = time.perf_counter()
            try:
                return await orig_find(vm_uuid)
            finally:
                m.libvirt_s += time.perf_counter() - t0

        self._patch(hv, "find_vm", find_vm)

        # a module function other engineers may rename: timed when present, else shown as 0
        orig_scratch = getattr(checkpoints, "create_scratch", None)
        if orig_scratch is not None:

            async def create_scratch(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return await orig_scratch(*args, **kwargs)
                finally:
                    m.img_s += time.perf_counter() - t0

            self._patch(checkpoints, "create_scratch", create_scratch)

        orig_read = nbdio.read_dirty_map  # Enable's map read (engine.exports.read_changes)

        def read_dirty_map(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return orig_read(*args, **kwargs)
            finally:
                m.nbd_s += time.perf_counter() - t0

        self._patch(nbdio, "read_dirty_map", read_dirty_map)

    def _patch(self, obj: Any, name: str, value: Any) -> None:
        if isinstance(obj, types.ModuleType):
            old = getattr(obj, name)
            self._undo.append(lambda: setattr(obj, name, old))
        else:  # an instance attribute shadows the method; deleting it brings the method back
            self._undo.append(lambda: delattr(obj, name))
        setattr(obj, name, value)

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


# ---- the raw client -----------------------------------------------------------------------


@dataclass(frozen=True)
class RawDisk:
    index: int
    volume_uuid: str
    node: str  # the disk's format node, learned once before timing
    size: int
    qdev: str  # its guest device (whose drive the filter takes)


class RawCheckpointer:
    """The minimal hand-written client: the DESIGN.md command sequence, nothing else."""

    def __init__(self, socket_path: str, disks: list[RawDisk], work: Path) -> None:
        self.socket_path = socket_path
        self.disks = disks
        self.work = work
        self.client: QMPClient | None = None
        self.seq = 0
        self.latest: str | None = None  # the recording checkpoint bitmap
        self.frozen: str | None = None
        self.port: int | None = None
        self.calls: list[str] = []
        self.fdsets: dict[int, int] = {}  # disk index -> the fd set of its scratch file

    async def connect(self) -> None:
        self.client = QMPClient("bench-raw")
        await self.client.connect(self.socket_path)

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.disconnect()
            self.client = None

    async def x(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        assert self.client is not None
        self.calls.append(command)
        return await self.client.execute(command, arguments)

    def scratch(self, d: RawDisk) -> Path:
        return self.work / f"raw-scratch-{d.index}.qcow2"

    async def enable(self) -> bool:
        """Cut a checkpoint and export every disk; True when incremental."""
        self.seq += 1
        new = f"rawcp-{self.seq}"
        tmp = f"rawtmp-{self.seq}"
        prev = self.latest
        for d in self.disks:
            proc = await asyncio.create_subprocess_exec(
                "qemu-img", "create", "-q", "-f", "qcow2", str(self.scratch(d)), str(d.size)
            )
            if await proc.wait() != 0:
                raise RuntimeError("qemu-img create failed")
            assert self.client is not None
            fd = os.open(self.scratch(d), os.O_RDWR | os.O_CLOEXEC)
            try:
                self.client.send_fd_scm(fd)
                added = await self.x("add-fd", {"opaque": f"raw-{d.index}"})
            finally:
                os.close(fd)
            self.fdsets[d.index] = int(added["fdset-id"])
            await self.x(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": f"rawsc-{d.index}",
                    "discard": "unmap",
                    "file": {"driver": "file", "filename": f"/dev/fdset/{added['fdset-id']}"},
                },
            )
            await self.x(
                "blockdev-add",
                {
                    "driver": "copy-before-write",
                    "node-name": f"rawcw-{d.index}",
                    "file": d.node,
                    "target": f"rawsc-{d.index}",
                    "on-cbw-error": "break-snapshot",
                    "cbw-timeout": 10,
                },
            )
        actions: list[dict[str, Any]] = []
        for d in self.disks:
            if prev:
                actions.append(
                    {"type": "block-dirty-bitmap-disable", "data": {"node": d.node, "name": prev}}
                )
            actions.append(
                {
                    "type": "block-dirty-bitmap-add",
                    "data": {"node": d.node, "name": new, "persistent": True},
                }
            )
        # one point in time for every disk: the VM paused around the swaps and the bitmaps
        await self.x("stop")
        for d in self.disks:
            await self.x(
                "qom-set", {"path": d.qdev, "property": "drive", "value": f"rawcw-{d.index}"}
            )
        await self.x("transaction", {"actions": actions})
        await self.x("cont")
        self.latest, self.frozen = new, prev
        for d in self.disks:
            await self.x(
                "blockdev-add",
                {
                    "driver": "snapshot-access",
                    "node-name": f"rawac-{d.index}",
                    "file": f"rawcw-{d.index}",
                },
            )
        if prev:
            for d in self.disks:
                await self.x(
                    "block-dirty-bitmap-add",
                    {
                        "node": f"rawac-{d.index}",
                        "name": tmp,
                        "disabled": True,
                        "persistent": False,
                    },
                )
                await self.x(
                    "block-dirty-bitmap-merge",
                    {
                        "node": f"rawac-{d.index}",
                        "target": tmp,
                        "bitmaps": [{"node": d.node, "name": prev}],
                    },
                )
        for port in RAW_PORTS:
            try:
                await self.x(
                    "nbd-server-start",
                    {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}},
                )
                self.port = port
                break
            except Exception as e:
                if "in use" not in str(e).lower():
                    raise
        else:
            raise RuntimeError("no free port for the raw NBD server")
        for d in self.disks:
            args: dict[str, Any] = {
                "type": "nbd",
                "id": f"rawexp-{self.seq}-{d.index}",
                "node-name": f"rawac-{d.index}",
                "name": d.volume_uuid,
                "writable": False,
            }
            if prev:
                args["bitmaps"] = [{"node": f"rawac-{d.index}", "name": tmp}]
            await self.x("block-export-add", args)
        return prev is not None

    def read_maps(self) -> int:
        """The raw libnbd dirty-map read of every disk, all at once (blocking); returns the
        number of dirty extents."""
        assert self.port is not None
        port = self.port

        def one(d: Any) -> int:
            ext = baseline.read_extents(
                f"qemu:dirty-bitmap:rawtmp-{self.seq}", d.volume_uuid, port=port
            )
            return sum(1 for _o, _n, f in ext if f & 1)

        with concurrent.futures.ThreadPoolExecutor(len(self.disks)) as pool:
            return sum(pool.map(one, self.disks))

    async def disable(self) -> None:
        assert self.client is not None
        exports = {f"rawexp-{self.seq}-{d.index}" for d in self.disks}
        with self.client.listener(("BLOCK_EXPORT_DELETED",)) as events:
            for e in sorted(exports):
                await self.x("block-export-del", {"id": e})
            await self.x("nbd-server-stop")
            pending = set(exports)
            while pending:
                ev = await asyncio.wait_for(events.get(), 30)
                data = cast(dict[str, Any], ev.get("data") or {})
                pending.discard(str(data.get("id", "")))
        for d in self.disks:
            await self.x("blockdev-del", {"node-name": f"rawac-{d.index}"})
            await self.x("qom-set", {"path": d.qdev, "property": "drive", "value": d.node})
            await self.x("blockdev-del", {"node-name": f"rawcw-{d.index}"})
            await self.x("blockdev-del", {"node-name": f"rawsc-{d.index}"})
            await self.x("remove-fd", {"fdset-id": self.fdsets.pop(d.index)})
            self.scratch(d).unlink()

    async def drop_frozen(self) -> None:
        """Untimed housekeeping: the raw client keeps only its recording bitmap."""
        if self.frozen:
            for d in self.disks:
                await self.x("block-dirty-bitmap-remove", {"node": d.node, "name": self.frozen})
            self.frozen = None


# ---- the VM -------------------------------------------------------------------------------


@dataclass
class BenchVm:
    vm_uuid: str
    socket: Path
    disks: list[tuple[str, Path]]
    defined: bool = False


async def run_cmd(*cmd: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {err.decode(errors='replace').strip()}")


async def start_vm(hv: Hypervisor, work: Path, n_disks: int) -> BenchVm:
    vm = BenchVm(uuid.uuid4().hex, Path(), [])
    vm.socket = work / f"{vm.vm_uuid}.sock"
    for i in range(n_disks):
        path = work / f"disk{i}.qcow2"
        await run_cmd("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(DISK_SIZE))
        vm.disks.append((uuid.uuid4().hex, path))
    xml = throwaway_domain_xml(
        vm.vm_uuid, vm.disks, vm.socket, description=f"{VM_MARK} (bench) pid={os.getpid()}"
    )
    conn = await hv.connection()
    try:
        await asyncio.to_thread(conn.defineXML, xml)
        vm.defined = True
        dom = await asyncio.to_thread(conn.lookupByName, vm.vm_uuid)
        await asyncio.to_thread(dom.create)
        deadline = time.monotonic() + 10
        while not await asyncio.to_thread(vm.socket.exists):
            if time.monotonic() > deadline:
                raise RuntimeError(f"extra QMP socket {vm.socket} did not appear")
            await asyncio.sleep(0.01)
    except BaseException:
        # interrupted or failed half-way: the caller never gets the VM, so undo it here
        await asyncio.shield(remove_vm(hv, vm))
        raise
    return vm


async def remove_vm(hv: Hypervisor, vm: BenchVm) -> None:
    if not vm.defined:
        return
    conn = await hv.connection()
    dom = await asyncio.to_thread(conn.lookupByName, vm.vm_uuid)
    if await asyncio.to_thread(dom.isActive):
        await asyncio.to_thread(dom.destroy)
    await asyncio.to_thread(dom.undefine)
    vm.defined = False


async def write_some(
    hv: Hypervisor, vm_uuid: str, disks: list[DiskInfo], rng: random.Random
) -> int:
    """A few scattered 64 KiB writes on every disk through the block layer; bytes written."""
    total = 0
    for d in disks:
        for _ in range(WRITES_PER_DISK):
            off = rng.randrange(DISK_SIZE >> 16) << 16
            await qemu_io(hv, vm_uuid, d.qdev, f"write -P 0x{rng.randrange(1, 255):02x} {off} 64k")
            total += 65536
    return total


# ---- one variant ----------------------------------------------------------------------------


@dataclass
class Series:
    enable: list[float] = field(default_factory=list)
    disable: list[float] = field(default_factory=list)
    cycle: list[float] = field(default_factory=list)
    enable_qmp: list[int] = field(default_factory=list)
    disable_qmp: list[int] = field(default_factory=list)
    last_enable_cmds: list[str] = field(default_factory=list)
    last_disable_cmds: list[str] = field(default_factory=list)
    map_read: list[float] = field(default_factory=list)
    meters: list[Meter] = field(default_factory=list)
    disable_meters: list[Meter] = field(default_factory=list)
    full: tuple[float, float, int, int] = (0.0, 0.0, 0, 0)


async def timed(op: Awaitable[Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = await op
    return time.perf_counter() - t0, out


@dataclass(frozen=True)
class Outcome:
    """One variant's verdict and medians (seconds), for the growth per disk."""

    ok: bool
    n_disks: int
    agent_enable: float
    agent_cycle: float
    limit_enable: float  # raw Enable + its map reads
    limit_cycle: float  # raw Enable+Disable + its map reads


def cycles_for(n_disks: int, cycles: int) -> int:
    """Incremental cycles for a variant: all of them up to 4 disks, a quarter (at least 5)
    beyond, so 16 disks stay within the time budget (each cycle writes to every disk)."""
    return cycles if n_disks <= 4 else max(5, cycles // 4)


async def variant(hv: Hypervisor, root: Path, n_disks: int, cycles: int) -> Outcome:
    work = root / f"v{n_disks}"
    work.mkdir()
    vm = await start_vm(hv, work, n_disks)
    config = Config(
        api=ApiConfig(tokens=("bench-token-0123456789",)),
        state_dir=work / "state",
        libvirt_uri=URI,
        qmp_socket_template=f"{work}/{{vm_uuid}}.sock",
        nbd=NbdConfig("127.0.0.1", *AGENT_PORTS),
    )
    store = Store(config.db_path)
    router = QmpRouter(config.qmp_socket_template, hv)
    meter = Meter()
    instrument: Instrument | None = None
    raw: RawCheckpointer | None = None
    try:
        await store.open()
        service = CbtService(config, store, hv, router)
        instrument = Instrument(router, store, hv, meter)
        info = await hv.find_vm(vm.vm_uuid)
        assert info is not None
        disks = list(info.disks)
        await asyncio.sleep(1.0)  # let SeaBIOS finish burning CPU before measuring

        # the raw client learns node names and sizes once, outside any timing
        raw = RawCheckpointer(str(vm.socket), [], work)
        await raw.connect()
        blocks = await raw.x("query-block")
        for d in disks:
            entry = next(b for b in blocks if b.get("qdev") == d.qdev)
            ins = entry["inserted"]
            raw.disks.append(
                RawDisk(
                    d.device_id,
                    d.volume_uuid,
                    ins["node-name"],
                    ins["image"]["virtual-size"],
                    str(entry["qdev"]),
                )
            )
        await raw.close()
        raw.calls.clear()

        created = await service.create(
            validate.create_task({"params": {"name": "bench", "vmInstanceUuid": vm.vm_uuid}})
        )
        task_uuid = created.task.uuid
        enable_cmd = validate.enable_task(task_uuid, {"params": {}})
        disable_cmd = validate.disable_task(task_uuid, {"params": {}})
        rng = random.Random(n_disks)
        agent, rawS = Series(), Series()

        async def agent_cycle(i: int) -> None:
            await write_some(hv, vm.vm_uuid, disks, rng)
            await router.channel(vm.vm_uuid)  # the agent holds its connection: not timed
            meter.take()
            t_en, result = await timed(service.enable(enable_cmd))
            en = meter.take()
            t_dis, _ = await timed(service.disable(disable_cmd))
            dis = meter.take()
            await router.close()
            infos = replies.enable_reply(result)["volumeCbtBackupInfos"]
            want = "full" if i == 0 else "incremental"
            if any(x["mode"] != want for x in infos) or (
                i > 0 and any(x["changedBytes"] <= 0 for x in infos)
            ):
                raise RuntimeError(f"agent cycle {i}: unexpected {[x['mode'] for x in infos]}")
            if i == 0:
                agent.full = (t_en, t_dis, en.trips, dis.trips)
                return
            agent.enable.append(t_en)
            agent.disable.append(t_dis)
            agent.cycle.append(t_en + t_dis)
            agent.enable_qmp.append(en.trips)
            agent.disable_qmp.append(dis.trips)
            agent.last_enable_cmds, agent.last_disable_cmds = en.qmp, dis.qmp
            agent.meters.append(en)
            agent.disable_meters.append(dis)

        async def raw_cycle(i: int) -> None:
            assert raw is not None
            await write_some(hv, vm.vm_uuid, disks, rng)
            await raw.connect()
            raw.calls.clear()
            t_en, incremental = await timed(raw.enable())
            en_calls = list(raw.calls)
            t_map, dirty = 0.0, 0
            if incremental:
                t_map, dirty = await timed(asyncio.to_thread(raw.read_maps))
                if dirty <= 0:
                    raise RuntimeError(f"raw cycle {i}: no dirty extents")
            raw.calls.clear()
            t_dis, _ = await timed(raw.disable())
            dis_calls = list(raw.calls)
            await raw.drop_frozen()
            await raw.close()
            if i == 0:
                rawS.full = (t_en, t_dis, len(en_calls), len(dis_calls))
                return
            rawS.enable.append(t_en)
            rawS.disable.append(t_dis)
            rawS.cycle.append(t_en + t_dis)
            rawS.enable_qmp.append(len(en_calls))
            rawS.disable_qmp.append(len(dis_calls))
            rawS.last_enable_cmds, rawS.last_disable_cmds = en_calls, dis_calls
            rawS.map_read.append(t_map)

        for i in range(cycles + 1):
            order = (agent_cycle, raw_cycle) if i % 2 == 0 else (raw_cycle, agent_cycle)
            for fn in order:
                await fn(i)

        await router.channel(vm.vm_uuid)
        await service.delete(validate.delete_task(task_uuid, False, None))
        await router.close()
        return report(n_disks, cycles, agent, rawS)
    finally:
        if instrument is not None:
            instrument.restore()
        with contextlib.suppress(Exception):
            await router.close()
        if raw is not None:
            await raw.close()
        with contextlib.suppress(Exception):
            await store.close()
        with contextlib.suppress(Exception):
            await remove_vm(hv, vm)


def report(n_disks: int, cycles: int, agent: Series, raw: Series) -> Outcome:
    print(
        f"\n== {n_disks} disks of {DISK_SIZE // GIB} GiB, TCG VM; full cycle then {cycles} "
        "incremental cycles, agent and raw alternating =="
    )
    print(
        f"  full cycle (1 sample): agent enable {agent.full[0] * 1000:.1f} ms + disable "
        f"{agent.full[1] * 1000:.1f} ms ({agent.full[2]}+{agent.full[3]} QMP); raw enable "
        f"{raw.full[0] * 1000:.1f} ms + disable {raw.full[1] * 1000:.1f} ms "
        f"({raw.full[2]}+{raw.full[3]} QMP)"
    )
    print(row("agent Enable (incremental)", agent.enable))
    print(row("LIMIT raw Enable (QMP + qemu-img create)", raw.enable))
    print(row("agent Disable", agent.disable))
    print(row("LIMIT raw Disable (QMP, event waits)", raw.disable))
    print(row("agent Enable+Disable", agent.cycle))
    print(row("LIMIT raw Enable+Disable", raw.cycle))
    with_map = [c + m for c, m in zip(raw.cycle, raw.map_read, strict=True)]
    print(row("LIMIT raw Enable+Disable + raw libnbd map reads", with_map))
    ok = verdict(
        f"agent/raw (QMP + dirty-map reads) Enable+Disable, {n_disks} disks",
        agent.cycle,
        with_map,
        LIMIT,
    )
    print(
        f"  ratio agent / raw QMP only: {median_ms(agent.cycle) / median_ms(raw.cycle):.2f}x; "
        f"Enable {median_ms(agent.enable) / median_ms(raw.enable):.2f}x, "
        f"Disable {median_ms(agent.disable) / median_ms(raw.disable):.2f}x (information)"
    )
    print(
        f"  QMP round trips per incremental Enable: agent {statistics.median(agent.enable_qmp):.0f}"
        f" (min {min(agent.enable_qmp)}, max {max(agent.enable_qmp)}), "
        f"raw {statistics.median(raw.enable_qmp):.0f}; commands (last) agent "
        f"{len(agent.last_enable_cmds)}, raw {len(raw.last_enable_cmds)} "
        "(agent: a batch sent back to back is one round trip)"
    )
    print(
        f"  QMP round trips per Disable: agent {statistics.median(agent.disable_qmp):.0f} "
        f"(min {min(agent.disable_qmp)}, max {max(agent.disable_qmp)}), "
        f"raw {statistics.median(raw.disable_qmp):.0f}; commands (last) agent "
        f"{len(agent.last_disable_cmds)}, raw {len(raw.last_disable_cmds)}"
    )
    print(f"  agent Enable commands (last): {dict(Counter(agent.last_enable_cmds))}")
    print(f"  raw   Enable commands:        {dict(Counter(raw.last_enable_cmds))}")
    print(f"  agent Disable commands (last): {dict(Counter(agent.last_disable_cmds))}")
    print(f"  raw   Disable commands:        {dict(Counter(raw.last_disable_cmds))}")
    ms = agent.meters
    parts = {
        "QMP round trips": [m.qmp_s for m in ms],
        "scratch creation (summed over disks, run at once)": [m.img_s for m in ms],
        "NBD dirty-map reads (summed over disks, run at once)": [m.nbd_s for m in ms],
        "SQLite (store.run)": [m.store_s for m in ms],
        "libvirt find_vm": [m.libvirt_s for m in ms],
    }
    text = ", ".join(f"{k} {median_ms(v):.1f}" for k, v in parts.items())
    print(
        f"  agent Enable breakdown (medians, ms): {text}; "
        f"store calls {statistics.median(m.store_n for m in ms):.0f}"
    )
    dm = agent.disable_meters
    d_qmp = [m.qmp_s for m in dm]
    d_store = [m.store_s for m in dm]
    d_lv = [m.libvirt_s for m in dm]
    d_rest = [
        t - (m.qmp_s + m.store_s + m.libvirt_s) for t, m in zip(agent.disable, dm, strict=True)
    ]
    print(
        f"  agent Disable breakdown (medians, ms): QMP round trips {median_ms(d_qmp):.1f}, "
        f"SQLite {median_ms(d_store):.1f}, libvirt find_vm {median_ms(d_lv):.1f}, "
        f"rest (poll sleeps, loop) {median_ms(d_rest):.1f}"
    )
    print(f"  raw map read alone (libnbd, all disks): {median_ms(raw.map_read):.1f} ms median")
    return Outcome(
        ok,
        n_disks,
        statistics.median(agent.enable),
        statistics.median(agent.cycle),
        statistics.median(e + m for e, m in zip(raw.enable, raw.map_read, strict=True)),
        statistics.median(with_map),
    )


def slope_ms(xs: list[int], ys: list[float]) -> float:
    """Least-squares slope of ys (seconds) over xs, in ms per unit of x."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den * 1000.0


def report_growth(outcomes: list[Outcome]) -> None:
    """How Enable and Enable+Disable grow with the number of disks (information)."""
    if len({o.n_disks for o in outcomes}) < 2:
        return
    xs = [o.n_disks for o in outcomes]
    print(f"\n== growth per added disk ({', '.join(map(str, xs))} disks; least-squares slope) ==")
    for label, agent, limit in (
        ("Enable", [o.agent_enable for o in outcomes], [o.limit_enable for o in outcomes]),
        ("Enable+Disable", [o.agent_cycle for o in outcomes], [o.limit_cycle for o in outcomes]),
    ):
        medians = " / ".join(f"{a * 1000:.0f}" for a in agent)
        limits = " / ".join(f"{x * 1000:.0f}" for x in limit)
        print(
            f"  {label:<15} agent {slope_ms(xs, agent):6.1f} ms/disk (medians {medians} ms), "
            f"LIMIT {slope_ms(xs, limit):6.1f} ms/disk ({limits} ms)"
        )


async def main_async(cycles: int, disk_counts: list[int]) -> int:
    root = Path(tempfile.mkdtemp(prefix="cbtbe-", dir="/tmp"))  # short: unix socket paths
    hv = Hypervisor(URI)
    results: list[Outcome] = []
    try:
        async with asyncio.timeout(TIME_BUDGET):
            await hv.open()
            for n in disk_counts:
                t0 = time.monotonic()
                results.append(await variant(hv, root, n, cycles_for(n, cycles)))
                print(f"  ({n}-disk variant took {time.monotonic() - t0:.1f} s)", flush=True)
    finally:
        await hv.close()
        shutil.rmtree(root, ignore_errors=True)
    report_growth(results)
    ok = all(o.ok for o in results)
    print(f"\nbench_enable: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--cycles",
        type=int,
        default=20,
        help="incremental cycles per variant of up to 4 disks (a quarter, at least 5, beyond)",
    )
    parser.add_argument(
        "--disks", type=int, nargs="+", default=[1, 4, 16], help="disk counts, one variant each"
    )
    args = parser.parse_args()

    run_guarded(__name__, lambda: main_async(args.cycles, args.disks))


if __name__ == "__main__":
    main()
