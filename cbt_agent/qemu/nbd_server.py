"""QEMU's built-in NBD server and its block exports, each step one QMP command or a short poll.

Removal steps are idempotent (a thing already gone is success) and a server left running by an
interrupted operation is stopped before a new one starts, so cleanup can be re-run after any
crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from typing import Any

from cbt_agent.errors import HypervisorError, QmpCommandError
from cbt_agent.model import Source
from cbt_agent.qemu import fds
from cbt_agent.qemu.blockdev import wait_until
from cbt_agent.qemu.qmp import QmpChannel, execute_many
from cbt_agent.qemu.refusals import absent, says

log = logging.getLogger(__name__)


def export_args(
    export_id: str, node: str, name: str, bitmap: Source | None, *, trim: bool = False
) -> dict[str, Any]:
    """`block-export-add` of an NBD export of `node` named `name`, with the dirty bitmap
    (node, name) it publishes as `qemu:dirty-bitmap:<name>` when given. Read-only, unless
    `trim`: QEMU's NBD server takes a trim only on a writable export (of a snapshot-access
    node: its writes fail, a trim frees the scratch)."""
    args: dict[str, Any] = {
        "type": "nbd",
        "id": export_id,
        "node-name": node,
        "name": name,
        "writable": trim,
    }
    if bitmap is not None:
        args["bitmaps"] = [{"node": bitmap[0], "name": bitmap[1]}]
    return args


async def add_export(
    qmp: QmpChannel,
    export_id: str,
    node: str,
    name: str,
    bitmap: Source | None,
    *,
    trim: bool = False,
) -> None:
    await qmp.execute("block-export-add", export_args(export_id, node, name, bitmap, trim=trim))


async def export_ids_of(qmp: QmpChannel) -> set[str]:
    return {str(e["id"]) for e in await qmp.execute("query-block-exports")}


async def delete_exports(
    qmp: QmpChannel, export_ids: list[str], *, force: bool, grace: float = 3.0
) -> None:
    """Remove NBD exports and wait until QEMU has let go of them. Safe mode first (refused
    while a client is connected); after `grace` seconds, or at once with `force`, hard mode."""
    if not export_ids:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    first = "hard" if force else "safe"
    # all in one round trip (one that is gone already answers "not found": nothing to wait
    # for); one a client still holds is retried on its own below
    replies = await execute_many(
        qmp, [("block-export-del", {"id": x, "mode": first}) for x in export_ids]
    )
    pending = [
        x
        for x, r in zip(export_ids, replies, strict=True)
        if not (isinstance(r, QmpCommandError) and absent(r))
    ]
    if not pending:
        return
    retry = [
        x
        for x, r in zip(export_ids, replies, strict=True)
        if isinstance(r, QmpCommandError) and not absent(r)
    ]
    for export_id in retry:
        mode = first
        while True:
            try:
                await qmp.execute("block-export-del", {"id": export_id, "mode": mode})
                break
            except QmpCommandError as e:
                if absent(e):
                    break
                if mode == "safe" and loop.time() < deadline:
                    await asyncio.sleep(0.1)
                    continue
                if mode == "safe":
                    log.warning(
                        "export %s still in use after %.0fs: removing it hard", export_id, grace
                    )
                    mode = "hard"
                    continue
                raise

    async def gone() -> bool:
        return not set(pending) & await export_ids_of(qmp)

    await wait_until(f"exports {', '.join(pending)} to be deleted", gone, 30)


async def stop(qmp: QmpChannel) -> None:
    try:
        await qmp.execute("nbd-server-stop")
    except QmpCommandError as e:
        if not says(e, "not running", "no nbd server"):
            raise


async def _start_or_restart(qmp: QmpChannel, args: dict[str, Any]) -> None:
    """nbd-server-start; a server left running by an interrupted operation is stopped first."""
    try:
        await qmp.execute("nbd-server-start", args)
    except QmpCommandError as e:
        if not says(e, "already running"):
            raise
        log.warning("an NBD server was left running: stopping it")
        await stop(qmp)
        await qmp.execute("nbd-server-start", args)


def remove_socket_file(path: str) -> bool:
    """Remove a unix socket (or stale file) at `path`; False if there was none. Never removes a
    directory. Blocking (an unlink): fine to call from the event loop."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        raise HypervisorError(f"{path} is a directory, not an NBD socket")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True


async def start_unix(qmp: QmpChannel, path: str, tls_creds: str | None = None) -> None:
    """Start the VM's NBD server on a unix socket at `path`, owner-only (0600). A stale file at
    `path` is removed first; so is a server left running by an interrupted operation."""
    if remove_socket_file(path):
        log.warning("removed a stale NBD socket %s", path)
    args: dict[str, Any] = {"addr": {"type": "unix", "data": {"path": path}}}
    if tls_creds:
        args["tls-creds"] = tls_creds
    await _start_or_restart(qmp, args)
    # QEMU made the socket with its umask; only the owner may connect (connect needs write)
    try:
        os.chmod(path, 0o600)
    except OSError as e:
        await stop(qmp)
        remove_socket_file(path)
        raise HypervisorError(f"cannot make the NBD socket {path} private: {e.strerror}") from None


