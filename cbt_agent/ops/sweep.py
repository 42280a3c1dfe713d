"""`cbt-agent sweep [--apply]`: what the agent may have left behind that its database does not
explain: bitmaps named like the agent's of tasks it does not know (on any VM of the host, on any
layer), NBD sockets no task records, scratch files no export records, and qemu-storage-daemon
processes using the agent's directories that no record explains. Listing reads only; `apply`
removes what is safe to remove and says why it leaves the rest (a file or socket a process
still holds).

A bitmap of an unknown task is not always garbage: a VM that came from another host carries its
task's bitmaps until the management plane's CreateCbtTask adopts them here. Removing them makes
that task's next backup a full; the listing says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import signal
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbt_agent.config import Config
from cbt_agent.engine.tracking import remove_bitmaps
from cbt_agent.errors import CbtError
from cbt_agent.hypervisor.libvirt import Hypervisor, VmInfo
from cbt_agent.ops import procs, table
from cbt_agent.ops.audit import agent_bitmap, task_prefix
from cbt_agent.ops.chains import file_chains, qmp_channel
from cbt_agent.qemu import blockdev, images, nbd_server
from cbt_agent.qemu.bitmaps import bitmaps_of
from cbt_agent.store import SyncStore

STORAGE_DAEMON = "qemu-storage-daemon"
DAEMON_EXIT_WAIT = 5.0


class StrayKind(enum.StrEnum):
    BITMAP = "bitmap"
    NBD_SOCKET = "nbd-socket"
    SCRATCH = "scratch"
    STORAGE_DAEMON = "storage-daemon"


@dataclass(frozen=True)
class Stray:
    kind: StrayKind
    name: str  # the bitmap's name, the file's path, "pid N"
    place: str  # where: the VM and image, the directory, the daemon's command line
    why: str  # why the database does not explain it
    keep: str | None = None  # why `apply` leaves it (None: removed by `apply`)
    vm_uuid: str | None = None
    running: bool = False  # on a running VM (QMP) rather than in a shut-off VM's files
    node: str | None = None  # the bitmap's node (running VM)
    image: str | None = None  # the bitmap's file (shut-off VM)
    pid: int | None = None  # the daemon, or the QEMU whose NBD server listens on the socket
    start: int | None = None  # the daemon's start time (a reused pid is never signalled)


@dataclass(frozen=True)
class Outcome:
    stray: Stray
    action: str  # would remove | keep | removed | left
    error: str | None = None


@dataclass(frozen=True)
class RecordedDaemons:
    """qemu-storage-daemons the database records, with the sockets and files they use."""

    pids: frozenset[int] = frozenset()
    paths: frozenset[str] = frozenset()


def recorded_storage_daemons(store: SyncStore | None) -> RecordedDaemons:
    """The qemu-storage-daemons the database records (offline exports of shut-off VMs): their
    pids, and the files and sockets they use (pid file, QMP monitor, NBD socket), so none of
    them is listed as stray. Any other qemu-storage-daemon using the agent's directories is."""
    if store is None:
        return RecordedDaemons()
    pids: set[int] = set()
    paths: set[str] = set()
    for d in store.storage_daemons():
        if d.pid is not None:
            pids.add(d.pid)
        paths.update((d.pid_file, d.qmp_socket))
        socket = store.nbd_server(d.task_uuid).socket
        if socket:
            paths.add(socket)
    return RecordedDaemons(frozenset(pids), frozenset(paths))


@dataclass
class Sweep:
    strays: list[Stray]
    problems: list[str]  # what could not be looked at (then "nothing stray" is not claimed)


def _stray_bitmap_why(prefix: str) -> str:
    return (
        f"no task {prefix}… in the database (deleted; or a VM from another host whose "
        "CreateCbtTask has not adopted it yet: removing makes its next backup a full)"
    )


