"""QEMU block-layer steps used by checkpoints and exports, each one QMP command or a short poll.

Waiting is done by polling query commands rather than by events, so the libvirt passthrough
(which delivers no events) and the socket behave the same. Removal steps are idempotent: a thing
already gone is success, so cleanup can be re-run after any crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from dataclasses import dataclass
from typing import Any

from cbt_agent.errors import HypervisorError, QmpCommandError
from cbt_agent.model import BitmapState, Layer
from cbt_agent.qemu.qmp import QmpChannel

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.02


@dataclass(frozen=True)
class BlockDevice:
    """A guest disk as `query-block` shows it: its device alias and top format node."""

    alias: str
    node_name: str
    driver: str
    virtual_size: int
    filename: str


def _alias_of(entry: dict[str, Any]) -> str:
    # libvirt >= 6 (-blockdev): qdev "/machine/peripheral/virtio-disk0/virtio-backend", device ""
    qdev = str(entry.get("qdev") or "")
    if qdev.startswith("/machine/peripheral/"):
        return qdev.split("/")[3]
    if qdev:
        return qdev
    device = str(entry.get("device") or "")
    return device.removeprefix("drive-")


async def block_devices(qmp: QmpChannel) -> dict[str, BlockDevice]:
    """Guest disks with a medium, by device alias. While a fleecing job runs the node shown is
    the copy-before-write filter: callers use the node names recorded before the job."""
    out: dict[str, BlockDevice] = {}
    for entry in await qmp.execute("query-block"):
        inserted = entry.get("inserted")
        if not inserted:
            continue
        alias = _alias_of(entry)
        image = inserted.get("image", {})
        out[alias] = BlockDevice(
            alias=alias,
            node_name=str(inserted.get("node-name", "")),
            driver=str(inserted.get("drv", "")),
            virtual_size=int(image.get("virtual-size", 0)),
            filename=str(inserted.get("file", "")),
        )
    return out


async def named_nodes(qmp: QmpChannel) -> dict[str, dict[str, Any]]:
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    return {str(n["node-name"]): n for n in nodes}


async def chain_nodes(qmp: QmpChannel) -> list[dict[str, Any]]:
    """Every named node with its image's whole backing chain (filenames and formats)."""
    return list(await qmp.execute("query-named-block-nodes", {"flat": False}))


# protocol drivers: the `file` child of a format node is one of these
PROTOCOL_DRIVERS = frozenset({"file", "host_device", "host_cdrom"})


def disk_chain(nodes: list[dict[str, Any]], top: str) -> list[Layer]:
    """The backing chain below format node `top`, top first, as QEMU holds it now.

    QEMU 7.2 names no backing node in `query-named-block-nodes`; each node's `image` lists
    its backing images by filename and format. A layer is the format node of that filename
    and driver (its protocol node has the same filename but driver `file`). The walk stops at
    an image no named node holds (then the chain is only as long as what could be matched).
    """
    by_name = {str(n.get("node-name")): n for n in nodes}
    node = by_name.get(top)
    if node is None:
        return []
    layers = [_layer(node)]
    used = {top}
    image = (node.get("image") or {}).get("backing-image")
    while image:
        filename, fmt = image.get("filename"), image.get("format")
        match = next(
            (
                n
                for n in nodes
                if n.get("file") == filename
                and n.get("drv") == fmt
                and str(n.get("node-name")) not in used
            ),
            None,
        )
        if match is None:
            log.warning("backing image %s of %s: no node holds it", filename, top)
            break
        used.add(str(match["node-name"]))
        layers.append(_layer(match))
        image = image.get("backing-image")
    return layers


def _layer(node: dict[str, Any]) -> Layer:
    return Layer(
        node=str(node["node-name"]),
        filename=str(node.get("file", "")),
        size=int((node.get("image") or {}).get("virtual-size", 0)),
        bitmaps=bitmaps_of(node),
        read_only=bool(node.get("ro", False)),
        driver=str(node.get("drv", "")),
    )


def file_child(nodes: list[dict[str, Any]], layer: Layer) -> str | None:
    """The protocol node under a layer's format node (same filename, a protocol driver)."""
    for n in nodes:
        if (
            n.get("file") == layer.filename
            and n.get("drv") in PROTOCOL_DRIVERS
            and n.get("node-name") != layer.node
        ):
            return str(n["node-name"])
    return None


