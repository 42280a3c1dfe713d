"""Cutting checkpoints and exposing them: the Enable and Disable sequences against one VM.

Every name QEMU will see (nodes, jobs, exports, bitmaps, the NBD port) is recorded in SQLite
before the first command, so a crash at any point can be reconciled from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cbt_agent.config import UNIX_PATH_MAX, Config
from cbt_agent.engine.results import VolumeBackup
from cbt_agent.errors import HypervisorError, OperationError, QmpCommandError, QmpInterrupted
from cbt_agent.hypervisor.libvirt import DiskInfo, GuestAgentUnavailable, VmInfo
from cbt_agent.model import (
    TRACKING_LOST,
    Checkpoint,
    DiskPlan,
    Layer,
    bitmap_from_extents,
    changed_bytes,
    checkpoint_name,
    checkpoint_seq,
    found_checkpoints,
    full_bitmap,
    plan_disk,
    retention_victims,
    temp_bitmap_name,
    tracking_break,
)
from cbt_agent.qemu import blockdev
from cbt_agent.qemu import nbd as nbdio
from cbt_agent.qemu.qmp import QmpChannel
from cbt_agent.store import NbdServer, Store, SyncStore, VolumeExport

log = logging.getLogger(__name__)

# A test hook: called with a step name between the steps of Enable, Disable and Delete, so
# fault-injection tests can kill the agent at each one. None in production.
StepHook = Callable[[str], Awaitable[None]]


def ours(task_uuid: str, bitmap: str) -> bool:
    return bitmap.startswith(f"cbt-{task_uuid[:12]}-")


def is_temp(task_uuid: str, bitmap: str) -> bool:
    return bitmap.startswith(f"cbt-tmp-{task_uuid[:12]}-")


TLS_CREDS_ID = "cbt-nbd-tls"  # the VM's tls-creds-x509 object when [nbd] tls_cert_dir is set


def scratch_node_name(volume_uuid: str) -> str:
    # node names: at most 31 characters, starting with a letter
    return f"cbtsc-{volume_uuid[:24]}"


class GuestFreezer(Protocol):
    """The VM's guest agent: freeze and thaw its filesystems (libvirt fsFreeze/fsThaw)."""

    async def freeze(self) -> int: ...

    async def thaw(self) -> int: ...


@dataclass
class Freeze:
    """What quiescing did for one checkpoint: frozen or why not, and for how long."""

    quiesced: bool = False
    why_not: str | None = None  # crash-consistent: the reason
    millis: float = 0.0

    def note(self) -> str:
        if self.quiesced:
            return f"quiesced (guest filesystems frozen {self.millis:.0f} ms)"
        return f"crash-consistent ({self.why_not})" if self.why_not else "crash-consistent"


@dataclass
class EnableContext:
    config: Config
    store: Store
    qmp: QmpChannel
    vm: VmInfo
    task_uuid: str
    step: StepHook | None = None
    # a working channel again after a lost reply (the old connection may be gone)
    reconnect: Callable[[], Awaitable[QmpChannel]] | None = None
    notes: list[str] = field(default_factory=list)  # for the task's history (adoptions)
    guest: GuestFreezer | None = None  # the VM's guest agent, for quiesced checkpoints
    quiesce: str = "never"  # "auto" | "always" | "never"
    freeze_timeout: float = 10.0

    async def at(self, name: str) -> None:
        if self.step is not None:
            await self.step(name)