async def _bitmaps(
    config: Config, hv: Hypervisor, vm: VmInfo, known: set[str], socket_free: bool
) -> list[Stray]:
    out: list[Stray] = []
    if vm.running:
        qmp = await qmp_channel(config, hv, vm.vm_uuid, socket_free=socket_free)
        try:
            nodes = await blockdev.chain_nodes(qmp)
        finally:
            await qmp.close()
        for node in nodes:
            for name in sorted(bitmaps_of(node)):
                parsed = agent_bitmap(name)
                if parsed is None or parsed.prefix in known:
                    continue
                node_name = str(node.get("node-name"))
                out.append(
                    Stray(
                        StrayKind.BITMAP,
                        name,
                        f"VM {vm.vm_uuid} {node.get('file', '')} ({node_name})",
                        _stray_bitmap_why(parsed.prefix),
                        vm_uuid=vm.vm_uuid,
                        running=True,
                        node=node_name,
                    )
                )
        return out
    seen: set[tuple[str, str]] = set()
    for chain in await file_chains(vm):
        if not os.path.isabs(chain.disk.install_path):
            continue  # a network or block disk without a file: qemu-img cannot look at it
        if chain.error is not None:
            raise CbtError(f"disk {chain.disk.volume_uuid}: {chain.error}")
        for layer in chain.layers:
            for name in sorted(layer.bitmaps):
                parsed = agent_bitmap(name)
                if parsed is None or parsed.prefix in known or (layer.filename, name) in seen:
                    continue
                seen.add((layer.filename, name))
                out.append(
                    Stray(
                        StrayKind.BITMAP,
                        name,
                        f"VM {vm.vm_uuid} {layer.filename} (shut off)",
                        _stray_bitmap_why(parsed.prefix),
                        vm_uuid=vm.vm_uuid,
                        image=layer.filename,
                    )
                )
    return out


def _describe(pid: int) -> str:
    p = procs.process(pid)
    return f"pid {pid} ({p.name})" if p is not None else f"pid {pid}"


async def _sockets(
    config: Config,
    hv: Hypervisor,
    store: SyncStore | None,
    recorded: set[str],
    vms: frozenset[str] | None,
) -> list[Stray]:
    sock_dir = config.nbd.socket_dir
    if not sock_dir.is_dir():
        return []
    candidates = sorted(
        str(p)
        for p in sock_dir.iterdir()
        if p.is_socket() and str(p) not in recorded and (vms is None or p.stem in vms)
    )
    live = await asyncio.to_thread(procs.listeners, candidates)
    out: list[Stray] = []
    for path in candidates:
        pid = live.get(path)
        if pid is None:
            out.append(
                Stray(
                    StrayKind.NBD_SOCKET,
                    path,
                    str(sock_dir),
                    "no task records it; nothing listens on it",
                )
            )
            continue
        vm_uuid = Path(path).stem
        task = store.task_for_vm(vm_uuid) if store is not None else None
        server = store.nbd_server(task.uuid) if store is not None and task is not None else None
        serving = server is not None and (server.port is not None or server.socket is not None)
        if await hv.qemu_pid(vm_uuid) == pid and not serving:
            out.append(
                Stray(
                    StrayKind.NBD_SOCKET,
                    path,
                    str(sock_dir),
                    f"no task records it; the NBD server of VM {vm_uuid} listens on it "
                    "(left by an interrupted Enable): removing stops that server",
                    vm_uuid=vm_uuid,
                    running=True,
                    pid=pid,
                )
            )
        else:
            out.append(
                Stray(
                    StrayKind.NBD_SOCKET,
                    path,
                    str(sock_dir),
                    "no task records it",
                    keep=f"{_describe(pid)} listens on it",
                )
            )
    return out


