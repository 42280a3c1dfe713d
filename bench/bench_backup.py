"""The whole path a user waits for: `cbt-agent backup` / `restore` / `verify` as processes,
against the limit measured in the same run and against virtnbdbackup 2.47 beside it.

Two identical TCG libvirt VMs (no OS), one disk each: a copy of the same 20 GiB qcow2 with
2 GiB of data (64 runs of 32 MiB spread over the disk). The agent's VM has ZStack's extra QMP
socket and is backed up by a real `cbt-agent serve` (loopback) and `cbt-agent backup`; the
peer's VM by `virtnbdbackup` (libvirt's backup API, unix socket). The same guest writes go to
both (HMP qemu-io, untimed). Every figure is a process from start to exit (wall clock, and its
peak RSS from wait4), medians over --runs:

- full: `cbt-agent backup` into a new directory | `virtnbdbackup -l full` | LIMIT: Enable
  (in this process) + `qemu-img create` + `qemu-nbd` + `nbdcopy --flush` from the same
  export into that qcow2 + Disable. Allowed: agent <= 1.0x the limit.
- incremental, 3,200 scattered 64 KiB writes (200 MiB) since the previous backup: `cbt-agent
  backup` | `virtnbdbackup -l inc` | LIMIT: Enable + one NBD connect + the dirty clusters read
  16 in flight into a raw file + fsync + Disable, in this process (no interpreter start).
  Allowed: agent <= 1.3x the limit, and >= 2.8x faster than the peer.
- incremental, nothing changed: the same three. Allowed: agent <= 1.2x the limit.
- restore of full + 3 incrementals: `cbt-agent restore` | `virtnbdrestore` | LIMIT: `qemu-img
  convert -O qcow2` of the agent's chain, each from a cold page cache (the client keeps its
  backup files out of the cache, and whoever read the chain first would warm it for the next).
  Allowed: agent <= 1.0x the limit, >= 2x faster than the peer.
- verify of that directory: `cbt-agent verify` | LIMIT: reading every file once, 4 MiB reads,
  both from a cold page cache. Allowed: <= 1.0x.

Every agent incremental is checked: the manifest records exactly the bytes written (or 0).
Fairness: each timed step starts after a `sync` (untimed), so no one pays for the dirty pages
of the step before; the party that goes first moves each round. verify and its limit start
with the page cache dropped (a backup store is read from disk; with the files cached, hashing
is verify's cost and is printed for information).

Run: .venv/bin/python -m bench.bench_backup [--peer PATH] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import libvirt_qemu
import nbd

import cbt_agent.qemu.nbd as nbdio
from bench.agentproc import AgentProcess
from bench.peer import DEFAULT_PEERS, Peer, ensure_peer
from bench.stats import run_guarded
from cbt_agent.client import extents
from cbt_agent.client.api import CbtApi, VolumeBackupInfo
from cbt_agent.client.restore import CONVERT_FLAGS
from cbt_agent.hypervisor.libvirt import Hypervisor
from testbed.domain import throwaway_domain_xml

URI = "qemu:///system"
GIB = 1 << 30
MIB = 1 << 20
CLUSTER = 64 << 10
TOKEN = "bench-backup-token-0123456789"
VM_MARK = "cbt-agent test VM"  # tests/stack.py reaps these when their pid is gone
PORTS = "13400:13499"
IN_FLIGHT = 16
TIME_BUDGET = 900.0


@dataclass
class Proc:
    seconds: float
    rss_mib: float
    out: str


def run_proc(cmd: Sequence[str], env: dict[str, str] | None = None) -> Proc:
    """Run a command to its exit: wall time from spawn to exit and its peak RSS (wait4)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )
    assert p.stdout is not None
    out = p.stdout.read()
    _pid, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({p.returncode}):\n{out}")
    return Proc(seconds, usage.ru_maxrss / 1024, out)


@dataclass
class Vm:
    name: str
    image: Path
    qmp: Path | None
    qdev: str = ""
    defined: bool = False


