"""Offline exports (ExportNbdVolumes / UnexportNbdVolumes): the disks of a shut-off VM exported
read-only over NBD by one qemu-storage-daemon per VM, each with the changes since a checkpoint.

`offline_plan.plan_offline` decides everything (the semantics are written there); this module
records the plan (the checkpoint, the daemon's pid file and QMP socket, the images it opens, its
exports) in SQLite before the first file is touched, then runs it: remove stale bitmaps, cut the
checkpoint on the top images (`qemu-img bitmap`), start the daemon, and through its QMP monitor
start the NBD server, merge each change set into a temporary bitmap and export it. On failure
everything is undone and the checkpoint chain stays whole. While it runs the daemon holds the
images' locks: the VM cannot start until the export ends (Unexport, Disable, Delete), which
stops the daemon by its pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from cbt_agent.config import UNIX_PATH_MAX, Config
from cbt_agent.dirtymap import DirtyMap, full_bitmap
from cbt_agent.engine import offline_plan
from cbt_agent.engine.checkpoints import adopt_unknown_checkpoints
from cbt_agent.engine.exports import (
    export_psk,
    nbd_address,
    private_dir,
    read_changes,
    remove_psk_dir,
    start_nbd_server,
)
from cbt_agent.engine.results import VolumeBackup
from cbt_agent.engine.steps import StepHook
from cbt_agent.errors import HypervisorError, NotFound, OperationError
from cbt_agent.hypervisor.libvirt import DiskInfo, VmInfo
from cbt_agent.qemu import bitmaps, images, nbd_server, storage_daemon
from cbt_agent.qemu.psk import Psk
from cbt_agent.qemu.qmp import SocketQmp
from cbt_agent.store import (
    DaemonExport,
    NbdServer,
    StorageDaemon,
    Store,
    SyncStore,
    VolumeExport,
    utcnow,
)

log = logging.getLogger(__name__)

TEMP_DIR_PREFIX = "cbt-qsd-"  # a daemon's own directory when <state.dir>/qsd is too long


def holder(pid: int | None) -> str:
    """How the task's history names the process that holds the images."""
    return f"{storage_daemon.BINARY} pid {pid}" if pid else storage_daemon.BINARY


def daemon_paths(cfg: Config, vm_uuid: str) -> tuple[str, str]:
    """The daemon's pid file and QMP socket, in <state.dir>/qsd (owner-only); the socket in a
    private temporary directory when that path is too long for a unix socket."""
    base = cfg.state_dir / "qsd"
    private_dir(base)
    sock = base / f"{vm_uuid}.qmp"
    if len(os.fsencode(sock)) > UNIX_PATH_MAX:
        sock = Path(tempfile.mkdtemp(prefix=TEMP_DIR_PREFIX)) / "qmp.sock"  # 0700, fresh
    return str(base / f"{vm_uuid}.pid"), str(sock)


def as_volume_export(task_uuid: str, e: DaemonExport) -> VolumeExport:
    """An offline export in the shape the replies take: the view is the top image itself (no
    scratch file: the images do not change while exported), its node the daemon's."""
    return VolumeExport(
        task_uuid=task_uuid,
        volume_uuid=e.volume_uuid,
        checkpoint=e.checkpoint,
        device_node=e.node,
        scratch_node=e.node,
        scratch_path=e.image,
        job_id="",
        export_id=e.export_id,
        temp_bitmap=e.temp_bitmap,
        mode=e.mode,
        since=e.since,
        reason=e.reason,
        size=e.size,
        granularity=e.granularity,
        phase="exported",
    )


