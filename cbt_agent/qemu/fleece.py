"""The point-in-time view of a running disk that never costs the guest a write.

Per disk, three nodes over the live one (QEMU >= 7.1, verified on 7.2):

    device ── copy-before-write filter ──file──> the disk's top format node (bitmaps live here)
                     └─────────────────target──> scratch qcow2 (no backing, discard=unmap)
    NBD export ── snapshot-access ──file──> the filter

The filter copies a cluster's old data into the scratch before the guest first overwrites it,
with `on-cbw-error: break-snapshot`: when the scratch cannot take a copy (its filesystem is full,
or the copy takes longer than `cbw-timeout`), the snapshot breaks (its reads fail) and the
guest's write goes on. `snapshot-access` serves the point-in-time view; a client's discard
(NBD trim) frees that range in the scratch and ends the copies for it.

The filter goes above the disk with `qom-set <device> drive <filter>`: a graph change on the
device's backend, not a `transaction` action in 7.2. For one point in time across all disks the
VM is paused around the swaps and the bitmap transaction (`pause`/`resume`).

Node names are derived from the disk's volume uuid (at most 31 characters, a letter first).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cbt_agent.errors import QmpCommandError
from cbt_agent.qemu import blockdev
from cbt_agent.qemu.qmp import QmpChannel, execute_all, execute_many
from cbt_agent.qemu.refusals import absent

log = logging.getLogger(__name__)

FILTER_DRIVER = "copy-before-write"


def filter_node_name(volume_uuid: str) -> str:
    return f"cbtcw-{volume_uuid[:24]}"


def access_node_name(volume_uuid: str) -> str:
    return f"cbtac-{volume_uuid[:24]}"


def scratch_args(node_name: str, path: str) -> dict[str, Any]:
    """`blockdev-add` of the scratch qcow2 at `path` (the agent passes `/dev/fdset/<id>`, a
    descriptor it opened: see `qemu.fds`): the filter's target. No backing: the filter writes
    whole clusters; `discard: unmap` returns a trimmed range to the filesystem."""
    return {
        "driver": "qcow2",
        "node-name": node_name,
        "discard": "unmap",
        "file": {"driver": "file", "filename": path, "discard": "unmap"},
    }


def filter_args(node_name: str, source: str, target: str, timeout: int) -> dict[str, Any]:
    """`blockdev-add` of the copy-before-write filter over `source` into `target`."""
    return {
        "driver": FILTER_DRIVER,
        "node-name": node_name,
        "file": source,
        "target": target,
        "on-cbw-error": "break-snapshot",
        "cbw-timeout": timeout,
        # the guest's discards go on to the disk (which applies its own discard setting)
        "discard": "unmap",
    }


def access_args(node_name: str, filter_node: str) -> dict[str, Any]:
    """`blockdev-add` of the snapshot-access node that an NBD export serves. A client's trim
    reaches the filter only with `discard: unmap` (else the block layer drops it)."""
    return {
        "driver": "snapshot-access",
        "node-name": node_name,
        "file": filter_node,
        "discard": "unmap",
    }


def add_command(args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """`blockdev-add` of one of the view's nodes, for a batch (`qmp.execute_all`)."""
    return "blockdev-add", args


def set_drive_command(qdev: str, node: str) -> tuple[str, dict[str, Any]]:
    """Point the guest device at `qdev` to block node `node` (qom-set of its `drive`)."""
    return "qom-set", {"path": qdev, "property": "drive", "value": node}


async def running(qmp: QmpChannel) -> bool:
    return bool((await qmp.execute("query-status")).get("running"))


async def pause(qmp: QmpChannel) -> None:
    await qmp.execute("stop")


async def resume(qmp: QmpChannel) -> None:
    await qmp.execute("cont")


def devices_on(blocks: list[dict[str, Any]], node_names: set[str]) -> dict[str, str]:
    """The guest devices (qdev path) whose backend is one of `node_names`, by node name, from a
    `query-block` reply."""
    out: dict[str, str] = {}
    for entry in blocks:
        inserted = entry.get("inserted") or {}
        node = str(inserted.get("node-name", ""))
        if node in node_names and entry.get("qdev"):
            out[node] = str(entry["qdev"])
    return out