@dataclass
class Series:
    seconds: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)

    def add(self, p: Proc | float) -> None:
        if isinstance(p, Proc):
            self.seconds.append(p.seconds)
            self.rss.append(p.rss_mib)
        else:
            self.seconds.append(p)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


class Bench:
    def __init__(self, root: Path, peer: Peer, data_gib: int, disk_gib: int) -> None:
        self.root = root
        self.peer = peer
        self.data_gib = data_gib
        self.disk_size = disk_gib * GIB
        self.hv = Hypervisor(URI)
        name = uuid.uuid4().hex
        self.agent_vm = Vm(name, root / "agent.qcow2", root / f"{name}-qmp.sock")
        self.peer_vm = Vm(uuid.uuid4().hex, root / "peer.qcow2", None)
        self.volume = uuid.uuid4().hex
        self.agent = AgentProcess(
            root,
            TOKEN,
            PORTS,
            qmp_socket="{vm_uuid}-qmp.sock",
            extra={"checkpoints": {"quiesce": "never"}},
        )
        self.env = {**os.environ, "CBT_AGENT_TOKEN": TOKEN}
        self.task_uuid = ""

    # ---- set-up -----------------------------------------------------------------------
    def make_image(self) -> None:
        base = self.root / "base.qcow2"
        run_proc(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(self.disk_size)])
        runs = 64
        step = self.disk_size // runs
        size = self.data_gib * GIB // runs
        cmds: list[str] = []
        for i in range(runs):
            cmds += ["-c", f"write -P 0x{(i % 254) + 1:02x} {i * step} {size}"]
        run_proc(["qemu-io", "-f", "qcow2", *cmds, str(base)])
        for vm in (self.agent_vm, self.peer_vm):
            shutil.copyfile(base, vm.image)
        base.unlink()

    async def start_vm(self, vm: Vm) -> None:
        xml = throwaway_domain_xml(
            vm.name,
            [(self.volume, vm.image)],
            vm.qmp,
            description=f"{VM_MARK} (bench_backup) pid={os.getpid()}",
        )
        conn = await self.hv.connection()
        await asyncio.to_thread(conn.defineXML, xml)
        vm.defined = True
        dom = await asyncio.to_thread(conn.lookupByName, vm.name)
        await asyncio.to_thread(dom.create)
        info = await self.hv.find_vm(vm.name)
        assert info is not None and info.disks, vm.name
        vm.qdev = info.disks[0].qdev

    async def remove_vm(self, vm: Vm) -> None:
        if not vm.defined:
            return
        conn = await self.hv.connection()

        def remove() -> None:
            dom = conn.lookupByName(vm.name)
            if dom.isActive():
                dom.destroy()
            # virtnbdbackup's checkpoints are libvirt metadata: undefine them with the domain
            flags = 0
            with contextlib.suppress(AttributeError):
                flags |= libvirt_qemu.libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            dom.undefineFlags(flags)

        await asyncio.to_thread(remove)
        vm.defined = False

    # ---- guest writes -------------------------------------------------------------------
    async def write_both(self, offsets: list[int], pattern: int) -> None:
        conn = await self.hv.connection()

        def write(vm: Vm) -> None:
            dom = conn.lookupByName(vm.name)
            for off in offsets:
                out = libvirt_qemu.qemuMonitorCommand(
                    dom,
                    f'qemu-io -d {vm.qdev} "write -P 0x{pattern:02x} {off} 64k"',
                    libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
                )
                if out.strip():
                    raise RuntimeError(f"qemu-io on {vm.name}: {out.strip()}")

        await asyncio.gather(
            *(asyncio.to_thread(write, vm) for vm in (self.agent_vm, self.peer_vm))
        )

    def scattered(self, rng: random.Random, n: int) -> list[int]:
        return [c * CLUSTER for c in sorted(rng.sample(range(self.disk_size // CLUSTER), n))]

    # ---- the three parties -----------------------------------------------------------------
    def agent_backup(self, dest: Path) -> Proc:
        return run_proc(
            [
                sys.executable,
                "-m",
                "cbt_agent",
                "backup",
                "--url",
                self.agent.base,
                "--vm",
                self.agent_vm.name,
                "--dest",
                str(dest),
            ],
            self.env,
        )

    def peer_backup(self, level: str, dest: Path) -> Proc:
        scratch = self.root / "peer-scratch"
        scratch.mkdir(exist_ok=True)
        return run_proc(
            self.peer.backup(
                "-d",
                self.peer_vm.name,
                "-l",
                level,
                "-o",
                str(dest),
                "-n",
                "--scratchdir",
                str(scratch),
                "-f",
                str(self.root / "peer.sock"),
            )
        )

    def limit_enable(self, api: CbtApi, since: str | None) -> list[VolumeBackupInfo]:
        if not self.task_uuid:
            task = api.find_task(self.agent_vm.name)
            assert task is not None
            self.task_uuid = task.uuid
        return api.enable(self.task_uuid, since, quiesce=False)

    async def limit_incremental(self, since: str, expect: int) -> float:
        """Enable + one NBD connect + the dirty clusters read 16 in flight into a raw file +
        fsync + Disable: the least any client must do for an incremental."""
        target = self.root / "limit-inc.raw"
        target.unlink(missing_ok=True)

        def limit() -> tuple[float, int]:
            with CbtApi(self.agent.base, TOKEN) as api:
                t0 = time.perf_counter()
                infos = self.limit_enable(api, since)
                copied = _read_dirty(infos[0], target)
                api.disable(self.task_uuid, force=False)
                return time.perf_counter() - t0, copied

        seconds, copied = await asyncio.to_thread(limit)
        if copied != expect:
            raise RuntimeError(f"limit copied {copied} bytes, expected {expect}")
        target.unlink()
        return seconds

    async def limit_full(self) -> float:
        """Enable + qemu-img create + qemu-nbd + nbdcopy --flush from the export + Disable."""
        target = self.root / "limit-full.qcow2"
        sock = self.root / "limit-full.sock"
        target.unlink(missing_ok=True)

        def limit() -> float:
            with CbtApi(self.agent.base, TOKEN) as api:
                t0 = time.perf_counter()
                infos = self.limit_enable(api, None)
                _nbdcopy(infos[0], target, sock)
                api.disable(self.task_uuid, force=False)
                return time.perf_counter() - t0

        seconds = await asyncio.to_thread(limit)
        target.unlink()
        sock.unlink(missing_ok=True)
        return seconds


def _read_dirty(info: VolumeBackupInfo, target: Path) -> int:
    """The dirty clusters of the Enable's bitmap, IN_FLIGHT reads at a time, into `target`."""
    assert info.bitmap_b64 is not None
    runs = extents.bitmap_runs(info.bitmap_b64, info.granularity, info.size)
    pending = iter(extents.requests(runs, info.granularity))
    address = nbdio.NbdAddress(
        info.nbd_server, info.nbd_port, info.nbd_socket, info.export_name, None
    )
    h = nbdio.connect(address, ())
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    pool: dict[int, list[Any]] = {}
    flight: list[tuple[int, Any, int, int]] = []
    copied = 0
    try:
        os.ftruncate(fd, info.size)
        while True:
            while len(flight) < IN_FLIGHT:
                req = next(pending, None)
                if req is None:
                    break
                free = pool.setdefault(req[1], [])
                buf = free.pop() if free else nbd.Buffer(req[1])
                flight.append((h.aio_pread(buf, req[0]), buf, req[0], req[1]))
            if not flight:
                break
            h.poll(-1)
            keep = []
            for cookie, buf, off, n in flight:
                if h.aio_command_completed(cookie):
                    os.pwrite(fd, buf.to_bytearray(), off)
                    copied += n
                    pool[n].append(buf)
                else:
                    keep.append((cookie, buf, off, n))
            flight = keep
        os.fsync(fd)
    finally:
        os.close(fd)
        nbdio.close(h)
    return copied


def _nbdcopy(info: VolumeBackupInfo, target: Path, sock: Path) -> None:
    """`nbdcopy --flush` of the export into a new qcow2 served by qemu-nbd."""
    run_proc(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=64k",
            str(target),
            str(info.size),
        ]
    )
    server = subprocess.Popen(
        [
            "qemu-nbd",
            "-f",
            "qcow2",
            "--cache=writeback",
            "-e",
            "8",
            "-t",
            "-k",
            str(sock),
            str(target),
        ]
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        src = f"nbd://{info.nbd_server}:{info.nbd_port}/{info.export_name}"
        run_proc(["nbdcopy", "--flush", src, f"nbd+unix:///?socket={sock}"])
    finally:
        server.terminate()
        server.wait()


async def in_turn(i: int, *steps: Callable[[], Awaitable[None]]) -> None:
    """Run the parties' steps, the first one moving each round (none always follows another's
    writes), each after a sync (untimed): no one pays for the dirty pages of the one before."""
    k = i % len(steps)
    for step in (*steps[k:], *steps[:k]):
        await asyncio.to_thread(os.sync)
        await step()


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


async def _add(series: Series, fn: Callable[..., Any], *args: Any, cold: bool = False) -> None:
    """Time `fn(*args)` in a thread into `series` (a Proc's own figures, when it returns one)."""
    if cold:
        await asyncio.to_thread(_drop_caches)
    t0 = time.perf_counter()
    got = await asyncio.to_thread(fn, *args)
    series.add(got if isinstance(got, Proc) else time.perf_counter() - t0)


async def _add_async(series: Series, fn: Callable[..., Awaitable[float]], *args: Any) -> None:
    series.add(await fn(*args))


CLIENT_IMPORTS = "import cbt_agent.cli, cbt_agent.client.backup"
# the two halves of `cbt-agent restore`, timed apart: its convert (client/restore.py) and the
# checksums of every file of the chain (client/target.py), one file after another
RESTORE_CONVERT = ["qemu-img", "convert", *CONVERT_FLAGS]
CHAIN_SUMS = (
    "import sys, pathlib\n"
    "from cbt_agent.client.target import sha256_file\n"
    "for p in sys.argv[1:]: sha256_file(pathlib.Path(p))"
)


def _report_process_floor(agent: Series, limit: Series, bare: Series, loaded: Series) -> None:
    floor = limit.median + loaded.median
    print(
        f"  (a process: interpreter start {bare.median:.3f} s, with the client's modules "
        f"loaded {loaded.median:.3f} s; LIMIT + that {floor:.3f} s, agent/that "
        f"{agent.median / floor:.2f}x)",
        flush=True,
    )


def _read_files(paths: Sequence[Path]) -> None:
    for p in paths:
        with p.open("rb", buffering=0) as f:
            while f.read(4 << 20):
                pass


def _report(
    label: str,
    agent: Series,
    limit: Series | None,
    allowed: float | None,
    peer: Series | None = None,
    faster: float | None = None,
) -> bool:
    ok = True
    rss = f", {statistics.median(agent.rss):.0f} MiB RSS" if agent.rss else ""
    line = f"  {label:<34} agent {agent.median:7.3f} s{rss}"
    if peer is not None:
        prss = f", {statistics.median(peer.rss):.0f} MiB" if peer.rss else ""
        line += f" | virtnbdbackup {peer.median:7.3f} s{prss}"
    if limit is not None:
        line += f" | LIMIT {limit.median:7.3f} s"
    print(line, flush=True)
    if limit is not None and allowed is not None:
        ratio = agent.median / limit.median
        good = ratio <= allowed
        ok &= good
        print(
            f"  RATIO {label} agent/limit: {ratio:.2f}x  limit <= {allowed:.1f}x  "
            f"-> {'PASS' if good else 'FAIL'}",
            flush=True,
        )
    if peer is not None:
        speedup = peer.median / agent.median
        good = faster is None or speedup >= faster
        ok &= good
        want = f"  wanted >= {faster:.1f}x" if faster is not None else ""
        verdict = f"  -> {'PASS' if good else 'FAIL'}" if faster is not None else ""
        print(f"  SPEEDUP {label} virtnbdbackup/agent: {speedup:.2f}x{want}{verdict}", flush=True)
    return ok


async def run(
    peer_path: Path, runs: int, data_gib: int, disk_gib: int, writes: int, keep: bool = False
) -> int:
    peer = await asyncio.to_thread(ensure_peer, peer_path)
    root = Path(tempfile.mkdtemp(prefix="cbtbb-", dir="/var/tmp"))
    os.chmod(root, 0o755)  # QEMU (another user under libvirt) opens the images in it
    b = Bench(root, peer, data_gib, disk_gib)
    rng = random.Random(20261203)
    ok = True
    try:
        print(
            f"[bench] {disk_gib} GiB disk, {data_gib} GiB of data, {writes} x 64 KiB writes "
            f"per incremental, {runs} runs; peer {peer.code}",
            flush=True,
        )
        await b.hv.open()
        await asyncio.to_thread(b.make_image)
        await b.start_vm(b.agent_vm)
        await b.start_vm(b.peer_vm)
        await b.agent.start()
        full_a, full_p, full_l = Series(), Series(), Series()
        dest_a = dest_p = root
        for i in range(runs):
            dest_a, dest_p = root / f"agent-{i}", root / f"peer-{i}"
            await in_turn(
                i,
                partial(_add, full_a, b.agent_backup, dest_a),
                partial(_add, full_p, b.peer_backup, "full", dest_p),
                partial(_add_async, full_l, b.limit_full),
            )
        inc_a, inc_p, inc_l = Series(), Series(), Series()
        for i in range(3):
            offsets = b.scattered(rng, writes)
            await b.write_both(offsets, 0x11 + i)
            since = _latest(dest_a)
            await in_turn(
                i,
                partial(_add, inc_a, b.agent_backup, dest_a),
                partial(_add, inc_p, b.peer_backup, "inc", dest_p),
                partial(_add_async, inc_l, b.limit_incremental, since, writes * CLUSTER),
            )
            _check_copied(dest_a, writes * CLUSTER)
        rest_a, rest_p, rest_l = Series(), Series(), Series()
        rest_conv, rest_sums = Series(), Series()  # the agent's restore in its two parts
        ver_a, ver_l, ver_warm = Series(), Series(), Series()
        top = _chain_top(dest_a)
        files = sorted(p for p in dest_a.iterdir() if p.suffix == ".qcow2")
        agent = [sys.executable, "-m", "cbt_agent"]
        for i in range(runs):
            out = root / f"restore-{i}"
            out.mkdir()
            peer_sock = str(root / "peer-restore.sock")
            await in_turn(
                i,
                partial(
                    _add,
                    rest_a,
                    run_proc,
                    [*agent, "restore", "--dest", str(dest_a), "--out", str(out / "a")],
                    cold=True,
                ),
                partial(
                    _add,
                    rest_p,
                    run_proc,
                    peer.restore(
                        "-i", str(dest_p), "-o", str(out / "p"), "-n", "-f", peer_sock, "--nocolor"
                    ),
                    cold=True,
                ),
                partial(
                    _add,
                    rest_l,
                    run_proc,
                    [
                        "qemu-img",
                        "convert",
                        "-f",
                        "qcow2",
                        "-O",
                        "qcow2",
                        str(top),
                        str(out / "c.qcow2"),
                    ],
                    cold=True,
                ),
                partial(
                    _add,
                    rest_conv,
                    run_proc,
                    [*RESTORE_CONVERT, str(top), str(out / "w.qcow2")],
                    cold=True,
                ),
                partial(
                    _add,
                    rest_sums,
                    run_proc,
                    [sys.executable, "-c", CHAIN_SUMS, *map(str, files)],  # full + 3 inc
                    cold=True,
                ),
            )
            shutil.rmtree(out)
        for i in range(runs):  # after the restores, which all read the files from the cache
            # verify as a backup store is verified: from the disk (the page cache dropped first)
            await in_turn(
                i,
                partial(_add, ver_a, run_proc, [*agent, "verify", str(dest_a)], cold=True),
                partial(_add, ver_l, _read_files, files, cold=True),
            )
            await _add(ver_warm, run_proc, [*agent, "verify", str(dest_a)])
        none_a, none_p, none_l = Series(), Series(), Series()
        for i in range(runs):
            since = _latest(dest_a)
            await in_turn(
                i,
                partial(_add, none_a, b.agent_backup, dest_a),
                partial(_add, none_p, b.peer_backup, "inc", dest_p),
                partial(_add_async, none_l, b.limit_incremental, since, 0),
            )
            _check_copied(dest_a, 0)
        # what any process pays that the in-process LIMIT does not: the interpreter's start,
        # and the client's modules loaded before its first request
        bare, loaded = Series(), Series()
        for _ in range(runs):
            await _add(bare, run_proc, [sys.executable, "-c", "pass"])
            await _add(loaded, run_proc, [sys.executable, "-c", CLIENT_IMPORTS])
        print(flush=True)
        ok &= _report(f"incremental, {writes * CLUSTER // MIB} MiB", inc_a, inc_l, 1.3, inc_p, 2.8)
        ok &= _report("incremental, nothing changed", none_a, none_l, 1.2, none_p)
        _report_process_floor(none_a, none_l, bare, loaded)
        ok &= _report(f"full, {data_gib} GiB", full_a, full_l, 1.0, full_p)
        ok &= _report("restore full + 3 incrementals", rest_a, rest_l, 1.0, rest_p, 2.0)
        print(
            f"  (its parts, each alone: the convert {rest_conv.median:.3f} s = "
            f"{rest_conv.median / rest_l.median:.2f}x LIMIT; the chain's sha256 "
            f"{rest_sums.median:.3f} s = {rest_sums.median / rest_l.median:.2f}x LIMIT)",
            flush=True,
        )
        ok &= _report("verify, cold cache (4 files)", ver_a, ver_l, 1.0)
        print(
            f"  (verify with the files in the page cache: {ver_warm.median:.3f} s; hashing, "
            "not reading, is its cost there)",
            flush=True,
        )
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(b.agent.stop())
        for vm in (b.agent_vm, b.peer_vm):
            with contextlib.suppress(Exception):
                await asyncio.shield(b.remove_vm(vm))
        with contextlib.suppress(Exception):
            await b.hv.close()
        if keep:
            print(f"[bench] kept {root} (the backup stores, for measuring by hand)", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


def _manifest(dest: Path) -> dict[str, Any]:
    import json

    data = json.loads((dest / "manifest.json").read_text())
    assert isinstance(data, dict)
    return data


def _latest(dest: Path) -> str:
    return str(_manifest(dest)["checkpoints"][-1]["name"])


def _chain_top(dest: Path) -> Path:
    return dest / str(_manifest(dest)["checkpoints"][-1]["disks"][0]["file"])


def _check_copied(dest: Path, expect: int) -> None:
    disk = _manifest(dest)["checkpoints"][-1]["disks"][0]
    copied = disk.get("copiedBytes", disk.get("copied_bytes"))
    if copied != expect:
        raise RuntimeError(f"agent incremental copied {copied} bytes, expected {expect}")


def main(argv: Callable[[], list[str]] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--peer",
        type=Path,
        default=DEFAULT_PEERS,
        help="virtnbdbackup: its tarball, a directory holding it, or its source tree",
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--data-gib", type=int, default=2)
    p.add_argument("--disk-gib", type=int, default=20)
    p.add_argument("--writes", type=int, default=3200)
    p.add_argument(
        "--keep", action="store_true", help="keep the work directory (its backup stores) at the end"
    )
    a = p.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))

    async def go() -> int:
        return await asyncio.wait_for(
            run(a.peer, a.runs, a.data_gib, a.disk_gib, a.writes, a.keep), TIME_BUDGET
        )

    run_guarded("bench_backup", go)


if __name__ == "__main__":
    main()
