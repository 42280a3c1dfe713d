"""A checkpoint's exports: the VM's NBD server, how the agent reaches an export, and ending
them all again (Disable, and the rollback of a failed Enable)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from cbt_agent.config import UNIX_PATH_MAX, Config
from cbt_agent.engine.steps import StepHook
from cbt_agent.errors import OperationError
from cbt_agent.qemu import bitmaps, blockdev, nbd_server
from cbt_agent.qemu import nbd as nbdio
from cbt_agent.qemu.qmp import QmpChannel
from cbt_agent.store import NbdServer, Store, SyncStore

TLS_CREDS_ID = "cbt-nbd-tls"  # the VM's tls-creds-x509 object when [nbd] tls_cert_dir is set


def private_dir(path: Path) -> None:
    """Create `path` (and parents) owner-only; an existing directory is left as it is."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask


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
        await nbd_server.add_tls_creds(qmp, TLS_CREDS_ID, str(cfg.nbd.tls_cert_dir))
        creds = TLS_CREDS_ID
    if cfg.nbd.transport == "unix":
        path = cfg.nbd.socket_path(vm_uuid)
        if len(os.fsencode(path)) > UNIX_PATH_MAX:  # a VM uuid longer than ZStack's 32 hex
            raise OperationError(f"NBD socket path {path} is too long for a unix socket")
        server = NbdServer(socket=str(path), tls=tls)
        await asyncio.to_thread(private_dir, path.parent)
        await store.run(SyncStore.set_server, task_uuid, server)
        await nbd_server.start_unix(qmp, str(path), creds)
        return server
    used = await store.run(SyncStore.used_nbd_ports)
    ports = [p for p in range(cfg.nbd.port_first, cfg.nbd.port_last + 1) if p not in used]
    port = await nbd_server.start_inet(qmp, cfg.nbd.listen, ports, creds)
    server = NbdServer(cfg.nbd.listen, port, None, tls)
    await store.run(SyncStore.set_server, task_uuid, server)
    return server


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
    await nbd_server.delete_exports(qmp, [e.export_id for e in exports], force=force)
    if step:
        await step("disable:exports")
    await nbd_server.stop(qmp)
    if server.socket is not None:
        await asyncio.to_thread(nbd_server.remove_socket_file, server.socket)
    if server.tls or cfg.nbd.tls_cert_dir is not None:
        await nbd_server.delete_object(qmp, TLS_CREDS_ID)
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
            await bitmaps.remove_bitmap(qmp, e.device_node, e.temp_bitmap)
    if step:
        await step("disable:scratch")
    await store.run(SyncStore.clear_exports, task_uuid)