def _scratch(config: Config, recorded: set[str]) -> list[Stray]:
    scratch_dir = config.scratch_dir
    if not scratch_dir.is_dir():
        return []
    files = sorted(str(p) for p in scratch_dir.iterdir() if p.is_file() and str(p) not in recorded)
    held = procs.holders(files)
    return [
        Stray(
            StrayKind.SCRATCH,
            path,
            str(scratch_dir),
            "no export of the database records it",
            keep=f"open by {', '.join(_describe(p) for p in held[path])}" if path in held else None,
        )
        for path in files
    ]


def _uses(arg: str, directory: Path) -> bool:
    d = str(directory)
    return arg == d or f"{d}{os.sep}" in arg


def _daemons(config: Config, recorded: RecordedDaemons) -> list[Stray]:
    out: list[Stray] = []
    for p in procs.processes():
        if p.name != STORAGE_DAEMON or p.pid in recorded.pids:
            continue
        dirs = (config.state_dir, config.nbd.socket_dir)
        if not any(_uses(a, d) for a in p.argv for d in dirs):
            continue
        out.append(
            Stray(
                StrayKind.STORAGE_DAEMON,
                f"pid {p.pid}",
                p.command,
                "uses the agent's state or NBD socket directory; no record explains it",
                pid=p.pid,
                start=p.start,
            )
        )
    return out


async def find(
    config: Config,
    store: SyncStore | None,
    hv: Hypervisor,
    *,
    socket_free: bool,
    vms: frozenset[str] | None = None,
) -> Sweep:
    """Everything stray on this host now. Reads only (QMP queries, qemu-img -U, /proc).
    `vms`: look only at these VMs' disks and NBD sockets (None: every VM of the host); the
    agent's own directories are always looked at."""
    tasks = store.list_tasks() if store is not None else []
    known = {task_prefix(t.uuid) for t in tasks}
    daemons = recorded_storage_daemons(store)
    strays: list[Stray] = []
    problems: list[str] = []
    for vm in await hv.list_vms():
        if vms is not None and vm.vm_uuid not in vms:
            continue
        try:
            strays += await _bitmaps(config, hv, vm, known, socket_free)
        except CbtError as e:
            problems.append(f"VM {vm.vm_uuid}: {e.message}")
    sockets = {s for t in tasks if (s := store.nbd_server(t.uuid).socket)} if store else set()
    strays += await _sockets(config, hv, store, sockets | set(daemons.paths), vms)
    scratch = {e.scratch_path for t in tasks for e in store.exports(t.uuid)} if store else set()
    strays += await asyncio.to_thread(_scratch, config, scratch | set(daemons.paths))
    strays += await asyncio.to_thread(_daemons, config, daemons)
    return Sweep(strays, problems)


def planned(sweep: Sweep) -> list[Outcome]:
    """The listing without --apply."""
    return [Outcome(s, "keep" if s.keep else "would remove") for s in sweep.strays]


async def _stop_daemon(s: Stray) -> str | None:
    assert s.pid is not None
    now = procs.process(s.pid)
    if now is None:
        return None
    if now.start != s.start:
        return f"pid {s.pid} is another process now: not signalled"
    with contextlib.suppress(ProcessLookupError):
        os.kill(s.pid, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DAEMON_EXIT_WAIT
    while (p := procs.process(s.pid)) is not None and p.start == s.start:
        if loop.time() > deadline:
            return f"still running {DAEMON_EXIT_WAIT:.0f} s after SIGTERM"
        await asyncio.sleep(0.05)
    return None


async def _remove_running_bitmaps(
    config: Config, hv: Hypervisor, vm_uuid: str, strays: list[Stray], socket_free: bool
) -> list[Outcome]:
    names = {s.name for s in strays}
    qmp = await qmp_channel(config, hv, vm_uuid, socket_free=socket_free)
    try:
        removed, left = await remove_bitmaps(qmp, lambda n: n in names)
    finally:
        await qmp.close()
    del removed  # what is not left is gone: removed now, or already
    why = dict(entry.split(": ", 1) for entry in left)
    return [
        Outcome(s, "left", why[f"{s.node}/{s.name}"])
        if f"{s.node}/{s.name}" in why
        else Outcome(s, "removed")
        for s in strays
    ]


async def _remove_one(config: Config, hv: Hypervisor, s: Stray, socket_free: bool) -> str | None:
    """Remove one stray that is not a running VM's bitmap; the error, or None."""
    try:
        if s.kind is StrayKind.BITMAP and s.image is not None:
            await images.remove_bitmap(s.image, s.name)
        elif s.kind is StrayKind.NBD_SOCKET:
            if s.vm_uuid is not None and s.pid is not None:
                qmp = await qmp_channel(config, hv, s.vm_uuid, socket_free=socket_free)
                try:
                    await nbd_server.stop(qmp)
                finally:
                    await qmp.close()
            await asyncio.to_thread(nbd_server.remove_socket_file, s.name)
        elif s.kind is StrayKind.SCRATCH:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.unlink, s.name)
        elif s.kind is StrayKind.STORAGE_DAEMON:
            return await _stop_daemon(s)
    except CbtError as e:
        return e.message
    except OSError as e:
        return f"{e.strerror or e}"
    return None


