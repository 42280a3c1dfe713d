"""Processes on the host, read from /proc: their command lines, the files they hold open and
the unix sockets they listen on. Read-only; `sweep` uses it to tell a stray from a live file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
_SO_ACCEPTCON = 0x10000  # /proc/net/unix Flags of a listening socket


@dataclass(frozen=True)
class Process:
    pid: int
    argv: tuple[str, ...]
    start: int  # clock ticks after boot (field 22 of /proc/PID/stat): tells a reused pid

    @property
    def name(self) -> str:
        return os.path.basename(self.argv[0]) if self.argv else ""

    @property
    def command(self) -> str:
        return " ".join(self.argv)


def _pids() -> Iterator[int]:
    for entry in os.scandir(PROC):
        if entry.name.isdigit():
            yield int(entry.name)


def process(pid: int) -> Process | None:
    """The process `pid` (None: gone, or a zombie)."""
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after "(comm)", which may hold spaces
    if not fields or fields[0] == "Z":
        return None
    return Process(
        pid=pid,
        argv=tuple(a.decode(errors="replace") for a in argv if a),
        start=int(fields[19]),
    )


def processes() -> list[Process]:
    return [p for p in (process(pid) for pid in _pids()) if p is not None]


def _fd_targets() -> Iterator[tuple[int, str]]:
    """(pid, what each open descriptor points at) over every process we may look into."""
    for pid in _pids():
        fd_dir = PROC / str(pid) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                yield pid, os.readlink(fd_dir / fd)


def holders(paths: Iterable[str]) -> dict[str, list[int]]:
    """Which processes hold each of `paths` open (paths nobody holds are left out)."""
    wanted = set(paths)
    out: dict[str, list[int]] = {}
    if not wanted:
        return out
    for pid, target in _fd_targets():
        if target in wanted and pid not in out.setdefault(target, []):
            out[target].append(pid)
    return {k: v for k, v in out.items() if v}


def listeners(paths: Iterable[str]) -> dict[str, int]:
    """The pid listening on each of the unix socket `paths` (nobody: left out)."""
    wanted = set(paths)
    inodes: dict[str, str] = {}  # socket inode -> path
    try:
        text = (PROC / "net" / "unix").read_text()
    except OSError:
        return {}
    for line in text.splitlines()[1:]:
        parts = line.split(maxsplit=7)
        if len(parts) == 8 and parts[7] in wanted and int(parts[3], 16) & _SO_ACCEPTCON:
            inodes[f"socket:[{parts[6]}]"] = parts[7]
    out: dict[str, int] = {}
    if not inodes:
        return out
    for pid, target in _fd_targets():
        path = inodes.get(target)
        if path is not None:
            out.setdefault(path, pid)
    return out