async def foreign_block_jobs(qmp: QmpChannel) -> list[str]:
    """Block jobs not started by the agent (commit, stream, mirror, backup), as 'type id'."""
    return [
        f"{j.get('type', 'block')} job {j.get('device')}"
        for j in await qmp.execute("query-block-jobs")
        if not str(j.get("device", "")).startswith("cbtjob-")
    ]


async def reopen(
    qmp: QmpChannel,
    node: str,
    driver: str,
    file_node: str,
    backing: str | None,
    *,
    read_only: bool,
) -> None:
    """blockdev-reopen a format node read-write or read-only, keeping its children."""
    options: dict[str, Any] = {
        "node-name": node,
        "driver": driver,
        "file": file_node,
        "read-only": read_only,
    }
    if backing is not None:
        options["backing"] = backing
    await qmp.execute("blockdev-reopen", {"options": [options]})


def bitmaps_of(node: dict[str, Any] | None) -> dict[str, BitmapState]:
    """Named bitmaps of a node (anonymous ones, seen during jobs, are left out)."""
    if not node:
        return {}
    out: dict[str, BitmapState] = {}
    for b in node.get("dirty-bitmaps", []) or []:
        name = b.get("name")
        if not name:
            continue
        out[name] = BitmapState(
            name=name,
            recording=bool(b.get("recording", False)),
            persistent=bool(b.get("persistent", False)),
            inconsistent=bool(b.get("inconsistent", False)),
            busy=bool(b.get("busy", False)),
            granularity=int(b.get("granularity", 65536)),
            count=int(b.get("count", 0)),
        )
    return out


# QMP's classes for "no such thing"; most refusals are GenericError and only their text tells
_ABSENT_CLASSES = frozenset({"DeviceNotFound", "DeviceNotActive"})
_ABSENT_TEXT = ("not found", "cannot find")


def _says(e: QmpCommandError, *needles: str) -> bool:
    """Whether QEMU's refusal says one of these things (case-insensitive)."""
    text = e.reply.lower()
    return any(n in text for n in needles)


def _absent(e: QmpCommandError, *also: str) -> bool:
    """Whether QEMU refused because the thing is not there: by QMP's error class where it has
    one, else by its text (with `also`, other wordings of the same)."""
    return e.error_class in _ABSENT_CLASSES or _says(e, *_ABSENT_TEXT, *also)


async def remove_bitmap(qmp: QmpChannel, node: str, name: str) -> bool:
    """Remove a bitmap; False if it was not there."""
    try:
        await qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": name})
    except QmpCommandError as e:
        if _absent(e, "dirty bitmap"):
            return False
        raise
    return True


async def wait_until(what: str, probe: Any, limit: float, interval: float = POLL_INTERVAL) -> None:
    """Poll the async `probe()` until it returns True, or raise HypervisorError after timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not await probe():
        if loop.time() > deadline:
            raise HypervisorError(f"timed out after {limit:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


async def export_ids_of(qmp: QmpChannel) -> set[str]:
    return {str(e["id"]) for e in await qmp.execute("query-block-exports")}


async def delete_exports(
    qmp: QmpChannel, export_ids: list[str], *, force: bool, grace: float = 3.0
) -> None:
    """Remove NBD exports and wait until QEMU has let go of them. Safe mode first (refused
    while a client is connected); after `grace` seconds, or at once with `force`, hard mode."""
    live = await export_ids_of(qmp)
    pending = [x for x in export_ids if x in live]
    if not pending:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    for export_id in pending:
        mode = "hard" if force else "safe"
        while True:
            try:
                await qmp.execute("block-export-del", {"id": export_id, "mode": mode})
                break
            except QmpCommandError as e:
                if _absent(e):
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


async def stop_nbd_server(qmp: QmpChannel) -> None:
    try:
        await qmp.execute("nbd-server-stop")
    except QmpCommandError as e:
        if not _says(e, "not running", "no nbd server"):
            raise


async def job_ids(qmp: QmpChannel) -> set[str]:
    return {str(j["id"]) for j in await qmp.execute("query-jobs")}


async def cancel_jobs(qmp: QmpChannel, ids: list[str]) -> None:
    """Cancel block jobs and wait until they are gone (dismissed)."""
    live = await job_ids(qmp)
    pending = [j for j in ids if j in live]
    for job_id in pending:
        try:
            await qmp.execute("block-job-cancel", {"device": job_id, "force": True})
        except QmpCommandError as e:
            if not _absent(e, "no active block job"):
                raise

    async def gone() -> bool:
        jobs = {str(j["id"]): j for j in await qmp.execute("query-jobs")}
        left = False
        for job_id in pending:
            job = jobs.get(job_id)
            if job is None:
                continue
            left = True
            if job.get("status") == "concluded":
                await qmp.execute("job-dismiss", {"id": job_id})
        return not left

    if pending:
        await wait_until(f"jobs {', '.join(pending)} to end", gone, 30)


async def delete_node(qmp: QmpChannel, node_name: str, limit: float = 10.0) -> None:
    """blockdev-del a node, retrying while it is still in use (export or job winding down)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        try:
            await qmp.execute("blockdev-del", {"node-name": node_name})
            return
        except QmpCommandError as e:
            if _absent(e):
                return
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