async def apply(
    config: Config,
    store: SyncStore | None,
    hv: Hypervisor,
    *,
    socket_free: bool,
    vms: frozenset[str] | None = None,
) -> tuple[list[Outcome], list[str]]:
    """Remove every stray that is safe to remove: stray daemons first (they may hold scratch
    files and sockets), then whatever is stray after that. Returns each stray's outcome and
    what could not be looked at."""
    first = await find(config, store, hv, socket_free=socket_free, vms=vms)
    outcomes: list[Outcome] = []
    for s in first.strays:
        if s.kind is StrayKind.STORAGE_DAEMON and s.keep is None:
            error = await _remove_one(config, hv, s, socket_free)
            outcomes.append(Outcome(s, "left" if error else "removed", error))
    again = await find(config, store, hv, socket_free=socket_free, vms=vms)
    running: dict[str, list[Stray]] = defaultdict(list)
    for s in again.strays:
        if s.kind is StrayKind.STORAGE_DAEMON and any(o.stray.pid == s.pid for o in outcomes):
            continue  # signalled above and not gone: already reported
        if s.keep is not None:
            outcomes.append(Outcome(s, "keep"))
        elif s.kind is StrayKind.BITMAP and s.running and s.vm_uuid is not None:
            running[s.vm_uuid].append(s)
        else:
            error = await _remove_one(config, hv, s, socket_free)
            outcomes.append(Outcome(s, "left" if error else "removed", error))
    for vm_uuid, strays in running.items():
        try:
            outcomes += await _remove_running_bitmaps(config, hv, vm_uuid, strays, socket_free)
        except CbtError as e:
            outcomes += [Outcome(s, "left", e.message) for s in strays]
    return outcomes, again.problems


def settled(outcomes: list[Outcome]) -> bool:
    """Nothing stray is left (every one removed)."""
    return all(o.action == "removed" for o in outcomes)


def to_json(o: Outcome) -> dict[str, Any]:
    s = o.stray
    return {
        "kind": s.kind.value,
        "name": s.name,
        "place": s.place,
        "why": s.why,
        "action": o.action,
        "keep": s.keep,
        "error": o.error,
        "vmInstanceUuid": s.vm_uuid,
        "pid": s.pid,
    }


HEADERS = ["KIND", "ACTION", "WHAT", "WHERE", "WHY"]


def lines(outcomes: list[Outcome]) -> list[str]:
    rows = []
    for o in outcomes:
        s = o.stray
        why = s.why
        if o.action == "keep" and s.keep:
            why += f"; kept: {s.keep}"
        if o.error:
            why += f"; {o.error}"
        rows.append([s.kind.value, o.action, s.name, s.place, why])
    return table.render(HEADERS, rows)
