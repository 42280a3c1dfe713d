"""Dirty bitmaps in QEMU: reading them off a node, the commands on them, and the capability
that makes persistent ones follow the VM in a live migration. Removal is idempotent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cbt_agent.errors import QmpCommandError
from cbt_agent.model import BitmapState, Source
from cbt_agent.qemu.qmp import QmpChannel
from cbt_agent.qemu.refusals import absent


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


def temp_bitmap_args(node: str, name: str, granularity: int) -> dict[str, Any]:
    """`block-dirty-bitmap-add` of a disabled, non-persistent bitmap on `node`: a change set to
    merge into and export (an exported bitmap must be disabled; a temporary one must not reach
    the image)."""
    return {
        "node": node,
        "name": name,
        "granularity": granularity,
        "disabled": True,
        "persistent": False,
    }


async def add_temp_bitmap(qmp: QmpChannel, node: str, name: str, granularity: int) -> None:
    await qmp.execute("block-dirty-bitmap-add", temp_bitmap_args(node, name, granularity))


def merge_args(node: str, target: str, sources: Sequence[Source]) -> dict[str, Any]:
    """`block-dirty-bitmap-merge` of bitmaps on any layer of the chain into `target` on
    `node` (the {node, name} form reaches bitmaps of other nodes)."""
    return {
        "node": node,
        "target": target,
        "bitmaps": [{"node": n, "name": b} for n, b in sources],
    }


async def merge(qmp: QmpChannel, node: str, target: str, sources: Sequence[Source]) -> None:
    await qmp.execute("block-dirty-bitmap-merge", merge_args(node, target, sources))


async def remove_bitmap(qmp: QmpChannel, node: str, name: str) -> bool:
    """Remove a bitmap; False if it was not there."""
    try:
        await qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": name})
    except QmpCommandError as e:
        if absent(e, "dirty bitmap"):
            return False
        raise
    return True


def migration_command() -> tuple[str, dict[str, Any]]:
    """Persistent bitmaps follow the VM in a live migration only with this capability on."""
    return (
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "dirty-bitmaps", "state": True}]},
    )


async def enable_migration(qmp: QmpChannel) -> None:
    await qmp.execute(*migration_command())