async def _start_or_restart(qmp: QmpChannel, args: dict[str, Any]) -> None:
    """nbd-server-start; a server left running by an interrupted operation is stopped first."""
    try:
        await qmp.execute("nbd-server-start", args)
    except QmpCommandError as e:
        if not _says(e, "already running"):
            raise
        log.warning("an NBD server was left running: stopping it")
        await stop_nbd_server(qmp)
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


async def start_nbd_server_unix(qmp: QmpChannel, path: str, tls_creds: str | None = None) -> None:
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
        await stop_nbd_server(qmp)
        remove_socket_file(path)
        raise HypervisorError(f"cannot make the NBD socket {path} private: {e.strerror}") from None


async def add_tls_creds(qmp: QmpChannel, creds_id: str, cert_dir: str) -> None:
    """(Re)create the VM's `tls-creds-x509` server object from `cert_dir`, so certificates
    replaced on disk are read again. An object of that id still held by a running NBD server
    keeps working for it; the new one serves the next nbd-server-start."""
    try:
        await delete_object(qmp, creds_id)
    except QmpCommandError as e:
        log.warning("cannot remove the old %s (kept, not re-read): %s", creds_id, e)
    args = {
        "qom-type": "tls-creds-x509",
        "id": creds_id,
        "dir": cert_dir,
        "endpoint": "server",
        "verify-peer": False,
    }
    try:
        await qmp.execute("object-add", args)
    except QmpCommandError as e:
        if not _says(e, "already exists", "duplicate"):
            raise


async def delete_object(qmp: QmpChannel, object_id: str) -> None:
    """object-del; an object that is not there is success."""
    try:
        await qmp.execute("object-del", {"id": object_id})
    except QmpCommandError as e:
        if not _absent(e, "no such"):
            raise


async def start_nbd_server(
    qmp: QmpChannel, host: str, ports: list[int], tls_creds: str | None = None
) -> int:
    """Start the VM's NBD server on the first free port of `ports`. A server left running by an
    earlier, interrupted operation is stopped first (it would make every later start fail)."""
    restarted = False
    last: QmpCommandError | None = None
    for port in ports:
        args: dict[str, Any] = {"addr": {"type": "inet", "data": {"host": host, "port": str(port)}}}
        if tls_creds:
            args["tls-creds"] = tls_creds
        try:
            await qmp.execute("nbd-server-start", args)
            return port
        except QmpCommandError as e:
            last = e
            if _says(e, "already running") and not restarted:
                log.warning("an NBD server was left running: stopping it")
                await stop_nbd_server(qmp)
                restarted = True
                try:
                    await qmp.execute("nbd-server-start", args)
                    return port
                except QmpCommandError as e2:
                    last = e2
            if _says(last, "address already in use", "failed to bind", "in use"):
                continue
            raise
    raise HypervisorError(
        f"no free NBD port in the configured range ({last.reply if last else ''})"
    )
