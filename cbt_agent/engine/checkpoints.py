"""Cutting checkpoints and exposing them: the Enable executor against one VM.

`plan.plan_enable` decides every name and command from the recorded state and what QEMU
reports; this module records that plan in SQLite before the first command, so a crash at any
point can be reconciled from the database, then runs it, and undoes what it made on failure.
Beside it: `exports` (NBD server, teardown), `quiesce` (guest freeze), `tracking` (bitmaps
checked at VM start, retention, removal).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbt_agent.config import Config
from cbt_agent.dirtymap import DirtyMap, full_bitmap
from cbt_agent.engine import scratch
from cbt_agent.engine.exports import (
    export_psk,
    nbd_address,
    private_dir,
    read_changes,
    start_nbd_server,
    teardown_exports,
)
from cbt_agent.engine.plan import (
    DEFAULT_GRANULARITY,
    DiskView,
    found_on,
    plan_enable,
    refuse_untrackable,
    with_new_granularity,
)
from cbt_agent.engine.quiesce import Freeze, GuestFreezer, checkpoint_transaction
from cbt_agent.engine.results import VolumeBackup
from cbt_agent.engine.steps import StepHook as StepHook
from cbt_agent.engine.tracking import apply_retention
from cbt_agent.errors import HypervisorError, OperationError, QmpCommandError, QmpInterrupted
from cbt_agent.hypervisor.libvirt import DiskInfo, VmInfo
from cbt_agent.model import Checkpoint
from cbt_agent.qemu import (
    bitmaps,
    blockdev,
    empty_image,
    fds,
    fleece,
    images,
    nbd_server,
    transaction,
)
from cbt_agent.qemu.psk import Psk
from cbt_agent.qemu.qmp import QmpChannel, execute_all, execute_many, paused_seconds
from cbt_agent.store import NbdServer, Store, SyncStore, VolumeExport

log = logging.getLogger(__name__)

PAUSED = "paused"  # export phase while the agent holds the VM paused for the cut


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
    found_inconsistent: int = 0  # the task's bitmaps QEMU reported inconsistent (removed)
    # the disks as the caller just read them under the VM's lock (None: read them here)
    views: list[DiskView] | None = None
    foreign_jobs: list[str] = field(default_factory=list)  # read with `views`
    paused_ms: float | None = None  # how long the VM was paused for the cut (None: not paused)
    held_paused: bool = False  # the agent paused the VM and has not seen it run again
    room_note: str = ""  # the scratch budget and the room for it, for the task's history

    async def at(self, name: str) -> None:
        if self.step is not None:
            await self.step(name)


async def create_scratch(path: Path, size: int) -> None:
    """The empty qcow2 the disk's filter copies into, owner-only (it holds guest data from
    before the checkpoint); written by the agent, or by qemu-img for a size it cannot."""

    def write() -> bool:
        private_dir(path.parent)
        try:
            empty_image.write_empty_qcow2(str(path), size)
        except ValueError:
            return False
        return True

    if not await asyncio.to_thread(write):
        await images.create(str(path), size)
        await asyncio.to_thread(os.chmod, path, 0o600)


async def pass_scratch(qmp: QmpChannel, task_uuid: str, export: VolumeExport) -> str:
    """Hand QEMU the scratch file as a descriptor the agent opened (QEMU may run as a user
    that cannot reach the agent's 0700 scratch directory; the file stays the agent's, 0600).
    Returns the name QEMU opens it by (`/dev/fdset/<id>`), for the scratch node's filename."""
    fd = await asyncio.to_thread(fds.open_file, export.scratch_path)
    try:
        passed = await fds.add_fd(qmp, fd, fds.opaque(task_uuid, f"scratch:{export.scratch_node}"))
    finally:
        os.close(fd)
    return passed.fdset_path


def _volume_info(
    disk: DiskInfo,
    export: VolumeExport,
    server: NbdServer,
    bits: bytes,
    changed: int,
    quiesced: bool,
    key: Psk | None,
    budget: int,
    dirty: DirtyMap | None,
) -> VolumeBackup:
    return VolumeBackup(disk, export, server, bits, changed, quiesced, key, budget, dirty)


async def read_disks(qmp: QmpChannel, vm: VmInfo) -> list[DiskView]:
    """Every disk of the VM with its backing chain and bitmaps, as QEMU holds them now."""
    devices, nodes = await blockdev.devices_and_chains(qmp)
    return views_of(vm, devices, nodes)


