"""Test helpers for offline exports (a qemu-storage-daemon per shut-off VM): finding the daemons a
test's agent started, by the state directory in their command line, and stopping them by pid."""

from __future__ import annotations

import os
from pathlib import Path

from cbt_agent.qemu import storage_daemon


def daemons_of(state_dir: Path) -> dict[int, list[str]]:
    """Running qemu-storage-daemons whose pid file or socket lies in `state_dir` (or in a
    private temporary directory the agent made for one): pid -> command line."""
    found: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if not argv or os.path.basename(argv[0]) != storage_daemon.BINARY:
            continue
        if not storage_daemon.alive(pid):
            continue
        if any(str(state_dir) in a for a in argv):
            found[pid] = argv
    return found


async def stop_daemons_of(state_dir: Path) -> list[int]:
    """Stop (by pid, SIGTERM then SIGKILL) every daemon a test's agent left running."""
    stopped = []
    for pid, argv in daemons_of(state_dir).items():
        pid_file = argv[argv.index("--pidfile") + 1]
        if await storage_daemon.stop(pid, pid_file, grace=5) is not None:
            stopped.append(pid)
    return stopped
