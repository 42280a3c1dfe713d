"""qemu-storage-daemon: the disks of a shut-off VM, exported read-only over NBD.

One daemon per VM. It is started with `--blockdev` for the file and format node of every image
of each disk's backing chain, all read-only, and a QMP monitor on a unix socket; everything
else goes through that monitor with the same commands as for a running VM (`nbd_server`,
`bitmaps`): the NBD server (a port of the range is probed there, as in QEMU), the temporary
change-set bitmaps (they exist only after start, so an export that publishes one cannot be on
the command line) and the exports. `--daemonize` makes the start synchronous: when the command
returns, the daemon runs with every image open, or it failed and said why (a lock held by a
running VM, a missing file).

Facts relied on (qemu-storage-daemon 7.2):
- a qcow2 node opened read-only shares no WRITE permission on its file, so the daemon holds
  each image's lock against writers: QEMU starting the VM fails with `Failed to get "write"
  lock` (libvirt reports it; no lifecycle event comes). Stopping the daemon releases it.
- a non-persistent, disabled bitmap can be added on a read-only node and bitmaps of any node
  merged into it; persistent bitmaps of a read-only image are loaded, never written back.
- stopped with SIGTERM it closes its exports and exits; read-only images lose nothing even to
  SIGKILL (no bitmap is marked in use by a read-only open).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbt_agent.errors import HypervisorError

log = logging.getLogger(__name__)

BINARY = "qemu-storage-daemon"
MONITOR_ID = "cbtmon"
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
POLL = 0.02


@dataclass(frozen=True)
class ImageNode:
    """One image of a disk's chain as the daemon opens it: its format node over its file node,
    on the format node of the image below (None at the bottom)."""

    node: str
    file_node: str
    filename: str
    driver: str
    backing: str | None


def blockdev_args(images: Sequence[ImageNode]) -> list[dict[str, Any]]:
    """The `--blockdev` options, bottom of each chain first (a node names its backing node,
    which must exist already); read-only, and no automatic backing (each is named)."""
    out: list[dict[str, Any]] = []
    for image in images:
        out.append(
            {
                "driver": "file",
                "node-name": image.file_node,
                "filename": image.filename,
                "read-only": True,
            }
        )
        out.append(
            {
                "driver": image.driver,
                "node-name": image.node,
                "file": image.file_node,
                "backing": image.backing,
                "read-only": True,
            }
        )
    return out


def _opt(value: str) -> str:
    """A value inside QEMU's comma-separated options: a comma is written twice."""
    return value.replace(",", ",,")


def command(pid_file: str, qmp_socket: str, images: Sequence[ImageNode]) -> list[str]:
    """The daemon's command line (JSON for the block nodes: file names are taken as they are)."""
    cmd = [
        BINARY,
        "--daemonize",
        "--pidfile",
        pid_file,
        "--chardev",
        f"socket,id={MONITOR_ID},path={_opt(qmp_socket)},server=on,wait=off",
        "--monitor",
        f"chardev={MONITOR_ID}",
    ]
    for args in blockdev_args(images):
        cmd += ["--blockdev", json.dumps(args, separators=(",", ":"))]
    return cmd


async def start(cmd: list[str]) -> None:
    """Run the daemon; returns once it runs with every image open (`--daemonize`). Raises
    HypervisorError with the daemon's own words when it could not start."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as e:
        raise HypervisorError(f"cannot run {cmd[0]}: {e.strerror}") from None
    # the daemon keeps no inherited pipe: after --daemonize it writes to /dev/null
    out, err = await proc.communicate()
    if proc.returncode != 0:
        text = (err or out).decode(errors="replace").strip().replace("\n", " ")
        raise HypervisorError(f"{BINARY} did not start: {text}")


def read_pid(pid_file: str) -> int | None:
    try:
        text = Path(pid_file).read_text()
    except OSError:
        return None
    try:
        pid = int(text.strip())
    except ValueError:
        return None
    return pid if pid > 0 else None


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not: the daemon is not the agent's child)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def is_ours(pid: int, pid_file: str) -> bool:
    """Whether `pid` is the daemon started with this pid file (a pid is reused after exit:
    never signal a process on the number alone)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (
        bool(argv)
        and os.path.basename(argv[0]) == os.fsencode(BINARY)
        and os.fsencode(pid_file) in argv
    )


def running_pid(pid: int | None, pid_file: str) -> int | None:
    """The daemon's pid if it runs: the recorded one, else the one its pid file names (a
    crash between its start and recording its pid), checked to be that daemon."""
    for candidate in (pid, read_pid(pid_file)):
        if candidate is not None and alive(candidate) and is_ours(candidate, pid_file):
            return candidate
    return None


async def _exits(pid: int, within: float) -> bool:
    """Whether `pid` is gone within `within` seconds (polled: it is not the agent's child)."""
    for _ in range(max(1, int(within / POLL))):
        if not alive(pid):
            return True
        await asyncio.sleep(POLL)
    return not alive(pid)


async def stop(pid: int | None, pid_file: str, grace: float = STOP_GRACE) -> int | None:
    """Stop the daemon by its pid: SIGTERM, then SIGKILL after `grace` seconds. Returns the pid
    it stopped (None: it was not running). The pid file goes too."""
    target = running_pid(pid, pid_file)
    if target is not None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, sig)
            if await _exits(target, grace):
                break
            log.warning("%s pid %d did not exit on %s", BINARY, target, sig.name)
        else:
            raise HypervisorError(f"{BINARY} pid {target} does not exit (even on SIGKILL)")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pid_file)
    return target
