"""`cbt-agent backup`: one checkpoint of every disk of a VM into a backup directory.

Find (or create) the VM's CBT task; Disable it first when a previous client died holding it;
Enable with `bitmapName` = the latest checkpoint in the manifest (only completed backups get
there); copy each disk's export into `<file>.part` (full: allocated non-zero extents into a
standalone qcow2; incremental: the dirty clusters into a qcow2 backed by the disk's previous
file); checksum, rename into place, replace the manifest atomically; Disable. On any failure
the new files are removed, the task is disabled (force) and the manifest is left as it was, so
the next run asks again for everything since the last good checkpoint.

A VM that is shut off (the agent refuses its Enable: "is not running") is backed up the same
way through ExportNbdVolumes, with the same base, and UnexportNbdVolumes at the end (Disable
on failure ends that export too): the agent cuts the checkpoint offline, so the chain of
backups goes on across the VM's stops and starts.

The agent's replies are not trusted with the file system: each name in them is checked
(`api.py`) before it is used, every file is created exclusively inside the directory and
published without replacing anything, and a refused reply leaves the directory as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cbt_agent.client import extents
from cbt_agent.client.api import CbtApi, TaskRef, VolumeBackupInfo, vm_not_running
from cbt_agent.client.chain import (
    FULL,
    INCREMENTAL,
    PART_SUFFIX,
    CheckpointBackup,
    DiskBackup,
    DiskTarget,
    Manifest,
    checkpoint_mode,
    next_bitmap_name,
    plan_target,
    with_checkpoint,
)
from cbt_agent.client.errors import ApiError, BackupError, CopyFailed
from cbt_agent.client.extents import ALLOCATION
from cbt_agent.client.manifest import load_manifest, save_manifest
from cbt_agent.client.names import UUID_FORM, is_uuid
from cbt_agent.client.progress import MIB, Progress
from cbt_agent.client.target import (
    fsync_dir,
    open_exclusive,
    path_in,
    publish,
)
from cbt_agent.qcow2 import Qcow2Writer, cluster_size

PAUSE_ENV = "CBT_CLIENT_TEST_PAUSE_AFTER_EXTENTS"  # tests: stop mid-copy, to be killed
BUSY = ("Running", "Starting")
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the NUL


@dataclass(frozen=True)
class BackupOptions:
    url: str
    token: str
    vm_uuid: str
    dest: Path
    task_name: str | None = None
    pause_after: int | None = None  # requests; see PAUSE_ENV
    cafile: str | None = None  # CA of an https agent (default: the system's)
    nbd_tls_dir: str | None = None  # ca-cert.pem for exports that require TLS (nbdTls)
    quiesce: bool | None = None  # ask for a frozen guest (True), forbid it (False), or the agent's


@dataclass(frozen=True)
class DiskResult:
    disk: DiskBackup
    seconds: float


@dataclass
class _Run:
    """One backup in progress: what it made (removed again on failure)."""

    dest: Path
    progress: Progress
    pause_after: int | None
    nbd_tls_dir: str | None = None
    quiesce: bool | None = None
    offline: bool = False  # the VM is shut off: its disks came through ExportNbdVolumes
    made: list[Path] = field(default_factory=list)  # removed again on failure
    requests_done: int = 0

    def on_request_done(self, length: int) -> None:
        """Called after each request is stored."""
        self.progress.add(length)
        self.requests_done += 1
        if self.pause_after is not None and self.requests_done == self.pause_after:
            print(
                f"cbt-agent backup: paused after {self.requests_done} extents ({PAUSE_ENV}), "
                f"pid {os.getpid()}",
                file=sys.stderr,
                flush=True,
            )
            # until the process is killed, or SIGTERM / Ctrl-C raise here and the backup is
            # cleaned up as any failed one
            threading.Event().wait()


def pause_after_from_env() -> int | None:
    value = os.environ.get(PAUSE_ENV, "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        raise BackupError(f"{PAUSE_ENV}={value!r} is not a number") from None
    return n if n > 0 else None


def note(text: str) -> None:
    print(f"cbt-agent backup: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """One backup at a time per directory (flock on the directory itself)."""
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(f"another backup into {dest} is running") from None
        yield
    finally:
        os.close(fd)


def remove_leftovers(dest: Path) -> list[str]:
    """Delete `*.part` files of an interrupted run (they never carry a final name)."""
    removed = []
    for p in sorted(dest.iterdir()):
        if (
            p.name.endswith(PART_SUFFIX) and not p.is_dir()
        ):  # also an older client's qemu-nbd socket
            p.unlink()
            removed.append(p.name)
    return removed


def run_backup(opts: BackupOptions, progress: Progress | None = None) -> Manifest:
    """Back up every disk of the VM into `opts.dest`; returns the new manifest.

    Raises BackupError (ApiError for the agent's refusals) with the directory unchanged (a
    directory this run created is removed again)."""
    if not is_uuid(opts.vm_uuid):
        raise BackupError(f"--vm {opts.vm_uuid!r} is not a vmInstanceUuid ({UUID_FORM})")
    dest = opts.dest
    created = not dest.exists()
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        return _run_backup_locked(opts, dest, progress)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                dest.rmdir()  # only when empty: nothing of a completed backup is removed
        raise


def _run_backup_locked(opts: BackupOptions, dest: Path, progress: Progress | None) -> Manifest:
    with _locked(dest):
        manifest = load_manifest(dest) or Manifest(vm_uuid=opts.vm_uuid)
        if manifest.vm_uuid != opts.vm_uuid:
            raise BackupError(f"{dest} holds backups of VM {manifest.vm_uuid}, not {opts.vm_uuid}")
        for name in remove_leftovers(dest):
            note(f"removed {name}, left by an interrupted backup")
        run = _Run(dest, progress or Progress(), opts.pause_after, opts.nbd_tls_dir, opts.quiesce)
        with CbtApi(opts.url, opts.token, cafile=opts.cafile) as api:
            task = api.find_task(opts.vm_uuid)
            if task is None:
                # the backups so far were made with the manifest's task: on a host that does not
                # know it (the VM migrated here, or the agent lost its database) asking for that
                # uuid lets the agent adopt the checkpoints the disks still carry
                task = api.create_task(
                    opts.vm_uuid, opts.task_name or "cbt-backup", manifest.task_uuid
                )
                note(f"created CBT task {task.uuid} for VM {opts.vm_uuid}")
            elif task.status in BUSY:
                note(
                    f"task {task.uuid} is {task.status} (a previous backup did not finish): "
                    "disabling it (force)"
                )
                api.disable(task.uuid, force=True)
            try:
                new, results = _backup(api, task, manifest, run)
            except BaseException as e:
                if isinstance(e, CopyFailed):
                    _explain_break(api, opts.vm_uuid, e)
                for p in run.made:
                    p.unlink(missing_ok=True)
                try:
                    api.disable(task.uuid, force=True)
                except Exception as e:  # the agent may be what failed; the next run retries
                    note(f"warning: could not disable task {task.uuid}: {e}")
                raise
            try:
                if run.offline:
                    api.unexport_volumes(opts.vm_uuid)
                else:
                    api.disable(task.uuid, force=False)
            except BackupError as e:  # the backup is complete and recorded; the next run recovers
                note(f"warning: {e.message}")
    _summary(dest, new.checkpoints[-1], results)
    return new


def _explain_break(api: CbtApi, vm_uuid: str, e: CopyFailed) -> None:
    """A copy that failed because the agent ended the export (its scratch budget or its
    scratch filesystem: an export breaks before the guest would pay) says so; the rest of the
    failure path (files removed, task disabled) runs as for any failure."""
    with contextlib.suppress(Exception):
        now = api.find_task(vm_uuid)
        if now is not None and now.status == "Stopped":
            e.message += (
                " — the agent ended the export (task Stopped): `cbt-agent status` on the host "
                "says why (a scratch past checkpoints.scratch_budget or a nearly full scratch "
                "filesystem breaks an export to spare the guest); the next backup counts from "
                "the last complete one"
            )


def _backup(
    api: CbtApi, task: TaskRef, manifest: Manifest, run: _Run
) -> tuple[Manifest, list[DiskResult]]:
    since = next_bitmap_name(manifest)
    try:
        infos = api.enable(task.uuid, since, run.quiesce)
    except ApiError as e:
        if not vm_not_running(e, manifest.vm_uuid):
            raise
        note(f"VM {manifest.vm_uuid} is not running: exporting its disks offline")
        run.offline = True
        infos = api.export_volumes(manifest.vm_uuid, since)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    names = {i.bitmap_name for i in infos}
    if len(names) != 1:
        raise BackupError(f"EnableCbtTask returned several checkpoints: {sorted(names)}")
    checkpoint = names.pop()
    vols = [i.volume_uuid for i in infos]
    if len(set(vols)) != len(vols):
        raise BackupError(f"EnableCbtTask returned a disk twice: {sorted(vols)}")
    if any(c.name == checkpoint for c in manifest.checkpoints):
        raise BackupError(
            f"the agent's new checkpoint {checkpoint} is already in {run.dest}/manifest.json "
            "(was the task recreated?): use a new backup directory"
        )
    results: list[DiskResult] = []
    for info in infos:
        target = plan_target(
            manifest, checkpoint, info.volume_uuid, info.mode, info.since, info.reason
        )
        results.append(_backup_disk(run, info, target))
    for r in results:  # every file complete: give them their names, then record them
        part = path_in(run.dest, r.disk.file + PART_SUFFIX)
        final = path_in(run.dest, r.disk.file)
        publish(part, final)
        run.made.append(final)
    fsync_dir(run.dest)
    disks = tuple(r.disk for r in results)
    cp = CheckpointBackup(checkpoint, checkpoint_mode(disks), created, disks)
    new = with_checkpoint(manifest, cp, task.uuid)
    save_manifest(run.dest, new)
    return new, results


def _backup_disk(run: _Run, info: VolumeBackupInfo, target: DiskTarget) -> DiskResult:
    began = time.monotonic()
    gran = info.granularity
    context = ALLOCATION if target.mode == FULL else info.dirty_context
    if context is None:
        raise BackupError(f"disk {info.volume_uuid}: incremental without a dirtyBitmapContext")
    if info.nbd_tls and info.nbd_psk is None and run.nbd_tls_dir is None:
        raise BackupError(
            f"disk {info.volume_uuid}: the export requires TLS (nbdTls): pass --nbd-tls-dir, a "
            "directory with the ca-cert.pem that signed the agent's NBD certificate"
        )
    part = path_in(run.dest, target.file + PART_SUFFIX)
    size = info.size
    runs: list[tuple[int, int]] | None = None
    if target.mode == INCREMENTAL and info.bitmap_b64 is not None:
        # the Enable's own dirty map: the same bitmap the export serves, already here, so
        # the export is not walked a second time (and not even opened when nothing changed)
        runs = extents.bitmap_runs(info.bitmap_b64, gran, size)
    if runs == []:  # nothing changed: an image of no clusters over the previous one
        digest = _store(run, part, size, gran, target, [], [], None)
    else:
        digest, runs = _copy_disk(run, info, target, context, part, runs)
    disk = DiskBackup(
        volume_uuid=info.volume_uuid,
        file=target.file,
        backing_file=target.backing.file if target.backing is not None else None,
        mode=target.mode,
        size=size,
        granularity=gran,
        copied_bytes=extents.total(runs),
        sha256=digest,
        reason=target.reason if target.mode == FULL else None,
        since=info.since if target.backing is not None else None,
    )
    return DiskResult(disk, time.monotonic() - began)


def _copy_disk(
    run: _Run,
    info: VolumeBackupInfo,
    target: DiskTarget,
    context: str,
    part: Path,
    runs: list[tuple[int, int]] | None,
) -> tuple[str, list[tuple[int, int]]]:
    """Copy `runs` (None: what the export's `context` says) of the export into `part`:
    (its sha256, the runs)."""
    import nbd  # libnbd is loaded only when there is something to read

    from cbt_agent.client.copy import (
        GAP_TRIM_STEP,
        MAX_TRIM,
        ZERO_PROBE_MIN,
        open_source,
        source_runs,
        zero_ranges,
    )
    from cbt_agent.qemu import nbd as nbdio

    gran = info.granularity
    address = nbdio.NbdAddress(
        info.nbd_server,
        info.nbd_port,
        info.nbd_socket,
        info.export_name,
        run.nbd_tls_dir if info.nbd_tls and info.nbd_psk is None else None,
        psk=info.nbd_psk,  # the Enable's own key (TLS-PSK): nothing to configure
    )
    # an incremental also asks for base:allocation: dirty clusters that read as zero (trimmed,
    # discarded) are stored as zero clusters without reading them
    contexts = (context,) if target.mode == FULL else (context, ALLOCATION)
    src = open_source(address, *contexts)
    try:
        size = int(src.get_size())
        if size != info.size:
            raise BackupError(
                f"disk {info.volume_uuid}: export has {size} bytes, Enable said {info.size}"
            )
        if runs is None:
            runs = source_runs(src, target.mode, context, gran)
        zero_runs: list[tuple[int, int]] = []
        data_runs = runs
        if target.backing is not None:
            # long dirty runs that read as zero (trimmed, discarded in the guest) are stored as
            # zero clusters without reading them; a short run costs less to read than to ask
            probe = [r for r in runs if r[1] >= ZERO_PROBE_MIN]
            if probe:
                zero = zero_ranges(src, probe)
                data_runs, zero_runs = extents.split_zero(runs, zero, gran)
        trim = bool(src.can_trim())
        first: list[tuple[int, int]] = []
        if trim:
            # what this backup never reads costs the agent's scratch nothing from now on (the
            # block-status queries above are done: a trimmed range no longer answers them),
            # sent ahead of the first read and not waited for; the rest is trimmed behind the copy
            skip = extents.largest(
                extents.gaps(data_runs, size), extents.total(data_runs) // GAP_TRIM_STEP
            )
            first = list(extents.requests(skip, gran, max_request=MAX_TRIM))
        try:
            digest = _store(run, part, size, gran, target, data_runs, zero_runs, (src, trim, first))
        except nbd.Error as e:
            raise CopyFailed(f"disk {info.volume_uuid}: NBD copy failed: {e}") from None
    finally:
        nbdio.close(src)
    return digest, runs


def _store(
    run: _Run,
    part: Path,
    size: int,
    gran: int,
    target: DiskTarget,
    data_runs: list[tuple[int, int]],
    zero_runs: list[tuple[int, int]],
    source: tuple[Any, bool, list[tuple[int, int]]] | None,
) -> str:
    """Write `part`: the qcow2 of `data_runs` read from `source` (the export's handle, whether
    to trim behind the copy, what to trim before it) and of `zero_runs` as zero clusters; its
    sha256."""
    reqs = list(extents.requests(data_runs, gran))
    backing = target.backing.file if target.backing is not None else None
    fd = open_exclusive(part)  # raises with nothing made when a file is already there
    run.made.append(part)
    try:
        image = Qcow2Writer(fd, size, cluster_size(gran), reqs, zero_runs, backing)
        total = extents.total(data_runs) + extents.total(zero_runs)
        run.progress.start(f"disk {target.file[:8]} {target.mode}", total)
        run.progress.add(extents.total(zero_runs))  # stored as zero clusters, never read
        try:
            if source is not None:
                from cbt_agent.client.copy import copy_into

                copy_into(
                    source[0],
                    image,
                    on_done=run.on_request_done,
                    trim=source[1],
                    trim_first=source[2],
                )
            return image.finish()
        finally:
            run.progress.finish()
    finally:
        os.close(fd)


def _summary(dest: Path, cp: CheckpointBackup, results: list[DiskResult]) -> None:
    print(f"checkpoint {cp.name} ({cp.mode}) in {dest}")
    for r in results:
        d = r.disk
        rate = d.copied_bytes / MIB / r.seconds if r.seconds > 0 else 0.0
        extra = f"  ({d.reason})" if d.mode == FULL and d.reason else ""
        print(
            f"  disk {d.volume_uuid}  {d.mode:<11} {d.copied_bytes / MIB:8.1f} MiB copied "
            f"in {r.seconds:.2f} s ({rate:.0f} MiB/s) -> {d.file}{extra}"
        )
