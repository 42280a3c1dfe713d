"""QEMU's block graph: the guest's disks, named nodes and each disk's backing chain, adding and
removing nodes, and block jobs; each step one QMP command or a short poll.

Waiting is done by polling query commands rather than by events, so the libvirt passthrough
(which delivers no events) and the socket behave the same. Removal steps are idempotent: a thing
already gone is success, so cleanup can be re-run after any crash. Bitmaps are in `bitmaps.py`,
the NBD server and exports in `nbd_server.py`, the checkpoint transaction in `transaction.py`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from cbt_agent.errors import HypervisorError, QmpCommandError
from cbt_agent.model import Layer
from cbt_agent.qemu.bitmaps import bitmaps_of
from cbt_agent.qemu.qmp import QmpChannel, execute_all, execute_many
from cbt_agent.qemu.refusals import absent

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
    qdev: str = ""  # the guest device's QOM path (whose `drive` the export's filter takes)


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
    """Guest disks with a medium, by device alias. While a disk is exported the node shown is
    its copy-before-write filter: callers use the node names recorded before."""
    return devices_of(await qmp.execute("query-block"))


async def devices_and_chains(
    qmp: QmpChannel,
) -> tuple[dict[str, BlockDevice], list[dict[str, Any]]]:
    """`block_devices` and `chain_nodes` read in one round trip."""
    blocks, nodes = await execute_all(
        qmp, [("query-block", None), ("query-named-block-nodes", {"flat": False})]
    )
    return devices_of(blocks), list(nodes)


def devices_of(query_block: list[dict[str, Any]]) -> dict[str, BlockDevice]:
    """`block_devices` from a `query-block` reply."""
    out: dict[str, BlockDevice] = {}
    for entry in query_block:
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
            qdev=str(entry.get("qdev") or ""),
        )
    return out


def named_nodes_command() -> tuple[str, dict[str, Any]]:
    """The query behind `named_nodes`, for a batch; its reply goes to `by_node_name`."""
    return "query-named-block-nodes", {"flat": True}


def by_node_name(nodes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(n["node-name"]): n for n in nodes}


async def named_nodes(qmp: QmpChannel) -> dict[str, dict[str, Any]]:
    return by_node_name(await qmp.execute(*named_nodes_command()))


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
        compat=str(
            (((node.get("image") or {}).get("format-specific") or {}).get("data") or {}).get(
                "compat", "1.1"
            )
        ),
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


BLOCK_JOBS_QUERY: tuple[str, None] = ("query-block-jobs", None)


def foreign_jobs_of(query_block_jobs: list[dict[str, Any]]) -> list[str]:
    """Block jobs not started by the agent (commit, stream, mirror, backup), as 'type id'."""
    return [
        f"{j.get('type', 'block')} job {j.get('device')}"
        for j in query_block_jobs
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


async def wait_until(what: str, probe: Any, limit: float, interval: float = POLL_INTERVAL) -> None:
    """Poll the async `probe()` until it returns True, or raise HypervisorError after timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not await probe():
        if loop.time() > deadline:
            raise HypervisorError(f"timed out after {limit:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


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
            if not absent(e, "no active block job"):
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


async def delete_nodes(qmp: QmpChannel, node_names: list[str]) -> None:
    """blockdev-del of every node in order, in one round trip; a node gone already is success,
    one still in use is retried on its own (`delete_node`)."""
    if not node_names:
        return
    replies = await execute_many(qmp, [("blockdev-del", {"node-name": n}) for n in node_names])
    for name, reply in zip(node_names, replies, strict=True):
        if isinstance(reply, QmpCommandError) and not absent(reply):
            await delete_node(qmp, name)


async def delete_node(qmp: QmpChannel, node_name: str, limit: float = 10.0) -> None:
    """blockdev-del a node, retrying while it is still in use (export or job winding down)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        try:
            await qmp.execute("blockdev-del", {"node-name": node_name})
            return
        except QmpCommandError as e:
            if absent(e):
                return
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)
