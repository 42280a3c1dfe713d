"""A checkpoint's exports: the VM's NBD server (and the credential a client needs for it), how
the agent reaches an export, and ending them all again (Disable, and the rollback of a failed
Enable).

A VM's QEMU may run as an unprivileged user that cannot reach the agent's private state
directory, so nothing here asks QEMU to open an agent path: the NBD socket is made and bound
by the agent and passed as a descriptor, and the directory of an NBD credential (which QEMU
reads by name) is passed as a descriptor too, its files given to QEMU's user alone (see
`qemu.fds`, `qemu.process`). The agent's own qemu-storage-daemon (offline exports) runs as the
agent and has no `getfd`/`add-fd`: it opens the same paths itself (`by_fd=False`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

from cbt_agent.config import NBD_TLS_FILES, NBD_TLS_OPTIONAL_FILES, UNIX_PATH_MAX, Config
from cbt_agent.dirtymap import DirtyMap, bitmap_changed_bytes
from cbt_agent.engine.steps import StepHook
from cbt_agent.errors import OperationError
from cbt_agent.qemu import bitmaps, blockdev, fds, fleece, nbd_server, process, psk
from cbt_agent.qemu import nbd as nbdio
from cbt_agent.qemu.process import QemuUser
from cbt_agent.qemu.psk import Psk
from cbt_agent.qemu.qmp import QmpChannel, execute_all
from cbt_agent.secretfiles import NotPrivate
from cbt_agent.store import NbdServer, Store, SyncStore

# NBD ports this process is starting a server on and has not recorded yet: concurrent Enables
# (a hundred VMs at once) read the same recorded ports, and would otherwise all try the first
# free one, each failing on every port the others took before (n^2/2 QMP round trips)
STARTING_PORTS: set[int] = set()
FDSETS_QUERY: tuple[str, None] = ("query-fdsets", None)
TLS_CREDS_ID = "cbt-nbd-tls"  # the VM's tls-creds-x509 object with [nbd] tls = "x509"
PSK_CREDS_ID = "cbt-nbd-psk"  # the VM's tls-creds-psk object with [nbd] tls = "psk"


def private_dir(path: Path) -> None:
    """Create `path` (and parents) owner-only; an existing directory is left as it is."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask


def psk_dir(cfg: Config, task_uuid: str) -> Path:
    """The directory QEMU's tls-creds-psk reads the task's current key from (named by the
    task, which the database holds: recorded before the directory is made)."""
    return cfg.psk_dir / task_uuid


async def export_psk(cfg: Config, server: NbdServer, task_uuid: str) -> Psk | None:
    """The pre-shared key a client needs for `server`'s exports; None when it takes none.
    Raises OperationError when the server requires one and it is gone, or when its file is
    not private (see secretfiles)."""
    if not server.psk:
        return None
    try:
        key = await asyncio.to_thread(psk.read_server_dir, psk_dir(cfg, task_uuid))
    except NotPrivate as e:
        raise OperationError(
            f"the task's NBD pre-shared key is not private, so it is not handed out: {e}; "
            "others may have read it: Disable and Enable again for a fresh one"
        ) from None
    if key is None:
        raise OperationError(
            f"the task's NBD exports require a pre-shared key and {psk_dir(cfg, task_uuid)} "
            "holds none: Disable and Enable again"
        )
    return key


def nbd_address(
    cfg: Config, server: NbdServer, export_name: str, key: Psk | None = None
) -> nbdio.NbdAddress:
    """How the agent itself reaches an export of `server`: TLS with the configured CA, or with
    `key` (from `export_psk`) when the server requires a pre-shared key."""
    tls_dir: str | None = None
    if server.psk:
        if key is None:
            raise OperationError("the export requires a pre-shared key and none was given")
        return nbdio.NbdAddress(server.host, server.port, server.socket, export_name, psk=key)
    if server.tls:
        if cfg.nbd.tls_cert_dir is None:
            raise OperationError(
                "the export requires NBD TLS but [nbd] tls_cert_dir is no longer configured"
            )
        tls_dir = str(cfg.nbd.tls_cert_dir)
    return nbdio.NbdAddress(server.host, server.port, server.socket, export_name, tls_dir)


def read_changes(
    address: nbdio.NbdAddress, context: str, size: int, granularity: int
) -> tuple[bytes, int, DirtyMap]:
    """An export's change set, read once (blocking: run it in a thread): the cluster bitmap of
    Enable's `bitmapBase64`, the bytes it changes (`changedBytes`), and the dirty runs as QEMU
    reported them (kept for the changed-areas pages, see `engine.exportmaps`)."""
    dirty = nbdio.read_dirty_map(address, context)
    bits = dirty.bitmap(size, granularity)
    return bits, bitmap_changed_bytes(bits, size, granularity), dirty


