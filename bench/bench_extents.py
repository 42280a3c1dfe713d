"""Dirty-extent reading: the agent's `dirty_extents` against a raw libnbd block-status loop.

A 100 GiB sparse qcow2 is served by a qemu-storage-daemon started here, with a disabled
persistent dirty bitmap holding 1,000 separate 64 KiB dirty extents spread over the disk
(written through a writable NBD export while the bitmap recorded). Measured, interleaved:

- agent: `cbt_agent.qemu.nbd.dirty_extents(address, "qemu:dirty-bitmap:<name>")`
  (connect, block status in just-under-4-GiB steps with dirty runs merged inside libnbd's
  callback, a DirtyExtent per merged dirty run, disconnect);
- LIMIT: raw libnbd: connect, `block_status` in < 4 GiB requests collecting (offset, length,
  flags) tuples into a list, disconnect. Allowed: agent <= 1.5x raw (median).

Also timed: `bitmap_from_extents` + `changed_bytes` for that disk (what Enable does with the
extents), and `bitmap_base64` of the result (also part of Enable's reply).

Run: .venv/bin/python -m bench.bench_extents
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbd
from qemu.qmp import QMPClient

from bench import baseline
from bench.stats import median_ms, row, run_guarded, verdict
from cbt_agent.dirtymap import bitmap_base64, bitmap_from_extents, changed_bytes
from cbt_agent.qemu import nbd as nbdio

GIB = 1 << 30
DISK_SIZE = 100 * GIB
CHUNK = 64 << 10
EXTENTS = 1000
BITMAP = "bench-dirty"
CONTEXT = f"qemu:dirty-bitmap:{BITMAP}"
LIMIT = 1.5
TIME_BUDGET = 110.0  # seconds: the whole benchmark, setup and cleanup included


class Daemon:
    """A qemu-storage-daemon started here and stopped by its pid."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.disk = work / "disk.qcow2"
        self.qmp_sock = work / "qmp.sock"
        self.nbd_sock = work / "nbd.sock"
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp = QMPClient("bench-extents")

    async def start(self) -> None:
        img = await asyncio.create_subprocess_exec(
            "qemu-img", "create", "-q", "-f", "qcow2", str(self.disk), str(DISK_SIZE)
        )
        if await img.wait() != 0:
            raise RuntimeError("qemu-img create failed")
        self.proc = await asyncio.create_subprocess_exec(
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=file0,filename={self.disk}",
            "--blockdev",
            "driver=qcow2,node-name=disk0,file=file0",
            "--nbd-server",
            f"addr.type=unix,addr.path={self.nbd_sock}",
            "--chardev",
            f"socket,id=qmp0,path={self.qmp_sock},server=on,wait=off",
            "--monitor",
            "chardev=qmp0",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while not (self.qmp_sock.exists() and self.nbd_sock.exists()):
            if self.proc.returncode is not None:
                err = (await self.proc.stderr.read()).decode() if self.proc.stderr else ""
                raise RuntimeError(f"qemu-storage-daemon exited: {err.strip()}")
            if time.monotonic() > deadline:
                raise RuntimeError("qemu-storage-daemon did not create its sockets")
            await asyncio.sleep(0.01)
        await self.qmp.connect(str(self.qmp_sock))

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()  # by the pid we started, never by name
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def prepare(d: Daemon) -> list[int]:
    """Record 1,000 scattered 64 KiB writes in a bitmap, freeze it and export it read-only.
    Returns the written offsets."""
    await d.qmp.execute(
        "block-dirty-bitmap-add",
        {"node": "disk0", "name": BITMAP, "persistent": True, "granularity": CHUNK},
    )
    await d.qmp.execute(
        "block-export-add",
        {"type": "nbd", "id": "w", "node-name": "disk0", "name": "w", "writable": True},
    )
    # even cluster numbers only: no two writes touch, so each is its own dirty extent
    clusters = sorted(random.Random(42).sample(range(DISK_SIZE // CHUNK // 2), EXTENTS))
    offsets = [c * 2 * CHUNK for c in clusters]

    def write() -> None:
        h = nbd.NBD()
        h.set_export_name("w")
        h.connect_unix(str(d.nbd_sock))
        data = b"\xab" * CHUNK
        for off in offsets:
            h.pwrite(data, off)
        h.flush()
        h.shutdown()

    await asyncio.to_thread(write)
    with d.qmp.listener("BLOCK_EXPORT_DELETED") as deleted:
        await d.qmp.execute("block-export-del", {"id": "w"})
        await asyncio.wait_for(deleted.get(), 10)
    await d.qmp.execute("block-dirty-bitmap-disable", {"node": "disk0", "name": BITMAP})
    await d.qmp.execute(
        "block-export-add",
        {
            "type": "nbd",
            "id": "r",
            "node-name": "disk0",
            "name": "r",
            "writable": False,
            "bitmaps": [BITMAP],
        },
    )
    return offsets


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(d: Daemon, offsets: list[int], reps: int) -> bool:
    sock = str(d.nbd_sock)
    address = nbdio.NbdAddress(None, None, sock, "r")

    # correctness first: both see exactly the 1,000 written extents
    agent_ext = nbdio.dirty_extents(address, CONTEXT)
    raw_ext = baseline.read_extents(CONTEXT, "r", socket=sock)
    agent_dirty = [(e.start, e.length) for e in agent_ext if e.dirty]
    raw_dirty = [(o, n) for o, n, f in raw_ext if f & 1]
    if agent_dirty != [(o, CHUNK) for o in offsets] or agent_dirty != raw_dirty:
        raise RuntimeError(
            f"extents differ: agent {len(agent_dirty)} dirty, raw {len(raw_dirty)} dirty, "
            f"written {len(offsets)}"
        )
    print(
        f"  map: {len(agent_ext)} extents from the agent ({len(agent_dirty)} dirty), "
        f"{len(raw_ext)} raw tuples; agent requests of {nbdio.BLOCK_STATUS_CHUNK >> 30} GiB "
        f"({-(-DISK_SIZE // nbdio.BLOCK_STATUS_CHUNK)} round trips), raw of "
        f"{baseline.RAW_CHUNK / GIB:.3f} GiB ({-(-DISK_SIZE // baseline.RAW_CHUNK)} round trips)",
        flush=True,
    )

    agent: list[float] = []
    raw: list[float] = []
    agent_loop: list[float] = []
    raw_loop: list[float] = []
    # warm-up, then interleave so background load hits both sides alike
    nbdio.dirty_extents(address, CONTEXT)
    baseline.read_extents(CONTEXT, "r", socket=sock)
    for _ in range(reps):
        agent.append(timed(lambda: nbdio.dirty_extents(address, CONTEXT))[0])
        raw.append(timed(lambda: baseline.read_extents(CONTEXT, "r", socket=sock))[0])

    # the same without connect/disconnect: one open handle each
    ha = nbdio.connect(address, (CONTEXT,))
    hr = baseline.open_handle(CONTEXT, "r", socket=sock)
    try:
        for _ in range(reps):
            agent_loop.append(
                timed(lambda: nbdio.dirty_runs(ha, CONTEXT, 0, int(ha.get_size())))[0]
            )
            raw_loop.append(timed(lambda: baseline.block_status_list(hr, CONTEXT))[0])
    finally:
        nbdio.close(ha)
        hr.shutdown()

    encode: list[float] = []
    b64: list[float] = []
    bits, changed = b"", 0
    for _ in range(reps):
        t0 = time.perf_counter()
        bits = bitmap_from_extents(agent_ext, DISK_SIZE, CHUNK)
        changed = changed_bytes(agent_ext, DISK_SIZE, CHUNK)
        t1 = time.perf_counter()
        bitmap_base64(bits)
        t2 = time.perf_counter()
        encode.append(t1 - t0)
        b64.append(t2 - t1)
    if changed != EXTENTS * CHUNK or sum(bin(b).count("1") for b in bits) != EXTENTS:
        raise RuntimeError(f"bitmap_from_extents/changed_bytes wrong: changed={changed}")

    print(f"\n100 GiB qcow2, {EXTENTS} dirty 64 KiB extents, {reps} runs each (interleaved)")
    print(row("agent dirty_extents (connect..disconnect)", agent))
    print(row("LIMIT raw libnbd block_status -> list", raw))
    ok = verdict("agent/raw dirty extents", agent, raw, LIMIT)
    print(row("agent dirty_runs (open handle)", agent_loop))
    print(row("raw block_status loop only (open handle)", raw_loop))
    print(f"  ratio loop only: {median_ms(agent_loop) / median_ms(raw_loop):.2f}x (information)")
    print(row("bitmap_from_extents + changed_bytes", encode))
    print(row(f"bitmap_base64 ({len(bits) // 1024} KiB bitmap)", b64))
    print(
        f"  encode+base64 vs raw read: "
        f"{(median_ms(encode) + median_ms(b64)) / median_ms(raw):.2f}x of the raw extent read "
        f"(information; no limit)",
        flush=True,
    )
    return ok


async def main_async(reps: int) -> int:
    work = Path(tempfile.mkdtemp(prefix="cbtbx-", dir="/tmp"))
    d = Daemon(work)
    try:
        async with asyncio.timeout(TIME_BUDGET):
            t0 = time.monotonic()
            await d.start()
            offsets = await prepare(d)
            print(
                f"bench_extents: qemu-storage-daemon pid {d.proc.pid if d.proc else '?'}, "
                f"setup {time.monotonic() - t0:.1f} s",
                flush=True,
            )
            ok = await asyncio.to_thread(measure, d, offsets, reps)
    finally:
        await d.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nbench_extents: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=60, help="runs of each measurement")
    args = parser.parse_args()

    run_guarded(__name__, lambda: main_async(args.reps))


if __name__ == "__main__":
    main()
