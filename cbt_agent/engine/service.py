"""The worker: CBT task operations, one at a time per VM, run as api jobs.

Data flows one way: a validated command -> intent recorded in the store -> QEMU/libvirt ->
outcome recorded -> the job's result. Handlers never talk to QEMU; this module does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import defaultdict
from datetime import UTC, datetime

from cbt_agent import commands, logctx
from cbt_agent.config import Config
from cbt_agent.engine import checkpoints, offline, scratch, tracking
from cbt_agent.engine.checkpoints import EnableContext
from cbt_agent.engine.exportmaps import ExportMaps
from cbt_agent.engine.exports import export_psk, nbd_address, remove_psk_dir, teardown_exports
from cbt_agent.engine.plan import DiskView, found_on, is_temp, ours, refuse_untrackable
from cbt_agent.engine.results import ChangedAreas, TaskView, Unexported, VolumeBackup
from cbt_agent.engine.steps import StepHook
from cbt_agent.engine.watch import ScratchWatch
from cbt_agent.errors import (
    CbtError,
    InvalidArgument,
    NotFound,
    OperationError,
    QmpInterrupted,
)
from cbt_agent.hypervisor.libvirt import Hypervisor, VmEvent, VmEventKind, VmInfo
from cbt_agent.metrics import Metrics
from cbt_agent.model import CbtTask, Checkpoint, TaskStatus, found_checkpoints, new_uuid
from cbt_agent.qemu import images, nbd_server
from cbt_agent.qemu import nbd as nbdio
from cbt_agent.qemu.qmp import QmpChannel, QmpRouter
from cbt_agent.reasons import TRACKING_LOST
from cbt_agent.store import Store, SyncStore, VolumeExport
from cbt_agent.units import size

log = logging.getLogger(__name__)


class GuestOf:
    """A VM's guest agent through libvirt (fsFreeze / fsThaw)."""

    def __init__(self, hypervisor: Hypervisor, vm_uuid: str) -> None:
        self.hypervisor = hypervisor
        self.vm_uuid = vm_uuid

    async def freeze(self) -> int:
        return await self.hypervisor.fs_freeze(self.vm_uuid)

    async def thaw(self) -> int:
        return await self.hypervisor.fs_thaw(self.vm_uuid)