async def _run(*cmd: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise HypervisorError(f"{cmd[0]} failed: {(err or out).decode(errors='replace').strip()}")


def private_dir(path: Path) -> None:
    """Create `path` (and parents) owner-only; an existing directory is left as it is."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask


async def create_scratch(path: Path, size: int) -> None:
    await asyncio.to_thread(private_dir, path.parent)
    await _run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size))
    await asyncio.to_thread(os.chmod, path, 0o600)  # holds guest data from before the checkpoint


def nbd_address(cfg: Config, server: NbdServer, export_name: str) -> nbdio.NbdAddress:
    """How the agent itself reaches an export of `server` (TLS with the configured CA)."""
    tls_dir: str | None = None
    if server.tls:
        if cfg.nbd.tls_cert_dir is None:
            raise OperationError(
                "the export requires NBD TLS but [nbd] tls_cert_dir is no longer configured"
            )
        tls_dir = str(cfg.nbd.tls_cert_dir)
    return nbdio.NbdAddress(server.host, server.port, server.socket, export_name, tls_dir)


async def start_nbd_server(
    cfg: Config, store: Store, qmp: QmpChannel, task_uuid: str, vm_uuid: str
) -> NbdServer:
    """Start the VM's NBD server as configured: TCP on a free port of the range, or a unix
    socket in [nbd] socket_dir; with TLS when [nbd] tls_cert_dir is set. The socket path is
    recorded before QEMU makes it, the port as soon as QEMU has taken one."""
    tls = cfg.nbd.tls_cert_dir is not None
    creds: str | None = None
    if cfg.nbd.tls_cert_dir is not None:
        await blockdev.add_tls_creds(qmp, TLS_CREDS_ID, str(cfg.nbd.tls_cert_dir))
        creds = TLS_CREDS_ID
    if cfg.nbd.transport == "unix":
        path = cfg.nbd.socket_path(vm_uuid)
        if len(os.fsencode(path)) > UNIX_PATH_MAX:  # a VM uuid longer than ZStack's 32 hex
            raise OperationError(f"NBD socket path {path} is too long for a unix socket")
        server = NbdServer(socket=str(path), tls=tls)
        await asyncio.to_thread(private_dir, path.parent)
        await store.run(SyncStore.set_server, task_uuid, server)
        await blockdev.start_nbd_server_unix(qmp, str(path), creds)
        return server
    used = await store.run(SyncStore.used_nbd_ports)
    ports = [p for p in range(cfg.nbd.port_first, cfg.nbd.port_last + 1) if p not in used]
    port = await blockdev.start_nbd_server(qmp, cfg.nbd.listen, ports, creds)
    server = NbdServer(cfg.nbd.listen, port, None, tls)
    await store.run(SyncStore.set_server, task_uuid, server)
    return server


def _volume_info(
    disk: DiskInfo,
    export: VolumeExport,
    server: NbdServer,
    bits: bytes,
    changed: int,
    quiesced: bool,
) -> VolumeBackup:
    return VolumeBackup(disk, export, server, bits, changed, quiesced)


async def enable_dirty_bitmap_migration(qmp: QmpChannel) -> None:
    """Persistent bitmaps follow the VM in a live migration only with this capability on."""
    await qmp.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "dirty-bitmaps", "state": True}]},
    )


@dataclass(frozen=True)
class DiskView:
    """One disk of the VM as Enable plans it: libvirt's view, QEMU's device and its chain."""

    disk: DiskInfo
    dev: blockdev.BlockDevice
    chain: list[Layer]  # top first

    @property
    def top(self) -> Layer:
        return self.chain[0]


async def read_disks(qmp: QmpChannel, vm: VmInfo) -> list[DiskView]:
    """Every disk of the VM with its backing chain and bitmaps, as QEMU holds them now."""
    devices = await blockdev.block_devices(qmp)
    nodes = await blockdev.chain_nodes(qmp)
    views: list[DiskView] = []
    for disk in vm.disks:
        dev = devices.get(disk.alias)
        if dev is None or not dev.node_name:
            raise HypervisorError(f"disk {disk.volume_uuid} ({disk.alias}) not found in QEMU")
        if dev.driver == "copy-before-write":
            raise OperationError(f"disk {disk.volume_uuid} is already being exported")
        chain = blockdev.disk_chain(nodes, dev.node_name)
        if not chain:
            raise HypervisorError(f"disk {disk.volume_uuid}: node {dev.node_name} not found")
        views.append(DiskView(disk, dev, chain))
    return views


async def refuse_block_jobs(qmp: QmpChannel, vm_uuid: str) -> None:
    """A commit, stream or copy moves bitmaps between layers when it ends: a checkpoint cut in
    the middle of one could miss them. Refused with the job named; retried once it ended."""
    jobs = await blockdev.foreign_block_jobs(qmp)
    if jobs:
        raise OperationError(
            f"VM [uuid: {vm_uuid}] has a block job running ({', '.join(jobs)}): "
            "retry when it has ended"
        )


def found_on(task_uuid: str, views: list[DiskView]) -> list[Checkpoint]:
    """The task's checkpoints as the running VM's disks hold them, over every layer."""
    chains = {
        v.disk.volume_uuid: [(layer.filename, list(layer.bitmaps)) for layer in v.chain]
        for v in views
    }
    sizes = {v.disk.volume_uuid: v.dev.virtual_size for v in views}
    return found_checkpoints(task_uuid, chains, sizes, datetime.now(UTC))


async def adopt_unknown_checkpoints(
    store: Store, task_uuid: str, views: list[DiskView]
) -> list[str]:
    """Bitmaps named like this task's checkpoints that the database does not know (an Enable
    whose transaction ran but whose reply was lost, or a database restored from an older
    copy) join the chain, not handed out: merged through, never a default base, never lost."""
    known = await store.run(SyncStore.known_checkpoint_names, task_uuid)
    adopted = [c for c in found_on(task_uuid, views) if c.name not in known]
    for cp in adopted:
        await store.run(SyncStore.adopt_checkpoint, cp)
        log.warning(
            "task %s: checkpoint %s found on disks %s but not in the database: adopted",
            task_uuid,
            cp.name,
            ", ".join(sorted(cp.volumes)),
        )
    return [c.name for c in adopted]


async def _checkpoint_in_qemu(qmp: QmpChannel, exports: list[VolumeExport], name: str) -> bool:
    """Whether bitmap `name` exists on any disk's top: the checkpoint transaction ran."""
    nodes = await blockdev.named_nodes(qmp)
    return any(name in blockdev.bitmaps_of(nodes.get(e.device_node)) for e in exports)


