"""Host scale: many VMs Enabled at once through a real `cbt-agent serve`, as ZStack drives it.

100 TCG libvirt VMs (no OS, ZStack's extra QMP socket, 2 sparse qcow2 disks of 1 GiB each),
started **paused** (an idle no-OS TCG guest burns ~1 % of a core in SeaBIOS' boot retries; 100
of them would take half of this 2-core machine from the agent; paused, QEMU still serves QMP,
the block layer, bitmaps and NBD exports: the agent skips its own stop/cont for the cut). One
`cbt-agent serve` process (this checkout's code; config with a token, NBD ports 13200:13399,
`api.max_jobs_per_caller` left at its default, 512: ZStack calls with one token). A task per
VM (CreateCbtTask), then, all VMs at once, each call as ZStack makes it:
POST, HTTP 202 with a job location, the job polled every `--poll` seconds until 200:

- Enable all (the first: full), the wall time until every task is Running; goal < 20 s;
- the agent's RSS under that load (VmRSS sampled every 0.1 s, and VmHWM, from
  /proc/<pid>/status); goal < 120 MB (VmHWM, the peak over the whole run);
- the agent's CPU while idle with every export open, over 10 s (utime+stime from
  /proc/<pid>/stat); goal < 1 % of a core;
- Disable all, the wall time (information);
- then a 64 KiB write per disk and the same incremental (each Enable reads its disks' dirty
  maps over NBD) for 10, 50 and all VMs: how Enable-all grows with the number of VMs; the
  all-VMs incremental Enable has the same 20 s goal.

Everything started here (domains, their disks, the agent) is stopped and removed at the end,
also on failure, on SIGTERM/SIGINT (bench.stats.run_guarded) and on the time budget. The
domains carry the test-VM mark with this process' pid in <description>, so
tests/stack.py reap_orphans() removes them after a SIGKILL.

Run: .venv/bin/python -m bench.bench_scale [--vms 100] [--disks 2] [--growth 10 50] [--poll 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import libvirt

from bench.agentproc import AgentProcess
from bench.stats import run_guarded
from cbt_agent.hypervisor.libvirt import Hypervisor
from testbed.domain import throwaway_domain_xml
from testbed.qemu_io import QEMU_LOG_DIR, qemu_io

URI = "qemu:///system"
GIB = 1 << 30
MB = 1_000_000
DISK_SIZE = 1 * GIB
PORT_RANGE = "13200:13399"  # the other benchmarks use 13000-13199
TOKEN = "bench-scale-token-0123456789"
VM_MARK = "cbt-agent test VM"  # tests/stack.py reaps marked domains whose pid is gone
GOAL_ENABLE_S = 20.0
GOAL_RSS_MB = 120.0
GOAL_IDLE_CPU = 0.01  # of one core
IDLE_WINDOW = 10.0
SETUP_CONCURRENCY = 8  # domain define/start/destroy and qemu-img at once
TIME_BUDGET = 540.0  # seconds for the whole run, setup and cleanup included
CLK_TCK = os.sysconf("SC_CLK_TCK")

T = TypeVar("T")


# ---- the agent process ------------------------------------------------------------------------


def proc_status_kb(pid: int, key: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


class ScaleAgent(AgentProcess):
    """The agent process, its memory read from /proc while it works."""

    peak_rss_kb = 0

    def rss_kb(self) -> int:
        return proc_status_kb(self.pid, "VmRSS")

    def hwm_kb(self) -> int:
        return proc_status_kb(self.pid, "VmHWM")

    @contextlib.asynccontextmanager
    async def rss_sampler(self, period: float = 0.1) -> Any:
        """Samples VmRSS while the block runs; the peak goes to `peak_rss_kb`."""

        async def sample() -> None:
            while True:
                with contextlib.suppress(OSError, RuntimeError):
                    self.peak_rss_kb = max(self.peak_rss_kb, self.rss_kb())
                await asyncio.sleep(period)

        task = asyncio.create_task(sample())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# ---- the ZStack side: async calls polled to their end ------------------------------------------


@dataclass
class Call:
    seconds: float
    status: int
    body: Any


async def call(
    session: aiohttp.ClientSession, base: str, method: str, path: str, body: Any, poll: float
) -> Call:
    """An asynchronous ZStack API call: 202 + location, then the job polled every `poll` s."""
    t0 = time.perf_counter()
    async with session.request(method, f"{base}/zstack/v1{path}", json=body) as r:
        if r.status != 202:
            return Call(time.perf_counter() - t0, r.status, await r.text())
        location = str((await r.json())["location"])
    while True:
        await asyncio.sleep(poll)
        async with session.get(location) as r:
            if r.status != 202:
                return Call(time.perf_counter() - t0, r.status, await r.json())


@dataclass
class Round:
    label: str
    wall: float  # from the first POST to the last job's 200
    calls: list[Call]
    cpu: float  # the agent's CPU seconds over the round

    def line(self) -> str:
        per = [c.seconds for c in self.calls]
        return (
            f"  {self.label:<44} wall {self.wall:7.2f} s   per call median "
            f"{statistics.median(per):6.2f} s, max {max(per):6.2f} s   "
            f"agent CPU {self.cpu:6.2f} s"
        )


async def all_at_once(
    agent: ScaleAgent,
    session: aiohttp.ClientSession,
    label: str,
    requests: Sequence[tuple[str, str, Any]],
    poll: float,
    check: Callable[[Call], str | None],
) -> Round:
    """Every request submitted at once, each polled to its end; raises on any failure."""
    cpu0 = cpu_seconds(agent.pid)
    t0 = time.perf_counter()
    async with agent.rss_sampler():
        calls = await asyncio.gather(
            *(call(session, agent.base, m, p, b, poll) for m, p, b in requests)
        )
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(agent.pid) - cpu0
    problems = [why for c in calls if (why := check(c)) is not None]
    if problems:
        raise RuntimeError(f"{label}: {len(problems)} of {len(calls)} failed, e.g. {problems[0]}")
    return Round(label, wall, list(calls), cpu)


def enabled_as(mode: str, disks: int) -> Callable[[Call], str | None]:
    def check(c: Call) -> str | None:
        if c.status != 200:
            return f"HTTP {c.status}: {c.body}"
        infos = c.body.get("volumeCbtBackupInfos", [])
        modes = [i["mode"] for i in infos]
        if len(infos) != disks or any(m != mode for m in modes):
            return f"expected {disks} x {mode}, got {modes}"
        if mode == "incremental" and any(i["changedBytes"] <= 0 for i in infos):
            return "an incremental Enable without changed bytes"
        return None

    return check


def stopped(c: Call) -> str | None:
    if c.status != 200:
        return f"HTTP {c.status}: {c.body}"
    status = c.body.get("inventory", {}).get("status")
    return None if status == "Stopped" else f"status {status}"


def created(c: Call) -> str | None:
    return None if c.status == 200 else f"HTTP {c.status}: {c.body}"


# ---- the VMs ----------------------------------------------------------------------------------


@dataclass
class ScaleVm:
    vm_uuid: str
    disks: list[tuple[str, Path]]
    socket: Path
    defined: bool = False
    task_uuid: str = ""


@dataclass
class Fleet:
    hv: Hypervisor
    work: Path
    paused: bool
    vms: list[ScaleVm] = field(default_factory=list)

    async def _qemu_img(self, path: Path) -> None:
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", "create", "-q", "-f", "qcow2", str(path), str(DISK_SIZE)
        )
        if await proc.wait() != 0:
            raise RuntimeError(f"qemu-img create {path} failed")

    async def start(self, count: int, disks: int) -> None:
        gate = asyncio.Semaphore(SETUP_CONCURRENCY)
        conn = await self.hv.connection()
        flags = libvirt.VIR_DOMAIN_START_PAUSED if self.paused else 0

        async def one(vm: ScaleVm) -> None:
            async with gate:
                for _vol, path in vm.disks:
                    await self._qemu_img(path)
                xml = throwaway_domain_xml(
                    vm.vm_uuid,
                    vm.disks,
                    vm.socket,
                    description=f"{VM_MARK} (bench_scale) pid={os.getpid()}",
                )
                await asyncio.to_thread(conn.defineXML, xml)
                vm.defined = True
                dom = await asyncio.to_thread(conn.lookupByName, vm.vm_uuid)
                await asyncio.to_thread(dom.createWithFlags, flags)
            deadline = time.monotonic() + 30
            while not await asyncio.to_thread(vm.socket.exists):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"extra QMP socket {vm.socket} did not appear")
                await asyncio.sleep(0.05)

        for _ in range(count):
            vm_uuid = uuid.uuid4().hex
            vm_disks = [
                (uuid.uuid4().hex, self.work / f"{vm_uuid[:12]}-{i}.qcow2") for i in range(disks)
            ]
            self.vms.append(ScaleVm(vm_uuid, vm_disks, self.work / f"{vm_uuid}.sock"))
        await gather_all(one(vm) for vm in self.vms)

    async def write_once(self) -> None:
        """One 64 KiB write on every disk of every VM (through the block layer: HMP qemu-io)."""
        gate = asyncio.Semaphore(SETUP_CONCURRENCY)

        async def one(vm: ScaleVm, index: int) -> None:
            async with gate:
                off = (index * 7 + 3) % (DISK_SIZE >> 16) << 16
                qdev = f"/machine/peripheral/virtio-disk{index}/virtio-backend"
                await qemu_io(self.hv, vm.vm_uuid, qdev, f"write {off} 64k")

        await gather_all(one(vm, i) for vm in self.vms for i in range(len(vm.disks)))

    async def remove(self) -> None:
        """Destroy and undefine every domain defined here (shielded: runs to its end)."""
        gate = asyncio.Semaphore(SETUP_CONCURRENCY)
        conn = await self.hv.connection()

        async def one(vm: ScaleVm) -> None:
            if not vm.defined:
                return
            async with gate:
                with contextlib.suppress(libvirt.libvirtError):
                    dom = await asyncio.to_thread(conn.lookupByName, vm.vm_uuid)
                    if await asyncio.to_thread(dom.isActive):
                        await asyncio.to_thread(dom.destroy)
                    await asyncio.to_thread(dom.undefine)
                vm.defined = False
                with contextlib.suppress(OSError):  # libvirt's log of the domain (qemu-io's too)
                    await asyncio.to_thread((QEMU_LOG_DIR / f"{vm.vm_uuid}.log").unlink)

        await asyncio.gather(*(one(vm) for vm in self.vms), return_exceptions=True)


async def gather_all(aws: Any) -> None:
    """Run every awaitable; the first failure is raised once all have ended (none is left
    running behind the caller's cleanup)."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


async def shielded(aw: Awaitable[T]) -> T:
    """Cleanup that an interruption must not cut short."""
    return await asyncio.shield(aw)


# ---- the run ------------------------------------------------------------------------------------


def verdict(label: str, value: float, goal: float, unit: str) -> bool:
    ok = value < goal
    print(
        f"  GOAL {label}: {value:.2f} {unit}  goal < {goal:g} {unit}  -> {'PASS' if ok else 'FAIL'}"
    )
    return ok


async def idle_cpu(agent: ScaleAgent, window: float) -> float:
    """The agent's CPU over `window` seconds with nobody calling it, as a fraction of a core."""
    c0, t0 = cpu_seconds(agent.pid), time.perf_counter()
    await asyncio.sleep(window)
    return (cpu_seconds(agent.pid) - c0) / (time.perf_counter() - t0)


async def scenario(
    fleet: Fleet, agent: ScaleAgent, session: aiohttp.ClientSession, args: argparse.Namespace
) -> bool:
    vms, poll, disks = fleet.vms, args.poll, args.disks
    results: list[bool] = []

    def enables(subset: Sequence[ScaleVm]) -> list[tuple[str, str, Any]]:
        return [("POST", f"/cbt-task/enable/{v.task_uuid}", {"params": {}}) for v in subset]

    def disables(subset: Sequence[ScaleVm]) -> list[tuple[str, str, Any]]:
        return [("POST", f"/cbt-task/disable/{v.task_uuid}", {"params": {}}) for v in subset]

    print(f"  agent pid {agent.pid}: RSS at start {agent.rss_kb() / 1000:.1f} MB", flush=True)
    create = await all_at_once(
        agent,
        session,
        f"CreateCbtTask x {len(vms)}",
        [
            ("POST", "/cbt-task/create", {"params": {"name": "scale", "vmInstanceUuid": v.vm_uuid}})
            for v in vms
        ],
        poll,
        created,
    )
    for vm, c in zip(vms, create.calls, strict=True):
        vm.task_uuid = str(c.body["inventory"]["uuid"])
    print(create.line(), flush=True)

    n = len(vms)
    first = await all_at_once(
        agent, session, f"Enable x {n} (first: full)", enables(vms), poll, enabled_as("full", disks)
    )
    print(first.line(), flush=True)
    rss_load = agent.peak_rss_kb
    idle_running = await idle_cpu(agent, IDLE_WINDOW)
    print(
        f"  agent idle with {n} tasks Running ({n * disks} exports open), {IDLE_WINDOW:.0f} s: "
        f"{idle_running * 100:.2f} % of a core",
        flush=True,
    )
    off = await all_at_once(agent, session, f"Disable x {n}", disables(vms), poll, stopped)
    print(off.line(), flush=True)

    growth: list[tuple[int, Round, Round]] = []
    sizes = [k for k in args.growth if 0 < k < n] + [n]
    for k in sizes:
        subset = vms[:k]
        t0 = time.perf_counter()
        await fleet.write_once()
        print(f"  (a 64 KiB write on each of {n * disks} disks: {time.perf_counter() - t0:.1f} s)")
        on = await all_at_once(
            agent,
            session,
            f"Enable x {k} (incremental)",
            enables(subset),
            poll,
            enabled_as("incremental", disks),
        )
        print(on.line(), flush=True)
        off_k = await all_at_once(agent, session, f"Disable x {k}", disables(subset), poll, stopped)
        print(off_k.line(), flush=True)
        growth.append((k, on, off_k))
    idle_stopped = await idle_cpu(agent, IDLE_WINDOW)
    hwm = agent.hwm_kb()

    incremental_all = growth[-1][1]
    print(f"\n== {n} VMs x {disks} disks, all at once through the HTTP API (poll {poll} s) ==")
    print(first.line())
    print(incremental_all.line())
    print(off.line())
    print(
        f"  agent RSS: {rss_load / 1000:.1f} MB peak sampled during the first Enable-all, "
        f"{agent.peak_rss_kb / 1000:.1f} MB over every round, VmHWM {hwm / 1000:.1f} MB"
    )
    print(
        f"  agent CPU idle over {IDLE_WINDOW:.0f} s: {idle_running * 100:.2f} % of a core with "
        f"{n} tasks Running, {idle_stopped * 100:.2f} % with all Stopped"
    )
    results.append(verdict(f"Enable all {n} (first, full), wall", first.wall, GOAL_ENABLE_S, "s"))
    results.append(
        verdict(f"Enable all {n} (incremental), wall", incremental_all.wall, GOAL_ENABLE_S, "s")
    )
    results.append(verdict("agent peak RSS (VmHWM)", hwm / 1000, GOAL_RSS_MB, "MB"))
    results.append(
        verdict(
            f"agent CPU idle with {n} Running",
            idle_running * 100,
            GOAL_IDLE_CPU * 100,
            "% of a core",
        )
    )
    print(f"  Disable all {n}: {off.wall:.2f} s (information: no goal)")
    if len(growth) > 1:
        print("  growth of Enable-all (incremental) with the number of VMs:")
        for k, on, off_k in growth:
            print(
                f"    {k:4d} VMs: Enable {on.wall:6.2f} s ({on.wall / k * 1000:6.1f} ms/VM), "
                f"Disable {off_k.wall:6.2f} s; agent CPU {on.cpu:6.2f} s + {off_k.cpu:6.2f} s"
            )
    return all(results)


async def main_async(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="cbtbs-", dir="/tmp"))  # short: unix socket paths
    hv = Hypervisor(URI)
    fleet = Fleet(hv, root, paused=not args.running)
    agent = ScaleAgent(root, TOKEN, PORT_RANGE)
    ok = False
    connector = aiohttp.TCPConnector(limit=0)
    session = aiohttp.ClientSession(
        connector=connector,
        headers={"Authorization": f"OAuth {TOKEN}"},
        timeout=aiohttp.ClientTimeout(total=120),
    )
    try:
        async with asyncio.timeout(TIME_BUDGET):
            await hv.open()
            t0 = time.perf_counter()
            await fleet.start(args.vms, args.disks)
            state = "paused" if fleet.paused else "running"
            print(
                f"  {args.vms} VMs x {args.disks} disks of {DISK_SIZE // GIB} GiB started "
                f"({state}) in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            await agent.start()
            try:
                ok = await scenario(fleet, agent, session, args)
            except Exception:
                print(f"  the agent's log (tail):\n{agent.log_tail()}", flush=True)
                raise
    finally:
        with contextlib.suppress(Exception):
            await shielded(session.close())
        with contextlib.suppress(Exception):
            await shielded(agent.stop())
        t0 = time.perf_counter()
        with contextlib.suppress(Exception):
            await shielded(fleet.remove())
        print(f"  (VMs removed in {time.perf_counter() - t0:.1f} s)", flush=True)
        with contextlib.suppress(Exception):
            await shielded(hv.close())
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nbench_scale: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--vms", type=int, default=100, help="VMs (default 100)")
    parser.add_argument("--disks", type=int, default=2, help="disks per VM (default 2)")
    parser.add_argument(
        "--growth",
        type=int,
        nargs="*",
        default=[10, 50],
        help="also Enable-all (incremental) for these fewer VMs first (default 10 50)",
    )
    parser.add_argument("--poll", type=float, default=0.5, help="api-job poll interval, s")
    parser.add_argument(
        "--running", action="store_true", help="start the VMs running instead of paused"
    )
    args = parser.parse_args()
    run_guarded(__name__, lambda: main_async(args))


if __name__ == "__main__":
    main()