class CbtService:
    """Runs CreateCbtTask, EnableCbtTask, DisableCbtTask, DeleteCbtTask, and ExportNbdVolumes /
    UnexportNbdVolumes (the offline exports of a VM that is shut off)."""

    def __init__(
        self,
        config: Config,
        store: Store,
        hypervisor: Hypervisor,
        qmp: QmpRouter,
        step: StepHook | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.hypervisor = hypervisor
        self.qmp = qmp
        self.step = step
        self.metrics = metrics
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.watch = ScratchWatch(config, self.break_export)
        self.maps = ExportMaps()  # the open exports' change sets, for changed-areas pages

    # -- helpers ---------------------------------------------------------------------------------

    async def task_view(self, task_uuid: str) -> TaskView:
        def read(s: SyncStore) -> TaskView:
            return TaskView(s.require_task(task_uuid), s.resource_refs(task_uuid))

        return await self.store.run(read)

    async def task_views(self) -> list[TaskView]:
        def read(s: SyncStore) -> list[TaskView]:
            refs = s.all_resource_refs()
            return [TaskView(t, refs.get(t.uuid, [])) for t in s.list_tasks()]

        return await self.store.run(read)

    async def _running_vm(self, vm_uuid: str) -> VmInfo:
        vm = await self.hypervisor.find_vm(vm_uuid)
        if vm is None:
            raise OperationError(f"VM [uuid: {vm_uuid}] is not found on this host")
        if not vm.running:
            raise OperationError(f"VM [uuid: {vm_uuid}] is not running")
        return vm

    async def _status(
        self, task_uuid: str, status: TaskStatus, reason: str, *, operation: str | None = None
    ) -> CbtTask:
        return await self.store.run(
            SyncStore.set_status, task_uuid, status, reason, operation=operation
        )

    async def _fail(self, task_uuid: str, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self._status(task_uuid, TaskStatus.FAILED, reason[:2000])

    # -- operations ------------------------------------------------------------------------------

    async def create(self, cmd: commands.CreateTask) -> TaskView:
        """A new task; with `resourceUuid` of a task whose bitmaps the VM's disks carry (the VM
        came from another host, or this host lost its database), that task, adopted: its
        checkpoints rebuilt from the disks, the history saying where they were found."""
        logctx.VM.set(cmd.vm_uuid)
        vm = await self.hypervisor.find_vm(cmd.vm_uuid)
        if vm is None:
            raise NotFound(
                f"vmInstanceUuid: VM [uuid: {cmd.vm_uuid}] is not found on this host",
                field="vmInstanceUuid",
            )
        vm.require_volume_serials()
        async with self._locks[cmd.vm_uuid]:
            found: list[Checkpoint] = []
            reason = "created"
            if cmd.resource_uuid is not None:
                found, reason = await self._found_on_disks(vm, cmd.resource_uuid)
            task = await self.store.run(
                SyncStore.create_task,
                cmd.resource_uuid or new_uuid(),
                cmd.name,
                cmd.description,
                cmd.vm_uuid,
                [d.volume_uuid for d in vm.disks],
                found,
                reason,
            )
        if found:
            log.warning("task %s: %s", task.uuid, reason)
        return await self.task_view(task.uuid)

    async def _found_on_disks(self, vm: VmInfo, task_uuid: str) -> tuple[list[Checkpoint], str]:
        """The checkpoints of `task_uuid` that the VM's disks carry, on every layer, and the
        history's reason ("created" when there are none)."""
        if await self.store.run(SyncStore.get_task, task_uuid) is not None:
            return [], "created"  # create_task refuses it, naming the field
        chains: dict[str, list[tuple[str, list[str]]]] = {}
        if vm.running:
            qmp = await self.qmp.channel(vm.vm_uuid)
            views = await checkpoints.read_disks(qmp, vm)
            found = found_on(task_uuid, views)
            for view in views:
                chains[view.disk.volume_uuid] = [
                    (layer.filename, list(layer.bitmaps)) for layer in view.chain
                ]
        else:
            sizes: dict[str, int] = {}
            for disk in vm.disks:
                if disk.format == "qcow2" and os.path.isabs(disk.install_path):
                    files = await images.chain_bitmaps(disk.install_path)
                    chains[disk.volume_uuid] = [(f, sorted(names)) for f, names in files]
                    sizes[disk.volume_uuid] = await images.virtual_size(disk.install_path)
            found = found_checkpoints(task_uuid, chains, sizes, datetime.now(UTC))
        if not found:
            return [], "created"
        ours = {c.name for c in found}
        places = []
        for volume, layers in chains.items():
            holding = [f for f, names in layers if ours & set(names)]
            if holding:
                places.append(f"{volume} ({', '.join(holding)})")
        span = found[0].name if len(found) == 1 else f"{found[0].name} .. {found[-1].name}"
        where = "; ".join(places)
        reason = f"adopted: {len(found)} checkpoint(s) {span} found on the disks: {where}"
        return found, reason[:2000]

    async def _vm_of(self, task_uuid: str) -> str:
        vm_uuid = (await self.store.run(SyncStore.require_task, task_uuid)).vm_uuid
        logctx.VM.set(vm_uuid)  # the rest of this api job's lines name the VM
        return vm_uuid

    async def enable(self, cmd: commands.EnableTask) -> list[VolumeBackup]:
        vm_uuid = await self._vm_of(cmd.task_uuid)
        async with self._locks[vm_uuid]:
            task = await self.store.run(SyncStore.require_task, cmd.task_uuid)
            if task.status in (TaskStatus.RUNNING, TaskStatus.STARTING):
                raise OperationError(
                    f"CbtTask [uuid: {task.uuid}] has already enabled, please disable it"
                )
            vm = await self._running_vm(vm_uuid)
            vm.require_volume_serials()
            # a disk that cannot hold persistent bitmaps (raw, qcow2 v2): refused before anything
            # changes, the task as it was
            qmp = await self.qmp.channel(vm_uuid)
            views, jobs = await checkpoints.read_disks_and_jobs(qmp, vm)
            refuse_untrackable(views)
            room_note = await self._refuse_unless_room(task.uuid, views)
            await self._status(
                task.uuid, TaskStatus.STARTING, "enable requested", operation="enable"
            )
            try:
                qmp = await self.qmp.channel(vm_uuid)

                async def reconnect() -> QmpChannel:
                    return await self.qmp.channel(vm_uuid)

                ctx = EnableContext(
                    self.config,
                    self.store,
                    qmp,
                    vm,
                    task.uuid,
                    self.step,
                    reconnect,
                    guest=GuestOf(self.hypervisor, vm_uuid),
                    quiesce=cmd.quiesce or self.config.checkpoints.quiesce,
                    freeze_timeout=self.config.checkpoints.freeze_timeout,
                    views=views,
                    foreign_jobs=jobs,
                    room_note=room_note,
                )
                lost = await self.store.run(SyncStore.tracking_lost, task.uuid)
                infos = await checkpoints.enable(ctx, cmd.bitmap_name, lost)
            except Exception as e:
                await self._fail(task.uuid, f"enable failed: {_reason(e)}")
                raise
            modes = ", ".join(f"{i.disk.volume_uuid[:8]}={i.export.mode}" for i in infos)
            name = infos[0].export.checkpoint
            notes = "".join(f"; {n}" for n in ctx.notes)

            def running(s: SyncStore) -> CbtTask:
                # handed out: from now on the caller holds this name, a default base
                with s._tx():
                    s.mark_handed_out(task.uuid, name)
                    return s.set_status(
                        task.uuid,
                        TaskStatus.RUNNING,
                        f"checkpoint {name} exported ({modes}){notes}",
                    )

            await self.store.run(running)
            self._keep_maps(task.uuid, infos)
            self.watch.start(task.uuid, [i.export for i in infos])
            if self.metrics is not None:
                if ctx.paused_ms is not None:
                    self.metrics.cut_pause_seconds.observe(ctx.paused_ms / 1000)
                self.metrics.inconsistent_bitmaps.inc(ctx.found_inconsistent)
                self.metrics.enabled(
                    (i.export.mode, i.export.reason, i.changed_bytes) for i in infos
                )
        return infos

    async def export_volumes(self, cmd: commands.ExportVolumes) -> list[VolumeBackup]:
        """ExportNbdVolumes: a checkpoint cut on the disks of the shut-off VM and each exported
        read-only by the VM's qemu-storage-daemon, with the changes since `bitmap_name` (the
        latest handed out when None). The task goes Running, as after an Enable; the daemon
        holds the images' locks until the export ends (Unexport, Disable, Delete)."""
        logctx.VM.set(cmd.vm_uuid)
        async with self._locks[cmd.vm_uuid]:
            vm = await self.hypervisor.find_vm(cmd.vm_uuid)
            if vm is None:
                raise NotFound(
                    f"vmInstanceUuid: VM [uuid: {cmd.vm_uuid}] is not found on this host",
                    field="vmInstanceUuid",
                )
            vm.require_volume_serials()
            if vm.running:
                raise OperationError(
                    f"VM [uuid: {cmd.vm_uuid}] is running: ExportNbdVolumes exports the disks "
                    "of a VM that is not running (use EnableCbtTask)"
                )
            task = await self.store.run(SyncStore.task_for_vm, cmd.vm_uuid)
            if task is None:
                raise OperationError(
                    f"VM [uuid: {cmd.vm_uuid}] has no CBT task: create one (CreateCbtTask) to "
                    "export its volumes with their changes"
                )
            logctx.TASK.set(task.uuid)
            if task.released is not None:
                raise OperationError(f"CbtTask [uuid: {task.uuid}] is released: {task.released}")
            disks = offline.select_disks(vm, list(cmd.volume_uuids))
            daemon = await self.store.run(SyncStore.storage_daemon, cmd.vm_uuid)
            if task.status in (TaskStatus.RUNNING, TaskStatus.STARTING) or daemon is not None:
                if not cmd.force and daemon is not None:
                    raise OperationError(
                        f"CbtTask [uuid: {task.uuid}] has already exported the volumes of VM "
                        f"[uuid: {cmd.vm_uuid}]: unexport them first (or pass force)"
                    )
                if not cmd.force:
                    raise OperationError(
                        f"CbtTask [uuid: {task.uuid}] has already enabled, please disable it "
                        "(or pass force)"
                    )
                await self.finish_disable(task, "ended by a forced ExportNbdVolumes")
            await self._status(
                task.uuid, TaskStatus.STARTING, "offline export requested", operation="export"
            )
            try:
                lost = await self.store.run(SyncStore.tracking_lost, task.uuid)
                infos, daemon = await offline.export_volumes(
                    self.config, self.store, vm, disks, task.uuid, cmd.bitmap_name, lost, self.step
                )
            except Exception as e:
                await self._fail(task.uuid, f"offline export failed: {_reason(e)}")
                raise
            modes = ", ".join(f"{i.disk.volume_uuid[:8]}={i.export.mode}" for i in infos)
            name = infos[0].export.checkpoint
            reason = (
                f"checkpoint {name} exported offline ({modes}) by {offline.holder(daemon.pid)}, "
                "which holds the images' locks: the VM cannot start until UnexportNbdVolumes"
            )

            def running(s: SyncStore) -> CbtTask:
                with s._tx():
                    s.mark_handed_out(task.uuid, name)
                    return s.set_status(task.uuid, TaskStatus.RUNNING, reason)

            await self.store.run(running)
            self._keep_maps(task.uuid, infos)
        return infos

    def _keep_maps(self, task_uuid: str, infos: list[VolumeBackup]) -> None:
        """Keep the change sets Enable read, for the changed-areas pages of these exports."""
        self.maps.drop(task_uuid)
        for i in infos:
            if i.dirty_map is not None:
                self.maps.put(i.export, i.dirty_map)

    async def unexport_volumes(self, cmd: commands.UnexportVolumes) -> Unexported:
        """UnexportNbdVolumes: the VM's offline export ends (its daemon opened every exported
        disk's chain, so the whole export ends: the images' locks are released). Says when a
        start of the VM was refused meanwhile. Nothing exported: nothing to do."""
        logctx.VM.set(cmd.vm_uuid)
        async with self._locks[cmd.vm_uuid]:
            vm = await self.hypervisor.find_vm(cmd.vm_uuid)
            if vm is not None and cmd.volume_uuids:
                known = {d.volume_uuid for d in vm.disks}
                unknown = [v for v in cmd.volume_uuids if v not in known]
                if unknown:
                    raise NotFound(
                        f"volume [uuid: {unknown[0]}] is not a disk of VM [uuid: {cmd.vm_uuid}]",
                        field="volumeUuids",
                    )
            daemon = await self.store.run(SyncStore.storage_daemon, cmd.vm_uuid)
            if daemon is None:
                return Unexported()
            task = await self.store.run(SyncStore.get_task, daemon.task_uuid)
            refused = None
            if vm is not None and not vm.running:
                refused = await self.hypervisor.start_failure(cmd.vm_uuid)
            if task is not None:
                logctx.TASK.set(task.uuid)
                await self.store.run(SyncStore.set_operation, task.uuid, "unexport")
            self.maps.drop(daemon.task_uuid)
            try:
                ended = await offline.end_export(
                    self.config, self.store, cmd.vm_uuid, daemon.task_uuid, force=True
                )
            except Exception as e:
                if task is not None:
                    await self._fail(task.uuid, f"unexport failed: {_reason(e)}")
                raise
            result = Unexported(
                pid=ended.pid if ended is not None else None,
                images=daemon.images,
                volumes=ended.volumes if ended is not None else (),
                start_refused=refused,
            )
            if task is not None and task.status is not TaskStatus.CREATED:
                await self._status(task.uuid, TaskStatus.STOPPED, result.message)
        return result

    async def _refuse_unless_room(self, task_uuid: str, views: list[DiskView]) -> str:
        """OperationError, before anything changes, when the disks' scratch budgets do not fit
        on the scratch filesystem; else the note for the task's history."""
        cps = self.config.checkpoints
        need = scratch.budgets(cps, (v.dev.virtual_size for v in views))
        fs = await self.watch.room()
        scratch.refuse_unless_room(
            cps, self.config.scratch_dir, fs, need, self.watch.claimed(besides=task_uuid)
        )
        return (
            f"scratch budget {size(sum(need))} in {self.config.scratch_dir} ({size(fs.free)} free)"
        )

    async def break_export(self, task_uuid: str, why: str) -> None:
        """End a Running task's exports now, to spare the guest and the host (the scratch
        watcher's call): the export's reads fail from here on, the task goes Stopped saying
        why, and its checkpoint is no longer a default base (the backup that read it cannot be
        whole), so the next Enable counts from the one before and loses no write."""
        task = await self.store.run(SyncStore.get_task, task_uuid)
        if task is None:
            return
        async with self._locks[task.vm_uuid]:
            task = await self.store.run(SyncStore.get_task, task_uuid)
            if task is None or task.status is not TaskStatus.RUNNING:
                return
            exports = await self.store.run(SyncStore.exports, task.uuid)
            if not exports:
                return
            name = exports[0].checkpoint
            with logctx.fields(task=task.uuid, vm=task.vm_uuid):
                await self.teardown_task(task, force=True)

                def broken(s: SyncStore) -> None:
                    with s._tx():
                        s.mark_handed_out(task.uuid, name, False)
                        s.set_status(
                            task.uuid,
                            TaskStatus.STOPPED,
                            f"export broken: {why}; checkpoint {name} is no default base "
                            "(the next Enable counts from the one before)",
                        )

                await self.store.run(broken)
            if self.metrics is not None:
                cause = "budget" if "budget" in why else "filesystem"
                self.metrics.export_breaks.labels(cause).inc()

    async def teardown_task(self, task: CbtTask, *, force: bool) -> None:
        """End the task's exports, wherever the VM is. With the VM gone, only files remain.
        An offline export's qemu-storage-daemon is stopped (its image locks released)."""
        self.watch.stop(task.uuid)
        self.maps.drop(task.uuid)
        await offline.end_export(self.config, self.store, task.vm_uuid, task.uuid, force=force)
        exports = await self.store.run(SyncStore.exports, task.uuid)
        vm = await self.hypervisor.find_vm(task.vm_uuid)
        if vm is not None and vm.running:
            qmp = await self.qmp.channel(task.vm_uuid)
            try:
                await teardown_exports(
                    self.config, self.store, qmp, task.uuid, force=force, step=self.step
                )
            except QmpInterrupted as lost:
                # a reply was lost: teardown reads QEMU's state and removes what is still
                # there, so running it again on a fresh connection settles it
                log.warning("task %s: %s; reading QEMU's state back", task.uuid, lost.message)
                qmp = await self.qmp.channel(task.vm_uuid)
                await teardown_exports(
                    self.config, self.store, qmp, task.uuid, force=force, step=self.step
                )
            return
        # QEMU is gone: its exports, jobs and nodes went with it; scratch files (and the NBD
        # socket of a killed QEMU) did not.
        for e in exports:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.unlink, e.scratch_path)
        server = await self.store.run(SyncStore.nbd_server, task.uuid)
        if server.socket is not None:
            await asyncio.to_thread(nbd_server.remove_socket_file, server.socket)
        if server.psk or self.config.nbd.tls == "psk":
            await remove_psk_dir(self.config, task.uuid)
        await self.store.run(SyncStore.clear_exports, task.uuid)

    async def disable(self, cmd: commands.DisableTask) -> TaskView:
        vm_uuid = await self._vm_of(cmd.task_uuid)
        async with self._locks[vm_uuid]:
            task = await self.store.run(SyncStore.require_task, cmd.task_uuid)
            has_exports = bool(await self.store.run(SyncStore.exports, task.uuid))
            if task.status in (TaskStatus.CREATED, TaskStatus.STOPPED) and not has_exports:
                return await self.task_view(task.uuid)
            await self.store.run(SyncStore.set_operation, task.uuid, "disable")
            try:
                await self.teardown_task(task, force=cmd.force)
            except Exception as e:
                await self._fail(task.uuid, f"disable failed: {_reason(e)}")
                raise
            reason = "disabled" + (" (forced)" if cmd.force else "")
            await self._status(task.uuid, TaskStatus.STOPPED, reason)
        return await self.task_view(task.uuid)

    async def delete(self, cmd: commands.DeleteTask) -> None:
        task = await self.store.run(SyncStore.get_task, cmd.task_uuid)
        if task is None:
            return  # deleting a missing task succeeds, as in ZStack
        lenient = cmd.force or cmd.enforcing
        async with self._locks[task.vm_uuid]:
            task = await self.store.run(SyncStore.get_task, cmd.task_uuid)
            if task is None:
                return
            await self.store.run(SyncStore.set_operation, task.uuid, "delete")
            await self.finish_delete(task, lenient=lenient, reason="deleted")

    async def finish_delete(self, task: CbtTask, *, lenient: bool, reason: str) -> None:
        """Disable, remove every bitmap of the task, forget it. The caller holds the VM lock."""
        try:
            await self.teardown_task(task, force=True)
            if task.status in (TaskStatus.RUNNING, TaskStatus.STARTING):
                await self._status(
                    task.uuid, TaskStatus.STOPPED, "disabled before delete", operation="delete"
                )
            if self.step:
                await self.step("delete:disabled")
            await self._remove_bitmaps(task)
            if self.step:
                await self.step("delete:bitmaps")
        except Exception as e:
            if not lenient:
                await self._fail(task.uuid, f"delete failed: {_reason(e)}")
                raise
            log.warning("delete of task %s: %s (forced: deleting anyway)", task.uuid, e)
        await self.store.run(SyncStore.delete_task, task.uuid, reason)
        await self.qmp.forget(task.vm_uuid)

    async def finish_disable(self, task: CbtTask, reason: str) -> None:
        """End the exports and land in Stopped. The caller holds the VM lock."""
        await self.teardown_task(task, force=True)
        await self._status(task.uuid, TaskStatus.STOPPED, reason)

    async def on_vm_event(self, ev: VmEvent) -> None:
        """A VM lifecycle event from libvirt: keep the task's status true to what QEMU has."""
        with logctx.fields(vm=ev.vm_uuid):
            await self._on_vm_event(ev)

    async def _on_vm_event(self, ev: VmEvent) -> None:
        async with self._locks[ev.vm_uuid]:
            task = await self.store.run(SyncStore.task_for_vm, ev.vm_uuid)
            if task is None:
                return
            await self.qmp.forget(ev.vm_uuid)  # the old QEMU and its socket are gone
            if ev.kind is VmEventKind.STARTED:
                if await self.store.run(SyncStore.storage_daemon, ev.vm_uuid) is not None:
                    # the VM could start, so its daemon no longer held the images: the offline
                    # export is over (and its view no longer the disks' state)
                    await self.finish_disable(task, "offline export ended: the VM started")
                vm = await self.hypervisor.find_vm(ev.vm_uuid)
                if vm is not None and vm.running:
                    qmp = await self.qmp.channel(ev.vm_uuid)
                    broken = await tracking.verify_checkpoints(self.store, qmp, task.uuid, vm)
                    if self.metrics is not None:
                        self.metrics.inconsistent_bitmaps.inc(
                            sum(1 for b in broken if b.endswith("(inconsistent)"))
                        )
                return
            if ev.kind is VmEventKind.CRASHED:
                await self.store.run(SyncStore.set_tracking_lost, task.uuid, TRACKING_LOST)
            exports = await self.store.run(SyncStore.exports, task.uuid)
            await self.teardown_task(task, force=True)
            if ev.kind is VmEventKind.MIGRATED_AWAY:
                reason = f"VM migrated away from this host ({ev.detail})"
                await self.store.run(SyncStore.set_released, task.uuid, reason)
                await self._fail(task.uuid, reason)
            elif ev.kind is VmEventKind.UNDEFINED:
                reason = f"VM undefined on this host ({ev.detail})"
                await self.store.run(SyncStore.set_released, task.uuid, reason)
                await self._fail(task.uuid, reason)
            elif ev.kind is VmEventKind.CRASHED:
                if exports or task.status in (TaskStatus.RUNNING, TaskStatus.STARTING):
                    await self._fail(task.uuid, f"VM crashed: {TRACKING_LOST} ({ev.detail})")
            elif exports or task.status in (TaskStatus.RUNNING, TaskStatus.STARTING):
                await self._status(
                    task.uuid, TaskStatus.STOPPED, f"VM stopped with the export open ({ev.detail})"
                )
            log.info("task %s: VM %s %s", task.uuid, ev.vm_uuid, ev.kind)

    def vm_lock(self, vm_uuid: str) -> asyncio.Lock:
        return self._locks[vm_uuid]

    async def changed_areas(
        self, task_uuid: str, volume_uuid: str, start: int, length: int | None, limit: int
    ) -> ChangedAreas:
        """The changed areas of one disk of a Running task's current checkpoint (VMware
        QueryChangedDiskAreas): maximal runs, at most `limit` a page; `nextOffset` continues."""

        def read(s: SyncStore) -> tuple[CbtTask, list[VolumeExport]]:
            # one trip to the store's thread a page: a listing asks for many pages
            task = s.require_task(task_uuid)
            if task.status is not TaskStatus.RUNNING:
                return task, []
            exports = s.exports(task_uuid)
            if not exports:  # an offline export's disks, served by the VM's storage daemon
                daemon = s.daemon_exports(task.vm_uuid)
                exports = [offline.as_volume_export(task_uuid, e) for e in daemon]
            return task, exports

        task, exports = await self.store.run(read)
        if task.status is not TaskStatus.RUNNING:
            raise OperationError(
                f"CbtTask [uuid: {task_uuid}] is {task.status}: changed areas need a Running task"
            )
        export = next((e for e in exports if e.volume_uuid == volume_uuid), None)
        if export is None:
            raise NotFound(
                f"volume [uuid: {volume_uuid}] is not exported by CbtTask [uuid: {task_uuid}]",
                field="volumeUuid",
            )
        if start >= export.size:
            raise InvalidArgument(
                f"startOffset {start} is beyond the disk's size {export.size}",
                field="startOffset",
            )
        end = export.size if length is None else min(export.size, start + length)
        if export.temp_bitmap and not self.maps.too_large(export):
            # a change set: frozen while exported, kept from its Enable
            dirty = self.maps.get(export)
            if dirty is None:  # not kept (the agent restarted since): read it once, keep it
                generation = self.maps.generation(task_uuid)
                address = await self._address(task_uuid, volume_uuid)
                context = f"qemu:dirty-bitmap:{export.temp_bitmap}"
                dirty = await asyncio.to_thread(nbdio.read_dirty_map, address, context)
                self.maps.put(export, dirty, generation)
            areas, page_end, done = dirty.page(start, end, limit)
            return ChangedAreas(export, start, page_end, areas, done)
        # a full (the allocated areas of the point-in-time view, which a client's trims change)
        # or a change set too large to keep: read from the export each time
        context = (
            f"qemu:dirty-bitmap:{export.temp_bitmap}" if export.temp_bitmap else "base:allocation"
        )
        address = await self._address(task_uuid, volume_uuid)
        page = await asyncio.to_thread(nbdio.changed_areas, address, context, start, length, limit)
        return ChangedAreas(export, start, page.end, list(page.areas), page.done)

    async def _address(self, task_uuid: str, volume_uuid: str) -> nbdio.NbdAddress:
        """How the agent reaches the task's export of `volume_uuid`."""
        server = await self.store.run(SyncStore.nbd_server, task_uuid)
        key = await export_psk(self.config, server, task_uuid)
        return nbd_address(self.config, server, volume_uuid, key)

    async def _remove_bitmaps(self, task: CbtTask) -> None:
        if task.released is not None:
            # the disks belong to the VM's new host now: its agent tracks on them
            log.info("task %s: bitmaps left on the disks (%s)", task.uuid, task.released)
            return
        vm = await self.hypervisor.find_vm(task.vm_uuid)
        if vm is None:
            return  # the VM and its disks are gone from this host
        if vm.running:
            qmp: QmpChannel = await self.qmp.channel(task.vm_uuid)
            removed = await tracking.remove_task_bitmaps(qmp, task.uuid)
            log.info("task %s: removed bitmaps %s", task.uuid, removed)
            return
        # VM shut off: the bitmaps live in the qcow2 files of every layer; remove them there.
        for disk in vm.disks:
            if disk.format != "qcow2" or not os.path.isabs(disk.install_path):
                continue
            for path, present in await images.chain_bitmaps(disk.install_path):
                for name in sorted(present):
                    if ours(task.uuid, name) or is_temp(task.uuid, name):
                        await images.remove_bitmap(path, name)


def _reason(e: BaseException) -> str:
    if isinstance(e, CbtError):
        return e.message
    return f"{type(e).__name__}: {e}"