async def enable(
    ctx: EnableContext, since_name: str | None, lost: str | None = None
) -> list[VolumeBackup]:
    """Cut a checkpoint on every disk of the VM and export each disk's point-in-time view with
    the changes since `since_name` (None: the latest checkpoint handed out), merged over every
    layer of each disk's backing chain. Returns VolumeCbtBackupInfos. On failure everything
    made is removed again and the checkpoint chain stays whole."""
    cfg, store, qmp, task_uuid = ctx.config, ctx.store, ctx.qmp, ctx.task_uuid
    if not ctx.vm.disks:
        raise OperationError(f"VM [uuid: {ctx.vm.vm_uuid}] has no disk with a volume uuid (serial)")
    await refuse_block_jobs(qmp, ctx.vm.vm_uuid)
    views = await read_disks(qmp, ctx.vm)
    ctx.notes.extend(
        f"adopted checkpoint {n} found on the disks"
        for n in await adopt_unknown_checkpoints(store, task_uuid, views)
    )
    checkpoints = await store.run(SyncStore.checkpoints, task_uuid)
    removed = await store.run(SyncStore.removed_checkpoint_names, task_uuid)
    pending = await store.run(SyncStore.pending_breaks, task_uuid)
    plans: list[DiskPlan] = []
    breaks: dict[str, str] = {}  # disks whose tracking broke since the latest checkpoint
    for v in views:
        vol = v.disk.volume_uuid
        why = pending.get(vol) or tracking_break(vol, checkpoints, v.chain)
        if why is not None:
            breaks[vol] = why
        plan = plan_disk(
            vol, checkpoints, since_name, v.chain, removed, v.dev.virtual_size, pending.get(vol)
        )
        if lost is not None:
            # every bitmap of the task is suspect: no incremental until a new full
            plan = DiskPlan(v.disk.volume_uuid, "full", None, (), lost, plan.freeze)
        plans.append(plan)

    # Bitmaps that cannot be trusted or were left behind, on the writable top: inconsistent
    # ones (unclean shutdown) and temporary ones from an interrupted Enable.
    for v in views:
        for b in v.top.bitmaps.values():
            if (ours(task_uuid, b.name) and b.inconsistent) or (
                is_temp(task_uuid, b.name) and not b.busy
            ):
                log.warning(
                    "removing bitmap %s on %s (%s)",
                    b.name,
                    v.top.node,
                    "inconsistent" if b.inconsistent else "left over",
                )
                await blockdev.remove_bitmap(qmp, v.top.node, b.name)

    seq = await store.run(SyncStore.next_checkpoint_seq, task_uuid)
    new_name = checkpoint_name(task_uuid, seq)
    tmp_name = temp_bitmap_name(task_uuid, seq)
    exports: list[VolumeExport] = []
    for v, plan in zip(views, plans, strict=True):
        exports.append(
            VolumeExport(
                task_uuid=task_uuid,
                volume_uuid=v.disk.volume_uuid,
                checkpoint=new_name,
                device_node=v.top.node,
                scratch_node=scratch_node_name(v.disk.volume_uuid),
                scratch_path=str(cfg.scratch_dir / f"{task_uuid}-{v.disk.volume_uuid}.qcow2"),
                job_id=f"cbtjob-{v.disk.volume_uuid}",
                export_id=f"cbtexp-{v.disk.volume_uuid}",
                temp_bitmap=tmp_name if plan.mode == "incremental" else None,
                mode=plan.mode,
                since=plan.since,
                reason=plan.reason,
                size=v.dev.virtual_size,
                granularity=_granularity(v.chain, plan),
                phase="planned",
            )
        )

    def record_plan(s: SyncStore) -> None:
        with s._tx():
            s.save_exports(exports, None, None)
            s.add_checkpoint(
                task_uuid,
                seq,
                new_name,
                [e.volume_uuid for e in exports],
                {e.volume_uuid: e.size for e in exports},
                {v.disk.volume_uuid: v.top.filename for v in views},
                breaks,
            )

    await store.run(record_plan)

    committed = False
    sent = False  # the checkpoint transaction went to QEMU (its outcome may be unknown)
    freeze = Freeze()
    try:
        await ctx.at("enable:planned")
        await asyncio.gather(*(create_scratch(Path(e.scratch_path), e.size) for e in exports))
        for e in exports:
            await qmp.execute(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": e.scratch_node,
                    "discard": "unmap",
                    "file": {"driver": "file", "filename": e.scratch_path},
                    "backing": e.device_node,
                },
            )
        await ctx.at("enable:scratch")

        actions: list[dict[str, Any]] = []
        for e, plan, view in zip(exports, plans, views, strict=True):
            actions.append(
                {
                    "type": "blockdev-backup",
                    "data": {
                        "job-id": e.job_id,
                        "device": e.device_node,
                        "target": e.scratch_node,
                        "sync": "none",
                    },
                }
            )
            for name in _to_freeze(task_uuid, view.top, plan):
                actions.append(
                    {
                        "type": "block-dirty-bitmap-disable",
                        "data": {"node": e.device_node, "name": name},
                    }
                )
            actions.append(
                {
                    "type": "block-dirty-bitmap-add",
                    "data": {"node": e.device_node, "name": new_name, "persistent": True},
                }
            )
        sent = True
        await _checkpoint_transaction(ctx, qmp, actions, freeze)
        committed = True
        if pending:  # recorded in the checkpoint just cut
            await store.run(SyncStore.clear_pending_breaks, task_uuid)
        ctx.notes.insert(0, freeze.note())
        await enable_dirty_bitmap_migration(qmp)
        await ctx.at("enable:checkpoint")

        new_granularity: dict[str, int] = {}
        after = await blockdev.named_nodes(qmp)
        for e in exports:
            state = blockdev.bitmaps_of(after.get(e.device_node)).get(new_name)
            new_granularity[e.volume_uuid] = state.granularity if state else 65536

        for e, plan in zip(exports, plans, strict=True):
            if e.temp_bitmap is None:
                continue
            await qmp.execute(
                "block-dirty-bitmap-add",
                {
                    "node": e.device_node,
                    "name": e.temp_bitmap,
                    "granularity": e.granularity,
                    "disabled": True,
                    "persistent": False,
                },
            )
            await qmp.execute(
                "block-dirty-bitmap-merge",
                {
                    "node": e.device_node,
                    "target": e.temp_bitmap,
                    "bitmaps": [{"node": node, "name": name} for node, name in plan.merge],
                },
            )
        exports = [
            e
            if e.temp_bitmap
            else VolumeExport(**{**e.__dict__, "granularity": new_granularity[e.volume_uuid]})
            for e in exports
        ]
        await ctx.at("enable:bitmaps")

        server = await start_nbd_server(cfg, store, qmp, task_uuid, ctx.vm.vm_uuid)
        await ctx.at("enable:nbd-server")

        for e in exports:
            args: dict[str, Any] = {
                "type": "nbd",
                "id": e.export_id,
                "node-name": e.scratch_node,
                "name": e.volume_uuid,
                "writable": False,
            }
            if e.temp_bitmap:
                args["bitmaps"] = [{"node": e.device_node, "name": e.temp_bitmap}]
            await qmp.execute("block-export-add", args)
        await ctx.at("enable:exported")

        async def dirty_map(e: VolumeExport) -> tuple[bytes, int]:
            if not e.temp_bitmap:
                return full_bitmap(e.size, e.granularity), e.size
            address = nbd_address(cfg, server, e.volume_uuid)
            extents = await asyncio.to_thread(
                nbdio.dirty_extents, address, f"qemu:dirty-bitmap:{e.temp_bitmap}"
            )
            return (
                bitmap_from_extents(extents, e.size, e.granularity),
                changed_bytes(extents, e.size, e.granularity),
            )

        # one NBD connection per disk, all at once: a TCP connect to QEMU's NBD server costs
        # ~90 ms of protocol round trips here, whatever the disk's size
        maps = await asyncio.gather(*(dirty_map(e) for e in exports))
        infos = [
            _volume_info(v.disk, e, server, bits, changed, freeze.quiesced)
            for e, v, (bits, changed) in zip(exports, views, maps, strict=True)
        ]

        def exported(s: SyncStore) -> None:
            with s._tx():
                s.save_exports(exports, server.host, server.port, server)
                s.set_export_phase(task_uuid, "exported")
                s.sync_volume_refs(task_uuid, [v.disk.volume_uuid for v in views])

        await store.run(exported)
    except BaseException as exc:
        now = qmp
        if isinstance(exc, QmpInterrupted) and ctx.reconnect is not None:
            with contextlib.suppress(Exception):
                now = await ctx.reconnect()
        if sent and not committed:
            # The transaction's reply was lost or it failed: read back whether it ran. If it
            # did, the new bitmap records and the previous one is frozen: keep the checkpoint.
            # Unreadable: forget it here; the next Enable adopts it if it is on the disks.
            with contextlib.suppress(Exception):
                committed = await _checkpoint_in_qemu(now, exports, new_name)
            if committed:
                log.warning("task %s: checkpoint %s ran in QEMU: kept", task_uuid, new_name)
        # Keep the new checkpoint if the transaction ran (the chain is whole); else forget it.
        with contextlib.suppress(Exception):
            await teardown_exports(ctx.config, store, now, task_uuid, force=True)
        if not committed:
            with contextlib.suppress(Exception):
                await store.run(SyncStore.drop_checkpoint, task_uuid, new_name)
        raise

    if lost is not None:
        # a fresh chain starts here; the checkpoints before it cannot give changes any more
        for old in checkpoints:
            await store.run(SyncStore.mark_checkpoint_removed, task_uuid, old.name)
        await store.run(SyncStore.set_tracking_lost, task_uuid, None)
    await apply_retention(cfg, store, qmp, task_uuid)
    return infos


