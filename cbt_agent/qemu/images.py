"""qemu-img: the agent's scratch files, and the image files of a VM that is shut off (the
bitmaps of each file of a chain). Every qemu-img the agent runs is run here."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cbt_agent.errors import HypervisorError
from cbt_agent.model import DEFAULT_GRANULARITY, BitmapState, Layer


async def run(*cmd: str) -> str:
    """Run a command; its stdout, or HypervisorError with its stderr."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        text = (err or out).decode(errors="replace").strip()
        raise HypervisorError(f"{' '.join(cmd[:2])} failed: {text}")
    return out.decode()


async def chain_bitmaps(path: str) -> list[tuple[str, set[str]]]:
    """Each qcow2 file of the backing chain of `path`, top first, with its bitmaps' names.
    Read with -U: the files of a shut-off VM are not locked, of a running one this is a look."""
    out = json.loads(await run("qemu-img", "info", "-U", "--backing-chain", "--output=json", path))
    chain: list[tuple[str, set[str]]] = []
    for info in out if isinstance(out, list) else [out]:
        if info.get("format") != "qcow2":
            continue
        bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
        chain.append((str(info["filename"]), {str(b["name"]) for b in bitmaps}))
    return chain


async def remove_bitmap(path: str, name: str) -> None:
    await run("qemu-img", "bitmap", "--remove", path, name)


async def virtual_size(path: str) -> int:
    info = json.loads(await run("qemu-img", "info", "-U", "--output=json", path))
    return int(info["virtual-size"])


async def create(path: str, size: int | None, backing: str | None = None) -> None:
    """A new qcow2 file of `size` bytes; on `backing` (a qcow2) when given, whose size it
    takes when `size` is None."""
    over = ["-b", backing, "-F", "qcow2"] if backing is not None else []
    sized = [str(size)] if size is not None else []
    await run("qemu-img", "create", "-q", "-f", "qcow2", *over, path, *sized)


@dataclass(frozen=True)
class ImageLayer:
    """One file of a shut-off disk's backing chain as `qemu-img info` reads it."""

    filename: str
    format: str
    size: int  # virtual size
    bitmaps: Mapping[str, BitmapState]
    compat: str = "1.1"  # qcow2's version ("0.10": v2, no persistent bitmaps)


def _bitmap_states(info: dict[str, Any]) -> dict[str, BitmapState]:
    """A qcow2 file's persistent bitmaps: flag `auto` = recording, `in-use` = inconsistent (the
    image was not closed cleanly while it was open read-write)."""
    out: dict[str, BitmapState] = {}
    for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", []) or []:
        flags = set(b.get("flags", []))
        name = str(b["name"])
        out[name] = BitmapState(
            name=name,
            recording="auto" in flags,
            persistent=True,
            inconsistent="in-use" in flags,
            busy=False,
            granularity=int(b.get("granularity", DEFAULT_GRANULARITY)),
            count=0,  # qemu-img does not say; nothing offline needs it
        )
    return out


async def chain_info(path: str) -> list[ImageLayer]:
    """Every file of the backing chain of `path`, top first, with its format, virtual size and
    bitmaps (read with -U: a look, whatever holds the files)."""
    out = json.loads(await run("qemu-img", "info", "-U", "--backing-chain", "--output=json", path))
    return [
        ImageLayer(
            filename=str(info["filename"]),
            format=str(info.get("format", "")),
            size=int(info.get("virtual-size", 0)),
            bitmaps=_bitmap_states(info) if info.get("format") == "qcow2" else {},
            compat=str(info.get("format-specific", {}).get("data", {}).get("compat", "1.1")),
        )
        for info in (out if isinstance(out, list) else [out])
    ]


async def add_bitmap(path: str, name: str) -> None:
    """A new persistent, recording (`auto`) bitmap in a qcow2 file nothing else holds."""
    await run("qemu-img", "bitmap", "--add", path, name)


async def disable_bitmap(path: str, name: str) -> None:
    """Freeze a bitmap in a qcow2 file nothing else holds: it records no later write."""
    await run("qemu-img", "bitmap", "--disable", path, name)


async def chain_layers(path: str) -> list[Layer]:
    """`chain_info` as the engine's layers (unnamed nodes; backing files read-only), for
    judging a shut-off disk's chain with the same rules as a running one's."""
    return [
        Layer(
            node="",
            filename=i.filename,
            size=i.size,
            bitmaps=i.bitmaps,
            read_only=depth > 0,
            driver=i.format,
            compat=i.compat,
        )
        for depth, i in enumerate(await chain_info(path))
    ]