def select_disks(vm: VmInfo, volume_uuids: list[str]) -> list[DiskInfo]:
    """The disks to export: those named (all when none is), each a qcow2 file. Raises
    OperationError naming what cannot be exported."""
    disks = list(vm.disks)
    if volume_uuids:
        known = {d.volume_uuid for d in disks}
        unknown = [v for v in volume_uuids if v not in known]
        if unknown:
            raise NotFound(
                f"volume [uuid: {unknown[0]}] is not a disk of VM [uuid: {vm.vm_uuid}]",
                field="volumeUuids",
            )
        disks = [d for d in disks if d.volume_uuid in set(volume_uuids)]
    if not disks:
        raise OperationError(f"VM [uuid: {vm.vm_uuid}] has no disk with a volume uuid (serial)")
    for d in disks:
        if d.format != "qcow2" or not os.path.isabs(d.install_path):
            # a raw image's lock does not keep a writer out while it is exported, and only
            # qcow2 carries bitmaps
            raise OperationError(
                f"volume {d.volume_uuid} is {d.format or 'not a file'} at {d.install_path}: "
                "an offline export needs a qcow2 file"
            )
    return disks


async def _dirty_map(
    cfg: Config, server: NbdServer, e: DaemonExport, key: Psk | None
) -> tuple[bytes, int, DirtyMap | None]:
    if not e.temp_bitmap:
        return full_bitmap(e.size, e.granularity), e.size, None
    address = nbd_address(cfg, server, e.volume_uuid, key)
    context = f"qemu:dirty-bitmap:{e.temp_bitmap}"
    return await asyncio.to_thread(read_changes, address, context, e.size, e.granularity)


@dataclass
class _Cut:
    """How far the offline checkpoint got: the top images carrying the new bitmap."""

    name: str
    added: list[str]
    committed: bool = False  # on every disk: it stays in the chain whatever happens next


async def _cut(plan: offline_plan.OfflinePlan, cut: _Cut) -> None:
    """Add the new checkpoint's bitmap on every top, then freeze the old ones. Failing while
    adding, the bitmaps added are removed again (the old ones never stopped recording)."""
    try:
        for c in plan.cuts:
            await images.add_bitmap(c.image, c.new)
            cut.added.append(c.image)
    except BaseException:
        for image in list(cut.added):
            try:
                await images.remove_bitmap(image, cut.name)
                cut.added.remove(image)
            except Exception as e:
                log.warning("bitmap %s stays on %s: %s", cut.name, image, e)
        raise
    cut.committed = True
    for c in plan.cuts:
        for name in c.freeze:
            await images.disable_bitmap(c.image, name)