async def read_disks_and_jobs(qmp: QmpChannel, vm: VmInfo) -> tuple[list[DiskView], list[str]]:
    """`read_disks` and the block jobs not the agent's (`blockdev.foreign_jobs_of`), read
    in one round trip."""
    jobs, blocks, nodes = await execute_all(
        qmp,
        [
            blockdev.BLOCK_JOBS_QUERY,
            ("query-block", None),
            ("query-named-block-nodes", {"flat": False}),
        ],
    )
    views = views_of(vm, blockdev.devices_of(blocks), list(nodes))
    return views, blockdev.foreign_jobs_of(jobs)


def views_of(
    vm: VmInfo, devices: dict[str, blockdev.BlockDevice], nodes: list[dict[str, Any]]
) -> list[DiskView]:
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


def refuse_block_jobs(jobs: list[str], vm_uuid: str) -> None:
    """A commit, stream or copy moves bitmaps between layers when it ends: a checkpoint cut in
    the middle of one could miss them. Refused with the job named (`jobs`: the foreign block
    jobs running); retried once it ended."""
    if jobs:
        raise OperationError(
            f"VM [uuid: {vm_uuid}] has a block job running ({', '.join(jobs)}): "
            "retry when it has ended"
        )


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


async def _cut(
    ctx: EnableContext, qmp: QmpChannel, views: list[DiskView], actions: Sequence[dict[str, Any]]
) -> None:
    """The point in time: each disk's device onto its copy-before-write filter, then the bitmap
    transaction, with a running VM paused in between so every disk and bitmap shares one
    instant. The commands go to QEMU back to back (`stop` … `cont`: QEMU runs them in order,
    no round trip between them), so the pause lasts QEMU's own work on them; `cont` runs
    whatever failed before it. The pause is recorded before it starts (an agent that dies in it
    resumes the VM at restart); a lost reply leaves it to the rollback to resume the VM."""
    was_running = await fleece.running(qmp)
    commands: list[tuple[str, dict[str, Any] | None]] = [
        fleece.set_drive_command(v.dev.qdev, fleece.filter_node_name(v.disk.volume_uuid))
        for v in views
    ]
    commands.append(transaction.command(actions))
    if was_running:
        commands = [("stop", None), *commands, ("cont", None)]
        await ctx.store.run(SyncStore.set_export_phase, ctx.task_uuid, PAUSED)
        ctx.held_paused = True
    start = time.perf_counter()
    try:
        replies = await execute_many(qmp, commands)
    except BaseException:
        # cut short (a lost reply, the freeze timeout): the VM runs again before anything
        # else, the guest's thaw included (a paused guest cannot be thawed)
        if was_running:
            try:
                await fleece.resume(qmp)
                ctx.held_paused = False
            except Exception as e:  # the rollback tries again on a new connection
                log.warning("task %s: resuming the VM after the cut: %s", ctx.task_uuid, e)
        raise
    if was_running:
        # QEMU's own account of the pause where the channel has events; else the batch's time
        stood = paused_seconds(qmp)
        ctx.paused_ms = (stood if stood is not None else time.perf_counter() - start) * 1000
        if isinstance(replies[-1], QmpCommandError):
            raise replies[-1]  # the VM did not run again: the rollback tries once more
        ctx.held_paused = False
        await ctx.store.run(SyncStore.set_export_phase, ctx.task_uuid, "planned")
    for reply in replies:
        if isinstance(reply, QmpCommandError):
            raise reply