async def _checkpoint_transaction(
    ctx: EnableContext, qmp: QmpChannel, actions: list[dict[str, Any]], freeze: Freeze
) -> None:
    """Run the checkpoint transaction, inside a freeze of the guest's filesystems when asked
    and possible: the guest is frozen for the transaction only, and thawed on every path (a
    transaction slower than the freeze timeout is given up on: its outcome is then read back
    like a lost reply's)."""
    loop = asyncio.get_running_loop()
    if ctx.quiesce != "never" and ctx.guest is not None:
        start = loop.time()
        try:
            await ctx.guest.freeze()
            freeze.quiesced = True
        except GuestAgentUnavailable as e:
            if ctx.quiesce == "always":
                raise OperationError(
                    f"quiesce was asked for but VM [uuid: {ctx.vm.vm_uuid}] has no guest agent "
                    f"to freeze its filesystems: {e.message}"
                ) from None
            freeze.why_not = f"no guest agent: {e.message}"
        if freeze.quiesced:
            try:
                await asyncio.wait_for(
                    qmp.execute("transaction", {"actions": actions}), ctx.freeze_timeout
                )
            except TimeoutError:
                raise QmpInterrupted(
                    f"the checkpoint transaction did not answer within the freeze timeout "
                    f"({ctx.freeze_timeout:.0f} s)"
                ) from None
            finally:
                try:
                    await thaw(ctx.guest)
                finally:
                    freeze.millis = (loop.time() - start) * 1000
            return
    elif ctx.quiesce == "never":
        freeze.why_not = "quiesce not asked for"
    await qmp.execute("transaction", {"actions": actions})