def filtered_node(nodes: list[dict[str, Any]], filter_node: str, fallback: str) -> str:
    """The node under the filter now: the disk's top when the filter went in, or whatever
    replaced it since (a snapshot's overlay, a commit's base). `fallback` when unknown."""
    chain = blockdev.disk_chain(nodes, filter_node)
    if len(chain) > 1 and chain[1].driver != FILTER_DRIVER:
        return chain[1].node
    return fallback


@dataclass(frozen=True)
class View:
    """One disk's point-in-time view: its nodes, and the disk's top when the filter went in."""

    access: str
    filter_node: str
    scratch: str
    source: str


def view_of(volume_uuid: str, scratch_node: str, device_node: str) -> View:
    return View(
        access_node_name(volume_uuid), filter_node_name(volume_uuid), scratch_node, device_node
    )


@dataclass(frozen=True)
class Graph:
    """What `remove` reads of QEMU's block graph (in one round trip, see GRAPH_QUERIES)."""

    present: dict[str, dict[str, Any]]  # named nodes by name (query-named-block-nodes)
    blocks: list[dict[str, Any]]  # the guest devices (query-block)
    chain: list[dict[str, Any]]  # nodes with their backing chains (flat: false)


GRAPH_QUERIES: tuple[tuple[str, dict[str, Any] | None], ...] = (
    blockdev.named_nodes_command(),
    ("query-block", None),
    ("query-named-block-nodes", {"flat": False}),
)


def graph_of(replies: Sequence[Any]) -> Graph:
    """The Graph from the replies to GRAPH_QUERIES, in their order."""
    nodes, blocks, chain = replies
    return Graph(blockdev.by_node_name(nodes), list(blocks), list(chain))


async def read_graph(qmp: QmpChannel) -> Graph:
    return graph_of(await execute_all(qmp, GRAPH_QUERIES))


async def remove(
    qmp: QmpChannel,
    views: Sequence[View],
    graph: Graph | None = None,
    then: Sequence[tuple[str, dict[str, Any] | None]] = (),
) -> dict[str, dict[str, Any]]:
    """Take the views off their disks again, in the order QEMU allows: the access node, then the
    device back onto the node under the filter, then the filter and the scratch; all of it,
    and the commands `then`, in one round trip (QEMU runs them in order). A node still in use
    (an export winding down) is retried on its own; a device that cannot go back keeps its
    filter and scratch, and that refusal is raised once the rest is done, as is a failure of
    `then` (a thing gone already is no failure). Idempotent: what is gone is skipped, so it can
    be re-run after a crash at any point. `graph`: QEMU's graph as just read (read here when
    None). Returns the named nodes as they were before."""
    graph = graph if graph is not None else await read_graph(qmp)
    present = graph.present
    views = [v for v in views if {v.access, v.filter_node, v.scratch} & present.keys()]
    devices = devices_on(graph.blocks, {v.filter_node for v in views if v.filter_node in present})
    swapped = [v for v in views if v.filter_node in devices]
    deletes = [(v, v.access) for v in views if v.access in present]
    swaps = [
        set_drive_command(
            devices[v.filter_node], filtered_node(graph.chain, v.filter_node, v.source)
        )
        for v in swapped
    ]
    below = [(v, n) for v in views for n in (v.filter_node, v.scratch) if n in present]
    commands = [
        *(("blockdev-del", {"node-name": n}) for _v, n in deletes),
        *swaps,
        *(("blockdev-del", {"node-name": n}) for _v, n in below),
        *then,
    ]
    if not commands:
        return present
    replies = await execute_many(qmp, commands)

    def failed(reply: Any) -> bool:
        return isinstance(reply, QmpCommandError) and not absent(reply)

    head, rest = replies[: len(deletes)], replies[len(deletes) :]
    swapped_replies, rest = rest[: len(swaps)], rest[len(swaps) :]
    below_replies, then_replies = rest[: len(below)], rest[len(below) :]
    refused = {v.filter_node: r for v, r in zip(swapped, swapped_replies, strict=True) if failed(r)}
    for (_v, node), reply in zip(deletes, head, strict=True):
        if failed(reply):
            await blockdev.delete_node(qmp, node)
    for (v, node), reply in zip(below, below_replies, strict=True):
        if failed(reply) and v.filter_node not in refused:
            await blockdev.delete_node(qmp, node)
    if refused:
        raise next(iter(refused.values()))
    for reply in then_replies:
        if failed(reply):
            raise reply
    return present
