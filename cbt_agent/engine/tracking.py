"""The task's bitmaps over a VM's life, beside Enable: checked after a VM start, removed
beyond the retention, and removed from every layer of every disk when the task goes."""

from __future__ import annotations

import logging
from collections.abc import Callable

from cbt_agent.config import Config
from cbt_agent.engine.plan import is_temp, ours
from cbt_agent.errors import HypervisorError, QmpCommandError
from cbt_agent.hypervisor.libvirt import VmInfo
from cbt_agent.model import Layer, retention_victims, tracking_break
from cbt_agent.qemu import bitmaps, blockdev
from cbt_agent.qemu.qmp import QmpChannel, execute_many
from cbt_agent.qemu.refusals import absent
from cbt_agent.reasons import TRACKING_LOST
from cbt_agent.store import Store, SyncStore

log = logging.getLogger(__name__)


async def verify_checkpoints(
    store: Store, qmp: QmpChannel, task_uuid: str, vm: VmInfo
) -> list[str]:
    """After a VM start: remove the task's inconsistent bitmaps and find the latest one
    missing, over every layer of each disk's chain. Either means QEMU stopped uncleanly; the
    task is then marked so its next Enable is a full. Returns the bitmaps found broken. (A
    chain changed offline, e.g. a new top from qemu-img, is judged per disk at the next
    Enable.)"""
    checkpoints = await store.run(SyncStore.checkpoints, task_uuid)
    devices = await blockdev.block_devices(qmp)
    nodes = await blockdev.chain_nodes(qmp)
    broken: list[str] = []
    breaks: dict[str, str] = {}
    for disk in vm.disks:
        dev = devices.get(disk.alias)
        if dev is None or dev.driver == "copy-before-write":
            continue
        chain = blockdev.disk_chain(nodes, dev.node_name)
        for layer in chain:
            for b in layer.bitmaps.values():
                if ours(task_uuid, b.name) and b.inconsistent:
                    if not layer.read_only:
                        await bitmaps.remove_bitmap(qmp, layer.node, b.name)
                    broken.append(f"{disk.volume_uuid}/{b.name} (inconsistent)")
        # The latest checkpoint's bitmap is gone from every layer only when QEMU did not close
        # the image (a bitmap added at runtime reaches the file on a clean close). An older one
        # may be gone for a good reason (a stream drops a base's frozen bitmaps): each Enable
        # judges that per disk.
        present = {name for layer in chain for name in layer.bitmaps}
        mine = [cp for cp in checkpoints if disk.volume_uuid in cp.volumes]
        if mine and mine[-1].name not in present:
            broken.append(f"{disk.volume_uuid}/{mine[-1].name} (missing)")
        # a top without tracking (a snapshot made with qemu-img while the VM was off): noted
        # now, so that a stream or copy before the next Enable cannot make it look whole
        why = tracking_break(disk.volume_uuid, checkpoints, chain)
        if why is not None:
            breaks[disk.volume_uuid] = f"{why} (seen at VM start)"
    if broken:
        log.warning("task %s: %s: %s", task_uuid, TRACKING_LOST, ", ".join(broken))
        await store.run(SyncStore.set_tracking_lost, task_uuid, TRACKING_LOST)
    if breaks:
        log.warning("task %s: tracking interrupted: %s", task_uuid, breaks)
        await store.run(SyncStore.add_pending_breaks, task_uuid, breaks)
    await bitmaps.enable_migration(qmp)
    return broken


async def apply_retention(cfg: Config, store: Store, qmp: QmpChannel, task_uuid: str) -> None:
    """Remove checkpoints beyond `[checkpoints] keep`, oldest first, from every layer of every
    disk. A bitmap left on a layer that could not be written is harmless (never merged again)
    and logged."""
    checkpoints = await store.run(SyncStore.checkpoints, task_uuid)
    victims = retention_victims(checkpoints, cfg.checkpoints.keep)
    if not victims:
        return
    names = {v.name for v in victims}
    _removed, left = await remove_bitmaps(qmp, lambda n: n in names)
    for victim in victims:
        await store.run(SyncStore.mark_checkpoint_removed, task_uuid, victim.name)
        log.info("retention: removed checkpoint %s of task %s", victim.name, task_uuid)
    if left:
        log.warning("retention: bitmaps left on layers that could not be written: %s", left)


async def remove_bitmaps(
    qmp: QmpChannel, wanted: Callable[[str], bool]
) -> tuple[list[str], list[str]]:
    """Remove every bitmap whose name is `wanted` from every node of the VM, backing layers
    included: a read-only layer is reopened read-write for it (as libvirt does) and read-only
    again. Returns ('node/name' removed, 'node/name: why' left)."""
    devices, nodes = await blockdev.devices_and_chains(qmp)
    layers: dict[str, tuple[Layer, str | None]] = {}
    for dev in devices.values():
        chain = blockdev.disk_chain(nodes, dev.node_name)
        for i, layer in enumerate(chain):
            layers.setdefault(
                layer.node, (layer, chain[i + 1].node if i + 1 < len(chain) else None)
            )
    removed: list[str] = []
    left: list[str] = []
    # the writable nodes' bitmaps in one round trip
    writable = [
        (str(node.get("node-name")), name)
        for node in nodes
        if not node.get("ro")
        for name in bitmaps.bitmaps_of(node)
        if wanted(name)
    ]
    replies = await execute_many(
        qmp, [("block-dirty-bitmap-remove", {"node": n, "name": b}) for n, b in writable]
    )
    for (node_name, name), reply in zip(writable, replies, strict=True):
        if not isinstance(reply, QmpCommandError):
            removed.append(f"{node_name}/{name}")
        elif not absent(reply, "dirty bitmap"):
            left.append(f"{node_name}/{name}: {reply.reply}")
    for node in nodes:
        node_name = str(node.get("node-name"))
        names = [n for n in bitmaps.bitmaps_of(node) if wanted(n)]
        if not names or not node.get("ro"):
            continue
        reopened = False
        if node.get("ro"):
            known = layers.get(node_name)
            file_node = blockdev.file_child(nodes, known[0]) if known else None
            if known is None or file_node is None:
                left += [
                    f"{node_name}/{n}: read-only layer outside the disks' chains" for n in names
                ]
                continue
            layer, backing = known
            try:
                await blockdev.reopen(
                    qmp, node_name, layer.driver, file_node, backing, read_only=False
                )
                reopened = True
            except QmpCommandError as e:
                left += [f"{node_name}/{n}: cannot reopen read-write: {e.reply}" for n in names]
                continue
        try:
            for name in names:
                try:
                    if await bitmaps.remove_bitmap(qmp, node_name, name):
                        removed.append(f"{node_name}/{name}")
                except QmpCommandError as e:
                    left.append(f"{node_name}/{name}: {e.reply}")
        finally:
            if reopened:
                layer, backing = layers[node_name]
                await blockdev.reopen(
                    qmp, node_name, layer.driver, str(file_node), backing, read_only=True
                )
    return removed, left


async def remove_task_bitmaps(qmp: QmpChannel, task_uuid: str) -> list[str]:
    """Remove every bitmap of the task from every layer of every disk; returns 'node/name'
    removed. Raises HypervisorError naming what could not be removed."""
    removed, left = await remove_bitmaps(qmp, lambda n: ours(task_uuid, n) or is_temp(task_uuid, n))
    if left:
        raise HypervisorError(
            f"bitmaps of task {task_uuid} could not be removed: {'; '.join(left)}"
        )
    return removed