SOCKET_FD_NAME = "cbt-nbd-listen"  # the monitor's name for the listening socket handed over
LISTEN_BACKLOG = 16


def listening_socket(path: str) -> socket.socket:
    """A unix socket bound at `path`, owner-only (0600: connecting needs write), listening.
    Blocking (bind, chmod): fine to call from the event loop."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)  # before it listens: never connectable by anyone else
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        remove_socket_file(path)
        raise HypervisorError(f"cannot listen on NBD socket {path}: {e.strerror}") from None
    return sock


async def start_unix_fd(qmp: QmpChannel, path: str, tls_creds: str | None = None) -> None:
    """Start the VM's NBD server on a unix socket at `path` that the agent binds (0600, its
    own) and hands to QEMU as a descriptor: QEMU needs no access to the socket's directory.
    A stale file at `path` is removed first; so is a server left running by an interrupted
    operation (before the new socket is bound: QEMU unlinks its old listener's path when it
    closes it)."""
    args: dict[str, Any] = {"addr": {"type": "fd", "data": {"str": SOCKET_FD_NAME}}}
    if tls_creds:
        args["tls-creds"] = tls_creds
    for attempt in (1, 2):
        if remove_socket_file(path):
            log.warning("removed a stale NBD socket %s", path)
        sock = listening_socket(path)
        try:
            await fds.pass_named(qmp, sock.fileno(), SOCKET_FD_NAME)
            await qmp.execute("nbd-server-start", args)
            return
        except QmpCommandError as e:
            with contextlib.suppress(QmpCommandError):
                await fds.close_named(qmp, SOCKET_FD_NAME)
            remove_socket_file(path)
            if attempt == 1 and says(e, "already running"):
                log.warning("an NBD server was left running: stopping it")
                await stop(qmp)
                continue
            raise
        except BaseException:
            remove_socket_file(path)
            raise
        finally:
            sock.close()  # QEMU holds its own copy


async def add_tls_creds(qmp: QmpChannel, creds_id: str, cert_dir: str) -> None:
    """(Re)create the VM's `tls-creds-x509` server object from `cert_dir`, so certificates
    replaced on disk are read again. An object of that id still held by a running NBD server
    keeps working for it; the new one serves the next nbd-server-start. Clients are not asked
    for a certificate (`verify-peer: false`): x509 encrypts and proves the server only."""
    await _replace_object(
        qmp,
        {
            "qom-type": "tls-creds-x509",
            "id": creds_id,
            "dir": cert_dir,
            "endpoint": "server",
            "verify-peer": False,
        },
    )


async def add_psk_creds(qmp: QmpChannel, creds_id: str, psk_dir: str) -> None:
    """(Re)create the VM's `tls-creds-psk` server object on `psk_dir` (its keys.psk and
    dh-params.pem, see `qemu.psk`). QEMU reads keys.psk at every handshake: only identities
    in that file, with their keys, get through."""
    await _replace_object(
        qmp, {"qom-type": "tls-creds-psk", "id": creds_id, "dir": psk_dir, "endpoint": "server"}
    )


async def _replace_object(qmp: QmpChannel, args: dict[str, Any]) -> None:
    creds_id = str(args["id"])
    try:
        await delete_object(qmp, creds_id)
    except QmpCommandError as e:
        log.warning("cannot remove the old %s (kept, not re-read): %s", creds_id, e)
    try:
        await qmp.execute("object-add", args)
    except QmpCommandError as e:
        if not says(e, "already exists", "duplicate"):
            raise


async def delete_object(qmp: QmpChannel, object_id: str) -> None:
    """object-del; an object that is not there is success."""
    try:
        await qmp.execute("object-del", {"id": object_id})
    except QmpCommandError as e:
        if not absent(e, "no such"):
            raise


async def start_inet(
    qmp: QmpChannel,
    host: str,
    ports: list[int],
    tls_creds: str | None = None,
    claimed: set[int] | None = None,
) -> int:
    """Start the VM's NBD server on the first free port of `ports`. A server left running by an
    earlier, interrupted operation is stopped first (it would make every later start fail).

    `claimed`: the ports other starts of this process are trying right now (skipped, so a
    hundred Enables at once do not all try the same port first); the port tried is added to
    it and, unless the start succeeded, removed again: the caller removes a started port once
    it is recorded."""
    restarted = False
    last: QmpCommandError | None = None
    claims = claimed if claimed is not None else set()
    for port in ports:
        if port in claims:
            continue
        claims.add(port)
        args: dict[str, Any] = {"addr": {"type": "inet", "data": {"host": host, "port": str(port)}}}
        if tls_creds:
            args["tls-creds"] = tls_creds
        started = False
        try:
            await qmp.execute("nbd-server-start", args)
            started = True
            return port
        except QmpCommandError as e:
            last = e
            if says(e, "already running") and not restarted:
                log.warning("an NBD server was left running: stopping it")
                await stop(qmp)
                restarted = True
                try:
                    await qmp.execute("nbd-server-start", args)
                    started = True
                    return port
                except QmpCommandError as e2:
                    last = e2
            if says(last, "address already in use", "failed to bind", "in use"):
                continue
            raise
        finally:
            if not started:
                claims.discard(port)
    raise HypervisorError(
        f"no free NBD port in the configured range ({last.reply if last else ''})"
    )