async def thaw(guest: GuestFreezer, attempts: int = 3) -> None:
    """Thaw the guest, retried: a guest left frozen stalls every write it makes."""
    for attempt in range(1, attempts + 1):
        try:
            await guest.thaw()
            return
        except GuestAgentUnavailable:
            return  # no agent (any more): nothing of ours is frozen there
        except HypervisorError as e:
            if attempt == attempts:
                raise HypervisorError(f"thawing the guest failed: {e.message}") from None
            log.warning("thawing the guest failed (attempt %d): %s", attempt, e.message)
            await asyncio.sleep(0.1 * attempt)


def _to_freeze(task_uuid: str, top: Layer, plan: DiskPlan) -> list[str]:
    """The recording bitmaps of the task on the top to disable in the checkpoint transaction:
    the latest checkpoint's, and any other still recording (an adopted one whose transaction
    lost its reply recorded on beside the next): only the new one may record afterwards."""
    names = [plan.freeze] if plan.freeze else []
    for b in top.bitmaps.values():
        if (
            b.name != plan.freeze
            and checkpoint_seq(task_uuid, b.name) is not None
            and b.recording
            and not b.inconsistent
            and not b.busy
        ):
            names.append(b.name)
    return names


def _granularity(chain: list[Layer], plan: DiskPlan) -> int:
    """The change set's granularity: that of the newest bitmap it merges (QEMU's default, the
    cluster size, for a full: replaced by the new bitmap's once it exists)."""
    layers = {layer.node: layer for layer in chain}
    for node, name in plan.merge:
        state = layers[node].bitmaps.get(name) if node in layers else None
        if state is not None:
            return state.granularity
    return 65536