async def _checkpoint_in_qemu(qmp: QmpChannel, exports: list[VolumeExport], name: str) -> bool:
    """Whether bitmap `name` exists on any disk's top: the checkpoint transaction ran."""
    nodes = await blockdev.named_nodes(qmp)
    return any(name in bitmaps.bitmaps_of(nodes.get(e.device_node)) for e in exports)


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
    if ctx.views is not None:
        views, jobs = ctx.views, ctx.foreign_jobs
    else:
        views, jobs = await read_disks_and_jobs(qmp, ctx.vm)
    refuse_block_jobs(jobs, ctx.vm.vm_uuid)
    refuse_untrackable(views)
    ctx.notes.extend(
        f"adopted checkpoint {n} found on the disks"
        for n in await adopt_unknown_checkpoints(store, task_uuid, views)
    )

    def chain(s: SyncStore) -> tuple[int, list[Checkpoint], list[str], dict[str, str]]:
        return (
            s.next_checkpoint_seq(task_uuid),
            s.checkpoints(task_uuid),
            s.removed_checkpoint_names(task_uuid),
            s.pending_breaks(task_uuid),
        )

    seq, recorded, removed, pending = await store.run(chain)  # one trip to the store thread
    plan = plan_enable(
        task_uuid,
        seq,
        views,
        recorded,
        scratch_dir=cfg.scratch_dir,
        since_name=since_name,
        removed=removed,
        pending=pending,
        lost=lost,
    )
    for stale in plan.stale:
        log.warning("removing bitmap %s on %s (%s)", stale.name, stale.node, stale.why)
        if stale.why == "inconsistent":
            ctx.found_inconsistent += 1
        await bitmaps.remove_bitmap(qmp, stale.node, stale.name)

    exports = list(plan.exports)

    def record_plan(s: SyncStore) -> None:
        with s._tx():
            s.save_exports(exports, None, None)
            s.add_checkpoint(
                task_uuid,
                plan.seq,
                plan.checkpoint,
                plan.volumes,
                plan.sizes,
                dict(plan.tops),
                dict(plan.breaks),
            )

    await store.run(record_plan)

    committed = False
    sent = False  # the checkpoint transaction went to QEMU (its outcome may be unknown)
    freeze = Freeze()
    try:
        await ctx.at("enable:planned")
        await asyncio.gather(*(create_scratch(Path(e.scratch_path), e.size) for e in exports))
        # each descriptor goes with its own add-fd; the nodes on them go in one round trip
        nodes: list[tuple[str, dict[str, Any] | None]] = []
        for e in exports:
            scratch_file = await pass_scratch(qmp, task_uuid, e)
            nodes.append(fleece.add_command(fleece.scratch_args(e.scratch_node, scratch_file)))
            nodes.append(
                fleece.add_command(
                    fleece.filter_args(
                        fleece.filter_node_name(e.volume_uuid),
                        e.device_node,
                        e.scratch_node,
                        cfg.checkpoints.cbw_timeout,
                    )
                )
            )
        # and, with them, the capability that makes the bitmaps follow a live migration
        await execute_all(qmp, [*nodes, bitmaps.migration_command()])
        await ctx.at("enable:scratch")

        sent = True
        await checkpoint_transaction(
            lambda: _cut(ctx, qmp, views, plan.actions),
            freeze,
            vm_uuid=ctx.vm.vm_uuid,
            guest=ctx.guest,
            quiesce=ctx.quiesce,
            freeze_timeout=ctx.freeze_timeout,
        )
        committed = True
        if plan.clears_pending:  # recorded in the checkpoint just cut
            await store.run(SyncStore.clear_pending_breaks, task_uuid)
        # the history's reason: the scratch, the pause, the freeze, then what was adopted
        head = [ctx.room_note] if ctx.room_note else []
        if ctx.paused_ms is not None:
            head.append(f"VM paused {ctx.paused_ms:.1f} ms for the cut")
        ctx.notes[0:0] = [*head, freeze.note()]
        await ctx.at("enable:checkpoint")

        # one round trip: each disk's snapshot-access node, the new bitmaps' granularity, and
        # each change set on the access node (QEMU's NBD server looks for an export's bitmaps
        # on the exported node and its filters only)
        access = {e.device_node: fleece.access_node_name(e.volume_uuid) for e in exports}
        views_batch: list[tuple[str, dict[str, Any] | None]] = [
            fleece.add_command(
                fleece.access_args(
                    fleece.access_node_name(e.volume_uuid), fleece.filter_node_name(e.volume_uuid)
                )
            )
            for e in exports
        ]
        views_batch.append(blockdev.named_nodes_command())
        for m in plan.merges:
            views_batch.append(
                (
                    "block-dirty-bitmap-add",
                    bitmaps.temp_bitmap_args(access[m.node], m.target, m.granularity),
                )
            )
            views_batch.append(
                (
                    "block-dirty-bitmap-merge",
                    bitmaps.merge_args(access[m.node], m.target, m.sources),
                )
            )
        batch_replies = await execute_all(qmp, views_batch)
        after = blockdev.by_node_name(batch_replies[len(exports)])
        new_granularity: dict[str, int] = {}
        for e in exports:
            state = bitmaps.bitmaps_of(after.get(e.device_node)).get(plan.checkpoint)
            new_granularity[e.volume_uuid] = state.granularity if state else DEFAULT_GRANULARITY
        exports = with_new_granularity(exports, new_granularity)
        await ctx.at("enable:bitmaps")

        server = await start_nbd_server(cfg, store, qmp, task_uuid, ctx.vm.vm_uuid, by_fd=True)
        key = await export_psk(cfg, server, task_uuid)
        await ctx.at("enable:nbd-server")

        adds: list[tuple[str, dict[str, Any] | None]] = []
        for e in exports:
            node = fleece.access_node_name(e.volume_uuid)
            bitmap = (node, e.temp_bitmap) if e.temp_bitmap else None
            adds.append(
                (
                    "block-export-add",
                    nbd_server.export_args(e.export_id, node, e.volume_uuid, bitmap, trim=True),
                )
            )
        await execute_all(qmp, adds)
        await ctx.at("enable:exported")

        async def dirty_map(e: VolumeExport) -> tuple[bytes, int, DirtyMap | None]:
            if not e.temp_bitmap:
                return full_bitmap(e.size, e.granularity), e.size, None
            address = nbd_address(cfg, server, e.volume_uuid, key)
            context = f"qemu:dirty-bitmap:{e.temp_bitmap}"
            return await asyncio.to_thread(read_changes, address, context, e.size, e.granularity)

        # one NBD connection per disk, all at once: a TCP connect to QEMU's NBD server costs
        # ~90 ms of protocol round trips here, whatever the disk's size
        maps = await asyncio.gather(*(dirty_map(e) for e in exports))
        budgets = scratch.budgets(cfg.checkpoints, (e.size for e in exports))
        infos = [
            _volume_info(v.disk, e, server, bits, changed, freeze.quiesced, key, budget, dirty)
            for e, v, (bits, changed, dirty), budget in zip(
                exports, views, maps, budgets, strict=True
            )
        ]

        def exported(s: SyncStore) -> None:
            with s._tx():
                s.save_exports(exports, server.host, server.port, server)
                s.set_export_phase(task_uuid, "exported")
                s.sync_volume_refs(task_uuid, [v.disk.volume_uuid for v in views])

        await store.run(exported)
    except BaseException as exc:
        await _roll_back(ctx, exc, exports, plan.checkpoint, sent=sent, committed=committed)
        raise

    if lost is not None:
        # a fresh chain starts here; the checkpoints before it cannot give changes any more
        for old in plan.superseded:
            await store.run(SyncStore.mark_checkpoint_removed, task_uuid, old)
        await store.run(SyncStore.set_tracking_lost, task_uuid, None)
    await apply_retention(cfg, store, qmp, task_uuid)
    return infos


