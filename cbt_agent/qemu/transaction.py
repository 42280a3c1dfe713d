"""The checkpoint transaction: one QMP `transaction` for every disk of a VM, so the point in
time is the same on all of them. Per disk, in this order: start fleecing into the scratch node
(`blockdev-backup sync=none`), freeze the recording bitmaps, add the new persistent recording
bitmap. Either every action runs or none does."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cbt_agent.qemu.qmp import QmpChannel


@dataclass(frozen=True)
class DiskCut:
    """What the transaction does to one disk."""

    job_id: str  # the fleecing job
    device_node: str  # the disk's top format node (its bitmaps live here)
    scratch_node: str  # the fleecing target, backed by the device node
    freeze: tuple[str, ...]  # recording bitmaps to disable; never a missing or frozen one
    checkpoint: str  # the new persistent recording bitmap


def fleecing_action(job_id: str, device: str, target: str) -> dict[str, Any]:
    return {
        "type": "blockdev-backup",
        "data": {"job-id": job_id, "device": device, "target": target, "sync": "none"},
    }


def disable_bitmap_action(node: str, name: str) -> dict[str, Any]:
    return {"type": "block-dirty-bitmap-disable", "data": {"node": node, "name": name}}


def add_bitmap_action(node: str, name: str) -> dict[str, Any]:
    return {
        "type": "block-dirty-bitmap-add",
        "data": {"node": node, "name": name, "persistent": True},
    }


def checkpoint_actions(cuts: Sequence[DiskCut]) -> list[dict[str, Any]]:
    """The transaction's actions for these disks, in the order QEMU runs them."""
    actions: list[dict[str, Any]] = []
    for c in cuts:
        actions.append(fleecing_action(c.job_id, c.device_node, c.scratch_node))
        actions += [disable_bitmap_action(c.device_node, name) for name in c.freeze]
        actions.append(add_bitmap_action(c.device_node, c.checkpoint))
    return actions


async def run(qmp: QmpChannel, actions: Sequence[dict[str, Any]]) -> None:
    """Run the transaction. A lost reply (QmpInterrupted) leaves its outcome unknown: the
    caller reads QEMU's state back."""
    await qmp.execute("transaction", {"actions": list(actions)})
