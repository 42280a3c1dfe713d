"""Reconcile the database with what QEMU really has. Runs at start, before the API listens.

- A task left `Starting` (the agent died inside Enable): everything the recorded plan names is
  removed again; the checkpoint stays in the chain if its bitmap made it into QEMU (the
  transaction ran), otherwise it is forgotten. The task ends `Failed` with the reason.
- A `Running` task whose exports are all still in QEMU stays usable; otherwise it is torn down.
- A task with export rows but not Running/Starting (a Disable died) finishes its teardown.
- Jobs still marked running can never finish: they fail with a clear error.
- Scratch files no task refers to are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from cbt_agent.api import zstack
from cbt_agent.engine import checkpoints
from cbt_agent.errors import CbtError
from cbt_agent.model import CbtTask, TaskStatus
from cbt_agent.qemu import blockdev
from cbt_agent.store import SyncStore

log = logging.getLogger(__name__)

RESTART_ERROR = "the agent restarted before this job finished; see the task's status history"


async def reconcile(service: object) -> None:
    from cbt_agent.engine.service import CbtService

    assert isinstance(service, CbtService)
    store = service.store
    for job in await store.run(SyncStore.running_jobs):
        await store.run(
            SyncStore.finish_job,
            job.uuid,
            error=zstack.error_code(zstack.SYS_OPERATION, "An operation failed", RESTART_ERROR),
        )
    for task in await store.run(SyncStore.list_tasks):
        try:
            await _reconcile_task(service, task)
        except Exception as e:
            log.exception("reconcile of task %s failed", task.uuid)
            reason = e.message if isinstance(e, CbtError) else f"{type(e).__name__}: {e}"
            with contextlib.suppress(Exception):
                await store.run(
                    SyncStore.set_status, task.uuid, TaskStatus.FAILED, f"reconcile: {reason}"
                )
    await _remove_orphan_scratch(service)


async def _reconcile_task(service: object, task: CbtTask) -> None:
    from cbt_agent.engine.service import CbtService

    assert isinstance(service, CbtService)
    store = service.store
    exports = await store.run(SyncStore.exports, task.uuid)
    if task.status not in (TaskStatus.STARTING, TaskStatus.RUNNING) and not exports:
        return
    vm = await service.hypervisor.find_vm(task.vm_uuid)
    running = vm is not None and vm.running
    if task.status is TaskStatus.RUNNING and running and exports:
        qmp = await service.qmp.channel(task.vm_uuid)
        live = await blockdev.export_ids(qmp)
        if all(e.phase == "exported" and e.export_id in live for e in exports):
            log.info("task %s: exports alive, stays Running", task.uuid)
            return
    if running:
        qmp = await service.qmp.channel(task.vm_uuid)
        if task.status is TaskStatus.STARTING and exports:
            names = {e.checkpoint for e in exports}
            nodes = await blockdev.named_nodes(qmp)
            made = any(
                name in blockdev.bitmaps_of(nodes.get(e.device_node))
                for e in exports
                for name in names
            )
            if not made:
                for name in names:
                    await store.run(SyncStore.drop_checkpoint, task.uuid, name)
        await checkpoints.teardown_exports(service.config, store, qmp, task.uuid, force=True)
    else:
        if task.status is TaskStatus.STARTING and exports:
            # QEMU is gone: a runtime bitmap never reached the qcow2. Verified at next Enable.
            pass
        for e in exports:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.unlink, e.scratch_path)
        await store.run(SyncStore.clear_exports, task.uuid)
    if task.status is TaskStatus.STARTING:
        status, reason = TaskStatus.FAILED, "enable interrupted by an agent restart: rolled back"
    elif task.status is TaskStatus.RUNNING:
        where = "VM not running" if not running else "export no longer in QEMU"
        status, reason = TaskStatus.STOPPED, f"export lost while the agent was down ({where})"
    else:
        status, reason = task.status, "interrupted disable finished at agent start"
    await store.run(SyncStore.set_status, task.uuid, status, reason)
    log.warning("task %s: %s -> %s (%s)", task.uuid, task.status, status, reason)


async def _remove_orphan_scratch(service: object) -> None:
    from cbt_agent.engine.service import CbtService

    assert isinstance(service, CbtService)
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