async def export_volumes(
    cfg: Config,
    store: Store,
    vm: VmInfo,
    disks: list[DiskInfo],
    task_uuid: str,
    since_name: str | None,
    lost: str | None,
    step: StepHook | None = None,
) -> tuple[list[VolumeBackup], StorageDaemon]:
    """Cut a checkpoint on the disks of the shut-off VM and export each read-only through the VM's
    qemu-storage-daemon, with the changes since `since_name` (None: the latest handed out).
    Returns the exports and the daemon (running, holding the images). On failure nothing is
    left running and the chain stays whole."""

    async def at(name: str) -> None:
        if step is not None:
            await step(name)

    chains = {d.volume_uuid: await images.chain_info(d.install_path) for d in disks}
    views = [offline_plan.disk_view(d, chains[d.volume_uuid]) for d in disks]
    await adopt_unknown_checkpoints(store, task_uuid, views)
    plan = offline_plan.plan_offline(
        task_uuid,
        vm.vm_uuid,
        await store.run(SyncStore.next_checkpoint_seq, task_uuid),
        views,
        await store.run(SyncStore.checkpoints, task_uuid),
        since_name=since_name,
        removed=await store.run(SyncStore.removed_checkpoint_names, task_uuid),
        pending=await store.run(SyncStore.pending_breaks, task_uuid),
        lost=lost,
    )
    pid_file, qmp_socket = await asyncio.to_thread(daemon_paths, cfg, vm.vm_uuid)
    daemon = StorageDaemon(
        vm_uuid=vm.vm_uuid,
        task_uuid=task_uuid,
        pid=None,
        pid_file=pid_file,
        qmp_socket=qmp_socket,
        images=tuple(dict.fromkeys(i.filename for i in plan.images)),
        phase="planned",
        started=utcnow(),
    )
    exports = list(plan.exports)
    enable = plan.enable

    def record_plan(s: SyncStore) -> None:
        with s._tx():
            s.add_checkpoint(
                task_uuid,
                enable.seq,
                enable.checkpoint,
                enable.volumes,
                enable.sizes,
                dict(enable.tops),
                dict(enable.breaks),
            )
            s.record_daemon(daemon, exports)

    await store.run(record_plan)
    cut = _Cut(plan.checkpoint, [])
    qmp: SocketQmp | None = None
    try:
        await at("export:planned")
        for image, name in plan.stale:
            log.warning("removing bitmap %s from %s (inconsistent)", name, image)
            await images.remove_bitmap(image, name)
        await _cut(plan, cut)
        if enable.clears_pending:  # recorded in the checkpoint just cut
            await store.run(SyncStore.clear_pending_breaks, task_uuid)
        await at("export:checkpoint")

        # a full's granularity is its new bitmap's, known now (an incremental's is its set's)
        fulls = [e for e in exports if not e.temp_bitmap]
        for e in fulls:
            top = (await images.chain_info(e.image))[0]
            state = top.bitmaps.get(plan.checkpoint)
            if state is not None:
                exports[exports.index(e)] = replace(e, granularity=state.granularity)

        await storage_daemon.start(storage_daemon.command(pid_file, qmp_socket, plan.images))
        pid = storage_daemon.running_pid(None, pid_file)
        if pid is None:
            raise HypervisorError(f"{storage_daemon.BINARY} started but does not run")
        await store.run(SyncStore.set_daemon_pid, vm.vm_uuid, pid)
        daemon = replace(daemon, pid=pid, phase="started")
        await at("export:daemon")

        qmp = SocketQmp(vm.vm_uuid, qmp_socket)
        await qmp.connect()
        # the daemon runs as the agent (and has no getfd/add-fd): it opens the paths itself
        server = await start_nbd_server(cfg, store, qmp, task_uuid, vm.vm_uuid, by_fd=False)
        key = await export_psk(cfg, server, task_uuid)  # [nbd] tls = "psk": this export's key
        for e in exports:
            if e.temp_bitmap:
                merge = next(m for m in enable.merges if m.node == e.node)
                await bitmaps.add_temp_bitmap(qmp, e.node, e.temp_bitmap, e.granularity)
                await bitmaps.merge(qmp, e.node, e.temp_bitmap, merge.sources)
            bitmap = (e.node, e.temp_bitmap) if e.temp_bitmap else None
            await nbd_server.add_export(qmp, e.export_id, e.node, e.volume_uuid, bitmap)
        await at("export:exported")

        maps = await asyncio.gather(*(_dirty_map(cfg, server, e, key) for e in exports))
        volumes = [
            VolumeBackup(
                d,
                as_volume_export(task_uuid, e),
                server,
                bits,
                changed,
                False,
                key,
                dirty_map=dirty,
            )
            for d, e, (bits, changed, dirty) in zip(disks, exports, maps, strict=True)
        ]

        def exported(s: SyncStore) -> None:
            with s._tx():
                s.record_daemon(replace(daemon, phase="exported"), exports)
                s.sync_volume_refs(task_uuid, [d.volume_uuid for d in vm.disks])

        await store.run(exported)
    except BaseException:
        with contextlib.suppress(Exception):
            await _stop_daemon(cfg, store, vm.vm_uuid, task_uuid, force=True)
        if not cut.added:  # the checkpoint is on no disk: it never existed
            with contextlib.suppress(Exception):
                await store.run(SyncStore.drop_checkpoint, task_uuid, plan.checkpoint)
        raise
    finally:
        if qmp is not None:
            await qmp.close()

    if lost is not None:
        # a fresh chain starts here; the checkpoints before it cannot give changes any more
        for old in enable.superseded:
            await store.run(SyncStore.mark_checkpoint_removed, task_uuid, old)
        await store.run(SyncStore.set_tracking_lost, task_uuid, None)
    return volumes, replace(daemon, phase="exported")


