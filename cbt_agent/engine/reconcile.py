"""Reconcile the database with what QEMU really has. Runs at start, before the API listens.

- A task left `Starting` (the agent died inside Enable): a VM it held paused for the cut runs
  again, everything the recorded plan names is removed again (each disk's device back on its
  own node); the checkpoint stays in the chain if its bitmap made it into QEMU (the
  transaction ran), otherwise it is forgotten. The task ends `Failed` with the reason.
- A `Running` task whose exports are all still in QEMU stays usable; otherwise it is torn down.
- A task with export rows but not Running/Starting (a Disable died) finishes its teardown.
- Scratch files and NBD pre-shared keys no task refers to are removed, so is every copy of the
  NBD certificates left for a QEMU (needed only while its TLS object is made).
- Offline exports (a VM's qemu-storage-daemon, recorded before it starts): a Running task's
  daemon that still serves every export stays; an interrupted ExportNbdVolumes is rolled back
  (the checkpoint kept if the cut reached an image); any other daemon is stopped by its pid,
  so are daemons whose task is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from cbt_agent import logctx
from cbt_agent.engine import offline, quiesce, tracking
from cbt_agent.engine.checkpoints import PAUSED
from cbt_agent.engine.exports import remove_tls_copy
from cbt_agent.engine.service import CbtService, GuestOf
from cbt_agent.errors import CbtError
from cbt_agent.model import CbtTask, TaskStatus
from cbt_agent.qemu import bitmaps, blockdev, fleece, nbd_server, psk
from cbt_agent.store import StorageDaemon, SyncStore

log = logging.getLogger(__name__)


async def reconcile(service: CbtService) -> None:
    store = service.store
    for task in await store.run(SyncStore.list_tasks):
        try:
            with logctx.fields(task=task.uuid, vm=task.vm_uuid):
                await _reconcile_task(service, task)
        except Exception as e:
            log.exception("reconcile of task %s failed", task.uuid)
            reason = e.message if isinstance(e, CbtError) else f"{type(e).__name__}: {e}"
            with contextlib.suppress(Exception):
                await store.run(
                    SyncStore.set_status, task.uuid, TaskStatus.FAILED, f"reconcile: {reason}"
                )
    try:
        await _stop_orphan_daemons(service)
    except Exception:
        log.exception("stopping the storage daemons of deleted tasks failed")
    await _remove_orphan_scratch(service)
    await _remove_orphan_keys(service)
    await _remove_tls_copies(service)


async def _reconcile_task(service: CbtService, task: CbtTask) -> None:
    store = service.store
    async with service.vm_lock(task.vm_uuid):
        if task.operation == "delete":
            await service.finish_delete(
                task, lenient=True, reason="interrupted delete finished at agent start"
            )
            log.warning("task %s: interrupted delete finished", task.uuid)
            return
        if task.operation == "disable":
            await service.finish_disable(task, "interrupted disable finished at agent start")
            log.warning("task %s: interrupted disable finished", task.uuid)
            return
        if task.operation == "unexport":
            await service.finish_disable(task, "interrupted unexport finished at agent start")
            log.warning("task %s: interrupted unexport finished", task.uuid)
            return
        daemon = await store.run(SyncStore.storage_daemon, task.vm_uuid)
        if daemon is not None:
            await _reconcile_offline(service, task, daemon)
            return
        exports = await store.run(SyncStore.exports, task.uuid)
        vm = await service.hypervisor.find_vm(task.vm_uuid)
        running = vm is not None and vm.running
        if task.status not in (TaskStatus.STARTING, TaskStatus.RUNNING) and not exports:
            if vm is None and task.status is not TaskStatus.FAILED:
                reason = "VM not found on this host at agent start (undefined or migrated away)"
                await store.run(SyncStore.set_released, task.uuid, reason)
                await store.run(SyncStore.set_status, task.uuid, TaskStatus.FAILED, reason)
            elif vm is not None and running:
                qmp = await service.qmp.channel(task.vm_uuid)
                await tracking.verify_checkpoints(store, qmp, task.uuid, vm)
            return
        if task.status is TaskStatus.RUNNING and running and exports:
            qmp = await service.qmp.channel(task.vm_uuid)
            live = await nbd_server.export_ids_of(qmp)
            if all(e.phase == "exported" and e.export_id in live for e in exports):
                log.info("task %s: exports alive, stays Running", task.uuid)
                service.watch.start(task.uuid, exports)
                return
        if task.status is TaskStatus.STARTING and running:
            if any(e.phase == PAUSED for e in exports):
                # the agent died with the VM paused for the cut: it runs again first
                qmp = await service.qmp.channel(task.vm_uuid)
                if not await fleece.running(qmp):
                    await fleece.resume(qmp)
                    log.warning("task %s: VM paused for a cut resumed", task.uuid)
            # the agent may have died with the guest frozen for the checkpoint: thaw it
            # (harmless when it is not frozen; nothing to do without a guest agent)
            await quiesce.thaw(GuestOf(service.hypervisor, task.vm_uuid))
        if task.status is TaskStatus.STARTING and exports and running:
            # The checkpoint stays in the chain if its bitmap reached QEMU (the transaction ran:
            # the new bitmap records, the previous one is frozen); otherwise it never existed.
            qmp = await service.qmp.channel(task.vm_uuid)
            nodes = await blockdev.named_nodes(qmp)
            for name in {e.checkpoint for e in exports}:
                if not any(name in bitmaps.bitmaps_of(nodes.get(e.device_node)) for e in exports):
                    await store.run(SyncStore.drop_checkpoint, task.uuid, name)
        if task.status is TaskStatus.STARTING:
            status, reason = (
                TaskStatus.FAILED,
                "enable interrupted by an agent restart: rolled back",
            )
        elif task.status is TaskStatus.RUNNING:
            where = "export no longer in QEMU" if running else "VM not running"
            status, reason = TaskStatus.STOPPED, f"export lost while the agent was down ({where})"
        else:
            status, reason = task.status, "leftover export removed at agent start"
        await service.teardown_task(task, force=True)
        await store.run(SyncStore.set_status, task.uuid, status, reason)
        log.warning("task %s: %s -> %s (%s)", task.uuid, task.status, status, reason)


async def _reconcile_offline(service: CbtService, task: CbtTask, daemon: StorageDaemon) -> None:
    """A task with an offline export recorded: a Running one whose daemon still serves every
    export stays so; an interrupted ExportNbdVolumes is rolled back (its checkpoint kept when
    its bitmap reached an image: the cut ran); otherwise the daemon is stopped."""
    store = service.store
    exports = await store.run(SyncStore.daemon_exports, task.vm_uuid)
    why = await offline.why_not_alive(daemon, exports)
    if task.status is TaskStatus.RUNNING and why is None:
        log.info("task %s: offline export alive (%s), stays Running", task.uuid, daemon.pid)
        return
    if task.status is TaskStatus.STARTING:
        names = {e.checkpoint for e in exports}
        await offline.end_export(service.config, store, task.vm_uuid, task.uuid, force=True)
        for name in names:
            if not await offline.checkpoint_on_disks(daemon, name):
                await store.run(SyncStore.drop_checkpoint, task.uuid, name)
        status = TaskStatus.FAILED
        reason = "offline export interrupted by an agent restart: rolled back"
    else:
        await offline.end_export(service.config, store, task.vm_uuid, task.uuid, force=True)
        if task.status is TaskStatus.RUNNING:
            status = TaskStatus.STOPPED
            reason = f"offline export lost while the agent was down ({why})"
        else:
            status, reason = task.status, "leftover offline export ended at agent start"
    await store.run(SyncStore.set_status, task.uuid, status, reason)
    log.warning("task %s: %s -> %s (%s)", task.uuid, task.status, status, reason)


async def _stop_orphan_daemons(service: CbtService) -> None:
    """Daemons whose task is gone (deleted while its daemon could not be stopped): the
    database says they must not run."""
    store = service.store
    for daemon in await store.run(SyncStore.storage_daemons):
        if await store.run(SyncStore.get_task, daemon.task_uuid) is None:
            ended = await offline.end_export(
                service.config, store, daemon.vm_uuid, daemon.task_uuid, force=True
            )
            log.warning(
                "VM %s: stopped %s of a deleted task",
                daemon.vm_uuid,
                offline.holder(ended.pid if ended else None),
            )


async def _remove_orphan_scratch(service: CbtService) -> None:
    scratch_dir: Path = service.config.scratch_dir

    def known(s: SyncStore) -> set[str]:
        return {e.scratch_path for t in s.list_tasks() for e in s.exports(t.uuid)}

    keep = await service.store.run(known)

    def sweep() -> list[str]:
        removed: list[str] = []
        if not scratch_dir.is_dir():
            return removed
        for path in scratch_dir.glob("*.qcow2"):
            if str(path) not in keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed.append(path.name)
        return removed

    removed = await asyncio.to_thread(sweep)
    if removed:
        log.warning("removed orphan scratch files: %s", ", ".join(removed))


async def _remove_orphan_keys(service: CbtService) -> None:
    """NBD pre-shared keys no task with exports refers to (a task deleted while the agent was
    down, a database restored from an older copy): a live key is a credential, never kept."""
    psk_root: Path = service.config.psk_dir

    def known(s: SyncStore) -> set[str]:
        return {t.uuid for t in s.list_tasks() if s.nbd_server(t.uuid).psk and s.exports(t.uuid)}

    keep = await service.store.run(known)

    def sweep() -> list[str]:
        removed: list[str] = []
        if not psk_root.is_dir():
            return removed
        for directory in psk_root.iterdir():
            if directory.name in keep or not directory.is_dir():
                continue
            try:
                psk.remove_server_dir(directory)
            except OSError as e:  # something else in it: the key is gone, the rest is kept
                log.warning("cannot remove %s: %s", directory, e.strerror)
            removed.append(directory.name)
        return removed

    removed = await asyncio.to_thread(sweep)
    if removed:
        log.warning("removed orphan NBD pre-shared keys of tasks %s", ", ".join(removed))


async def _remove_tls_copies(service: CbtService) -> None:
    """Copies of [nbd] tls_cert_dir handed to a QEMU by an Enable that died before removing
    its copy (QEMU reads it only while its tls-creds-x509 object is made: none is in use)."""
    root: Path = service.config.tls_copy_dir

    def sweep() -> list[str]:
        if not root.is_dir():
            return []
        names = sorted(p.name for p in root.iterdir())
        for name in names:
            remove_tls_copy(root / name)
        return names

    removed = await asyncio.to_thread(sweep)
    if removed:
        log.warning("removed leftover copies of the NBD certificates: %s", ", ".join(removed))