def tls_copy_dir(cfg: Config, task_uuid: str) -> Path:
    """Where a VM's QEMU reads its copy of [nbd] tls_cert_dir while its tls-creds-x509 object
    is made (removed right after: QEMU has read the files by then)."""
    return cfg.tls_copy_dir / task_uuid


def _copy_tls_dir(source: Path, directory: Path, owner: QemuUser) -> None:
    """Copy the certificate files QEMU reads from `source` into a fresh 0700 `directory`,
    each 0600, all owned by `owner`. Blocking."""
    remove_tls_copy(directory)
    directory.mkdir(parents=True, mode=0o700)
    os.chmod(directory, 0o700)
    process.give(directory, owner)
    for name in NBD_TLS_FILES + NBD_TLS_OPTIONAL_FILES:
        if name in NBD_TLS_OPTIONAL_FILES and not (source / name).exists():
            continue
        target = directory / name
        data = (source / name).read_bytes()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        process.give(target, owner)


def remove_tls_copy(directory: Path) -> None:
    """Remove a copy made by `_copy_tls_dir` (idempotent). Blocking."""
    shutil.rmtree(directory, ignore_errors=True)


async def _pass_dir(qmp: QmpChannel, directory: Path, what: str) -> fds.PassedFd:
    """Hand QEMU a descriptor of `directory`; QEMU reads the files in it by name through
    `/proc/self/fd/<fd>`, which no directory above it (the agent's, 0700) stands in the way of."""
    fd = await asyncio.to_thread(fds.open_dir, str(directory))
    try:
        return await fds.add_fd(qmp, fd, what)
    finally:
        os.close(fd)


async def _x509_creds(
    cfg: Config, qmp: QmpChannel, task_uuid: str, cert_dir: Path, by_fd: bool
) -> str:
    """The VM's tls-creds-x509 object on `cert_dir` ([nbd] tls_cert_dir). Handed to QEMU as a
    private copy owned by its user (the server key in cert_dir is the agent's alone), passed
    by descriptor and removed once the object has read it."""
    if not by_fd:
        await nbd_server.add_tls_creds(qmp, TLS_CREDS_ID, str(cert_dir))
        return TLS_CREDS_ID
    owner = await process.user_of(qmp)
    copy = tls_copy_dir(cfg, task_uuid)
    await asyncio.to_thread(private_dir, cfg.tls_copy_dir)
    try:
        await asyncio.to_thread(_copy_tls_dir, cert_dir, copy, owner)
        passed = await _pass_dir(qmp, copy, fds.opaque(task_uuid, "x509"))
        try:
            await nbd_server.add_tls_creds(qmp, TLS_CREDS_ID, passed.proc_path)
        finally:
            await fds.remove_fdset(qmp, passed.fdset_id)
    finally:
        await asyncio.to_thread(remove_tls_copy, copy)
    return TLS_CREDS_ID


async def _new_psk(cfg: Config, store: Store, qmp: QmpChannel, task_uuid: str, by_fd: bool) -> str:
    """A fresh key for this Enable: recorded as the task's (the database names the directory
    before it exists, so teardown and reconcile find it), written 0600 in a 0700 directory
    (and a copy for QEMU's user alone, passed by descriptor, when `by_fd`), and a
    tls-creds-psk object on it. The previous Enable's key is replaced, never reused."""
    await store.run(SyncStore.set_server, task_uuid, NbdServer(tls=True, psk=True))
    directory = psk_dir(cfg, task_uuid)
    owner = await process.user_of(qmp) if by_fd else None
    await asyncio.to_thread(private_dir, cfg.psk_dir)
    qemu_dir = await asyncio.to_thread(psk.write_server_dir, directory, Psk.new(), owner)
    where = str(qemu_dir)
    if by_fd:
        # kept until teardown: QEMU reads keys.psk at every handshake
        where = (await _pass_dir(qmp, qemu_dir, fds.opaque(task_uuid, "psk"))).proc_path
    await nbd_server.add_psk_creds(qmp, PSK_CREDS_ID, where)
    return PSK_CREDS_ID


