"""qemu-img: the agent's scratch files, and the image files of a VM that is shut off (the
bitmaps of each file of a chain). Every qemu-img the agent runs is run here."""

from __future__ import annotations

import asyncio
import json

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


async def chain_layers(path: str) -> list[Layer]:
    """Every file of the backing chain of `path`, top first, each with its bitmaps as the file
    records them: `in-use` on a closed file means inconsistent (QEMU did not close it), `auto`
    recording. Only a look (-U): for the disks of a shut-off VM. Nodes are unnamed here, and
    the files record no dirty counts (0)."""
    out = json.loads(await run("qemu-img", "info", "-U", "--backing-chain", "--output=json", path))
    layers: list[Layer] = []
    for depth, info in enumerate(out if isinstance(out, list) else [out]):
        states: dict[str, BitmapState] = {}
        for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", []) or []:
            flags = set(b.get("flags", []))
            name = str(b["name"])
            states[name] = BitmapState(
                name=name,
                recording="auto" in flags,
                persistent=True,
                inconsistent="in-use" in flags,
                busy=False,
                granularity=int(b.get("granularity", DEFAULT_GRANULARITY)),
                count=0,
            )
        layers.append(
            Layer(
                node="",
                filename=str(info["filename"]),
                size=int(info.get("virtual-size", 0)),
                bitmaps=states,
                read_only=depth > 0,
                driver=str(info.get("format", "")),
            )
        )
    return layers