async def verify_checkpoints(
    store: Store, qmp: QmpChannel, task_uuid: str, vm: VmInfo
) -> list[str]:
    """After a VM start: remove the task's inconsistent bitmaps and find the latest one
    missing, over every layer of each disk's chain. Either means QEMU stopped uncleanly; the
    task is then marked so its next Enable is a full. Returns the bitmaps found broken. (A
    chain changed offline, e.g. a new top from qemu-img, is judged per disk at the next
    Enable.)"""
    checkpoints = await store.run(SyncStore.checkpoints, task_uuid)
    devices = await blockdev.block_devices(qmp)
    nodes = await blockdev.chain_nodes(qmp)
    broken: list[str] = []
    breaks: dict[str, str] = {}
    for disk in vm.disks:
        dev = devices.get(disk.alias)
        if dev is None or dev.driver == "copy-before-write":
            continue
        chain = blockdev.disk_chain(nodes, dev.node_name)
        for layer in chain:
            for b in layer.bitmaps.values():
                if ours(task_uuid, b.name) and b.inconsistent:
                    if not layer.read_only:
                        await blockdev.remove_bitmap(qmp, layer.node, b.name)
                    broken.append(f"{disk.volume_uuid}/{b.name} (inconsistent)")
        # The latest checkpoint's bitmap is gone from every layer only when QEMU did not close
        # the image (a bitmap added at runtime reaches the file on a clean close). An older one
        # may be gone for a good reason (a stream drops a base's frozen bitmaps): each Enable
        # judges that per disk.
        present = {name for layer in chain for name in layer.bitmaps}
        mine = [cp for cp in checkpoints if disk.volume_uuid in cp.volumes]
        if mine and mine[-1].name not in present:
            broken.append(f"{disk.volume_uuid}/{mine[-1].name} (missing)")
        # a top without tracking (a snapshot made with qemu-img while the VM was off): noted
        # now, so that a stream or copy before the next Enable cannot make it look whole
        why = tracking_break(disk.volume_uuid, checkpoints, chain)
        if why is not None:
            breaks[disk.volume_uuid] = f"{why} (seen at VM start)"
    if broken:
        log.warning("task %s: %s: %s", task_uuid, TRACKING_LOST, ", ".join(broken))
        await store.run(SyncStore.set_tracking_lost, task_uuid, TRACKING_LOST)
    if breaks:
        log.warning("task %s: tracking interrupted: %s", task_uuid, breaks)
        await store.run(SyncStore.add_pending_breaks, task_uuid, breaks)
    await enable_dirty_bitmap_migration(qmp)
    return broken


async def apply_retention(cfg: Config, store: Store, qmp: QmpChannel, task_uuid: str) -> None:
    """Remove checkpoints beyond `[checkpoints] keep`, oldest first, from every layer of every
    disk. A bitmap left on a layer that could not be written is harmless (never merged again)
    and logged."""
    checkpoints = await store.run(SyncStore.checkpoints, task_uuid)
    victims = retention_victims(checkpoints, cfg.checkpoints.keep)
    if not victims:
        return
    names = {v.name for v in victims}
    _removed, left = await remove_bitmaps(qmp, lambda n: n in names)
    for victim in victims:
        await store.run(SyncStore.mark_checkpoint_removed, task_uuid, victim.name)
        log.info("retention: removed checkpoint %s of task %s", victim.name, task_uuid)
    if left:
        log.warning("retention: bitmaps left on layers that could not be written: %s", left)