@dataclass(frozen=True)
class EndedExport:
    """An offline export that ended: the daemon stopped (its pid; None: it was not running
    any more), the images whose locks it held, the volumes it exported."""

    pid: int | None
    images: tuple[str, ...]
    volumes: tuple[str, ...]


async def _stop_daemon(
    cfg: Config, store: Store, vm_uuid: str, task_uuid: str, *, force: bool
) -> EndedExport | None:
    daemon = await store.run(SyncStore.storage_daemon, vm_uuid)
    if daemon is None:
        return None
    exports = await store.run(SyncStore.daemon_exports, vm_uuid)
    pid = storage_daemon.running_pid(daemon.pid, daemon.pid_file)
    if pid is not None and exports:
        # as a Disable: a connected client first gets a safe removal, then a hard one
        qmp = SocketQmp(vm_uuid, daemon.qmp_socket)
        try:
            await qmp.connect()
            await nbd_server.delete_exports(qmp, [e.export_id for e in exports], force=force)
        except HypervisorError as e:
            log.warning("VM %s: ending the exports of %s: %s", vm_uuid, holder(pid), e.message)
        finally:
            await qmp.close()
    stopped = await storage_daemon.stop(daemon.pid, daemon.pid_file)
    server = await store.run(SyncStore.nbd_server, task_uuid)

    def remove_files() -> None:
        if server.socket is not None:
            nbd_server.remove_socket_file(server.socket)
        nbd_server.remove_socket_file(daemon.qmp_socket)
        folder = Path(daemon.qmp_socket).parent
        if folder.name.startswith(TEMP_DIR_PREFIX):
            shutil.rmtree(folder, ignore_errors=True)

    await asyncio.to_thread(remove_files)
    if server.psk or cfg.nbd.tls == "psk":
        await remove_psk_dir(cfg, task_uuid)  # the export's key dies with its daemon

    def forget(s: SyncStore) -> None:
        with s._tx():
            s.forget_daemon(vm_uuid)
            if s.get_task(task_uuid) is not None:
                s.set_server(task_uuid, NbdServer())

    await store.run(forget)
    if stopped is not None:
        log.info("VM %s: %s stopped", vm_uuid, holder(stopped))
    return EndedExport(stopped, daemon.images, tuple(e.volume_uuid for e in exports))


async def end_export(
    cfg: Config, store: Store, vm_uuid: str, task_uuid: str, *, force: bool
) -> EndedExport | None:
    """End the VM's offline export, if it has one: its exports removed, its daemon stopped by
    pid (SIGTERM, then SIGKILL), the image locks released, the rows forgotten. None when the
    VM had no offline export."""
    return await _stop_daemon(cfg, store, vm_uuid, task_uuid, force=force)


async def why_not_alive(daemon: StorageDaemon, exports: list[DaemonExport]) -> str | None:
    """Why a recorded offline export is no longer served (None: its daemon runs and serves
    every export)."""
    pid = storage_daemon.running_pid(daemon.pid, daemon.pid_file)
    if pid is None:
        return f"{holder(daemon.pid)} is not running"
    if daemon.phase != "exported":
        return f"{holder(pid)} was still being set up ({daemon.phase})"
    qmp = SocketQmp(daemon.vm_uuid, daemon.qmp_socket)
    try:
        await qmp.connect()
        live = await nbd_server.export_ids_of(qmp)
    except HypervisorError as e:
        return f"{holder(pid)} does not answer: {e.message}"
    finally:
        await qmp.close()
    missing = [e.volume_uuid for e in exports if e.export_id not in live]
    if missing:
        return f"{holder(pid)} no longer exports {', '.join(missing)}"
    return None


async def checkpoint_on_disks(daemon: StorageDaemon, name: str) -> bool:
    """Whether bitmap `name` is in any image the daemon was to open (the cut reached it)."""
    for image in daemon.images:
        try:
            chain = await images.chain_info(image)
        except HypervisorError:
            continue
        if chain and name in chain[0].bitmaps:
            return True
    return False