async def start_nbd_server(
    cfg: Config,
    store: Store,
    qmp: QmpChannel,
    task_uuid: str,
    vm_uuid: str,
    *,
    by_fd: bool,
) -> NbdServer:
    """Start the VM's NBD server as configured: TCP on a free port of the range, or a unix
    socket in [nbd] socket_dir; with TLS per [nbd] tls (x509: the certificate of tls_cert_dir;
    psk: a fresh pre-shared key, read back with `export_psk`). The socket path and the key's
    directory are recorded before they are made, the port as soon as QEMU has taken one.
    `by_fd`: the socket and the credential's directory go to QEMU as descriptors (a VM's QEMU,
    whatever user it runs as); False: QEMU opens them by path (the agent's own daemon)."""
    tls = cfg.nbd.tls != "none"
    with_psk = cfg.nbd.tls == "psk"
    creds: str | None = None
    if cfg.nbd.tls == "x509" and cfg.nbd.tls_cert_dir is not None:
        creds = await _x509_creds(cfg, qmp, task_uuid, cfg.nbd.tls_cert_dir, by_fd)
    elif with_psk:
        creds = await _new_psk(cfg, store, qmp, task_uuid, by_fd)
    if cfg.nbd.transport == "unix":
        path = cfg.nbd.socket_path(vm_uuid)
        if len(os.fsencode(path)) > UNIX_PATH_MAX:  # a VM uuid longer than ZStack's 32 hex
            raise OperationError(f"NBD socket path {path} is too long for a unix socket")
        server = NbdServer(socket=str(path), tls=tls, psk=with_psk)
        await asyncio.to_thread(private_dir, path.parent)
        await store.run(SyncStore.set_server, task_uuid, server)
        if by_fd:
            await nbd_server.start_unix_fd(qmp, str(path), creds)
        else:
            await nbd_server.start_unix(qmp, str(path), creds)
        return server
    used = await store.run(SyncStore.used_nbd_ports)
    ports = [p for p in range(cfg.nbd.port_first, cfg.nbd.port_last + 1) if p not in used]
    port = await nbd_server.start_inet(qmp, cfg.nbd.listen, ports, creds, STARTING_PORTS)
    try:
        server = NbdServer(cfg.nbd.listen, port, None, tls, with_psk)
        await store.run(SyncStore.set_server, task_uuid, server)
    finally:
        STARTING_PORTS.discard(port)  # recorded now: `used_nbd_ports` has it
    return server


async def remove_psk_dir(cfg: Config, task_uuid: str) -> None:
    """Remove the task's key from disk (idempotent)."""
    await asyncio.to_thread(psk.remove_server_dir, psk_dir(cfg, task_uuid))


async def teardown_exports(
    cfg: Config,
    store: Store,
    qmp: QmpChannel,
    task_uuid: str,
    *,
    force: bool,
    step: StepHook | None = None,
) -> None:
    """End a task's exports: NBD exports, the NBD server, each disk's access node and filter
    (the device back on its disk), scratch nodes and files. Idempotent: safe after a crash at
    any point of Enable or Disable."""
    exports = await store.run(SyncStore.exports, task_uuid)
    server = await store.run(SyncStore.nbd_server, task_uuid)
    await nbd_server.delete_exports(qmp, [e.export_id for e in exports], force=force)
    if step:
        await step("disable:exports")
    await nbd_server.stop(qmp)
    if server.socket is not None:
        await asyncio.to_thread(nbd_server.remove_socket_file, server.socket)
    if (server.tls and not server.psk) or cfg.nbd.tls == "x509":
        await nbd_server.delete_object(qmp, TLS_CREDS_ID)
    if server.psk or cfg.nbd.tls == "psk":
        # the key dies with the object and the file (QEMU reads the file at each handshake)
        await nbd_server.delete_object(qmp, PSK_CREDS_ID)
        await remove_psk_dir(cfg, task_uuid)
    # what is left, read in one round trip: an older agent's fleecing jobs (an export made
    # before the copy-before-write filter ran one), the block graph, the task's fd sets
    state = await execute_all(qmp, [("query-jobs", None), *fleece.GRAPH_QUERIES, FDSETS_QUERY])
    live_jobs = {str(j["id"]) for j in state[0]}
    old_jobs = [e.job_id for e in exports if e.job_id in live_jobs]
    if old_jobs:
        await blockdev.cancel_jobs(qmp, old_jobs)
        state = [[], *await execute_all(qmp, [*fleece.GRAPH_QUERIES, FDSETS_QUERY])]
    if step:
        await step("disable:jobs")
    # the views off the disks and, in the same round trip, the descriptors of the scratch
    # files and of the key's directory (closed by QEMU once no node uses them)
    present = await fleece.remove(
        qmp,
        [fleece.view_of(e.volume_uuid, e.scratch_node, e.device_node) for e in exports],
        fleece.graph_of(state[1:4]),
        then=[
            fds.remove_command(i)
            for i in fds.fdsets_with_prefix(state[4], fds.task_prefix(task_uuid))
        ],
    )
    for e in exports:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, e.scratch_path)
    for e in exports:
        # an older agent's change set lived on the disk's top (now it dies with the access node)
        if e.temp_bitmap and e.temp_bitmap in bitmaps.bitmaps_of(present.get(e.device_node)):
            await bitmaps.remove_bitmap(qmp, e.device_node, e.temp_bitmap)
    if step:
        await step("disable:scratch")
    await store.run(SyncStore.clear_exports, task_uuid)