async def _roll_back(
    ctx: EnableContext,
    exc: BaseException,
    exports: list[VolumeExport],
    name: str,
    *,
    sent: bool,
    committed: bool,
) -> None:
    """After a failed Enable: remove everything it made, and keep checkpoint `name` in the
    chain if the transaction ran (the new bitmap records and the previous one is frozen:
    forgetting it would lose the writes since), else forget it."""
    store, task_uuid = ctx.store, ctx.task_uuid
    now = ctx.qmp
    if isinstance(exc, QmpInterrupted) and ctx.reconnect is not None:
        with contextlib.suppress(Exception):
            now = await ctx.reconnect()
    if ctx.held_paused:
        # the cut failed with the VM paused: it runs again before anything else
        try:
            if not await fleece.running(now):
                await fleece.resume(now)
            ctx.held_paused = False
        except Exception as e:  # reconcile resumes it at the next start
            log.error("task %s: VM paused for the cut could not be resumed: %s", task_uuid, e)
    if sent and not committed:
        # The transaction's reply was lost or it failed: read back whether it ran.
        # Unreadable: forget it here; the next Enable adopts it if it is on the disks.
        with contextlib.suppress(Exception):
            committed = await _checkpoint_in_qemu(now, exports, name)
        if committed:
            log.warning("task %s: checkpoint %s ran in QEMU: kept", task_uuid, name)
    with contextlib.suppress(Exception):
        await teardown_exports(ctx.config, store, now, task_uuid, force=True)
    if not committed:
        with contextlib.suppress(Exception):
            await store.run(SyncStore.drop_checkpoint, task_uuid, name)