async def teardown_exports(
    cfg: Config,
    store: Store,
    qmp: QmpChannel,
    task_uuid: str,
    *,
    force: bool,
    step: StepHook | None = None,
) -> None:
    """End a task's exports: NBD exports, the NBD server, fleecing jobs, scratch nodes and
    files, temporary bitmaps. Idempotent: safe after a crash at any point of Enable or Disable."""
    exports = await store.run(SyncStore.exports, task_uuid)
    server = await store.run(SyncStore.nbd_server, task_uuid)
    await blockdev.delete_exports(qmp, [e.export_id for e in exports], force=force)
    if step:
        await step("disable:exports")
    await blockdev.stop_nbd_server(qmp)
    if server.socket is not None:
        await asyncio.to_thread(blockdev.remove_socket_file, server.socket)
    if server.tls or cfg.nbd.tls_cert_dir is not None:
        await blockdev.delete_object(qmp, TLS_CREDS_ID)
    await blockdev.cancel_jobs(qmp, [e.job_id for e in exports])
    if step:
        await step("disable:jobs")
    present = await blockdev.named_nodes(qmp)
    for e in exports:
        if e.scratch_node in present:
            await blockdev.delete_node(qmp, e.scratch_node)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, e.scratch_path)
        if e.temp_bitmap:
            await blockdev.remove_bitmap(qmp, e.device_node, e.temp_bitmap)
    if step:
        await step("disable:scratch")
    await store.run(SyncStore.clear_exports, task_uuid)


async def remove_bitmaps(
    qmp: QmpChannel, wanted: Callable[[str], bool]
) -> tuple[list[str], list[str]]:
    """Remove every bitmap whose name is `wanted` from every node of the VM, backing layers
    included: a read-only layer is reopened read-write for it (as libvirt does) and read-only
    again. Returns ('node/name' removed, 'node/name: why' left)."""
    nodes = await blockdev.chain_nodes(qmp)
    layers: dict[str, tuple[Layer, str | None]] = {}
    for dev in (await blockdev.block_devices(qmp)).values():
        chain = blockdev.disk_chain(nodes, dev.node_name)
        for i, layer in enumerate(chain):
            layers.setdefault(
                layer.node, (layer, chain[i + 1].node if i + 1 < len(chain) else None)
            )
    removed: list[str] = []
    left: list[str] = []
    for node in nodes:
        node_name = str(node.get("node-name"))
        names = [n for n in blockdev.bitmaps_of(node) if wanted(n)]
        if not names:
            continue
        reopened = False
        if node.get("ro"):
            known = layers.get(node_name)
            file_node = blockdev.file_child(nodes, known[0]) if known else None
            if known is None or file_node is None:
                left += [
                    f"{node_name}/{n}: read-only layer outside the disks' chains" for n in names
                ]
                continue
            layer, backing = known
            try:
                await blockdev.reopen(
                    qmp, node_name, layer.driver, file_node, backing, read_only=False
                )
                reopened = True
            except QmpCommandError as e:
                left += [f"{node_name}/{n}: cannot reopen read-write: {e.reply}" for n in names]
                continue
        try:
            for name in names:
                try:
                    if await blockdev.remove_bitmap(qmp, node_name, name):
                        removed.append(f"{node_name}/{name}")
                except QmpCommandError as e:
                    left.append(f"{node_name}/{name}: {e.reply}")
        finally:
            if reopened:
                layer, backing = layers[node_name]
                await blockdev.reopen(
                    qmp, node_name, layer.driver, str(file_node), backing, read_only=True
                )
    return removed, left


async def remove_task_bitmaps(qmp: QmpChannel, task_uuid: str) -> list[str]:
    """Remove every bitmap of the task from every layer of every disk; returns 'node/name'
    removed. Raises HypervisorError naming what could not be removed."""
    removed, left = await remove_bitmaps(qmp, lambda n: ours(task_uuid, n) or is_temp(task_uuid, n))
    if left:
        raise HypervisorError(
            f"bitmaps of task {task_uuid} could not be removed: {'; '.join(left)}"
        )
    return removed
