"""The checkpoint transaction: one QMP `transaction` for every disk of a VM. Per disk: freeze
the recording bitmaps, add the new persistent recording bitmap. Either every action runs or none
does. It runs with the VM paused, right after each disk's copy-before-write filter went in
(`fleece`), so the bitmaps and the exported views share one point in time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cbt_agent.qemu.qmp import QmpChannel


@dataclass(frozen=True)
class DiskCut:
    """What the transaction does to one disk."""

    device_node: str  # the disk's top format node (its bitmaps live here)
    freeze: tuple[str, ...]  # recording bitmaps to disable; never a missing or frozen one
    checkpoint: str  # the new persistent recording bitmap


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
        actions += [disable_bitmap_action(c.device_node, name) for name in c.freeze]
        actions.append(add_bitmap_action(c.device_node, c.checkpoint))
    return actions


def command(actions: Sequence[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    return "transaction", {"actions": list(actions)}


async def run(qmp: QmpChannel, actions: Sequence[dict[str, Any]]) -> None:
    """Run the transaction. A lost reply (QmpInterrupted) leaves its outcome unknown: the
    caller reads QEMU's state back."""
    await qmp.execute("transaction", {"actions": list(actions)})
