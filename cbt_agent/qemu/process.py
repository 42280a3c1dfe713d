"""The user a VM's QEMU runs as, and handing it the few files it must read by name.

QEMU reads an NBD credential's files by path (a TLS pre-shared key at every handshake,
certificates when the object is made), so those files must be readable by QEMU's user, which
libvirt may set to an unprivileged one (`libvirt-qemu` on Debian, or a per-VM DAC label), and
by nobody else: they are given to exactly that uid and gid, 0600 in a 0700 directory.

QMP tells which process QEMU is: `query-cpus-fast` gives each vCPU's host thread id, and
/proc/<tid>/status the thread's credentials (the process's: QEMU changes no thread's alone).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from cbt_agent.errors import HypervisorError
from cbt_agent.qemu.qmp import QmpChannel


@dataclass(frozen=True)
class QemuUser:
    """The uid and gid a QEMU process opens files as."""

    uid: int
    gid: int

    @classmethod
    def agent(cls) -> QemuUser:
        """The agent's own (a qemu-storage-daemon it started runs as it)."""
        return cls(os.geteuid(), os.getegid())


def parse_status(text: str) -> QemuUser:
    """The filesystem uid and gid (what the kernel checks a file's permissions against: the
    fourth field of the `Uid:` and `Gid:` lines) from a /proc/<pid>/status text. Raises
    ValueError when either line is missing or malformed."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if sep and key in ("Uid", "Gid"):
            fields = rest.split()
            if len(fields) != 4:
                raise ValueError(f"malformed {key} line: {line!r}")
            found[key] = int(fields[3])
    if set(found) != {"Uid", "Gid"}:
        raise ValueError("no Uid and Gid lines")
    return QemuUser(found["Uid"], found["Gid"])


def thread_ids(cpus: object) -> list[int]:
    """The host thread ids in a `query-cpus-fast` reply."""
    if not isinstance(cpus, list):
        return []
    return [int(c["thread-id"]) for c in cpus if isinstance(c, dict) and "thread-id" in c]


async def user_of(qmp: QmpChannel) -> QemuUser:
    """The user the QEMU behind `qmp` runs as. Raises HypervisorError when it cannot tell."""
    tids = thread_ids(await qmp.execute("query-cpus-fast"))
    if not tids:
        raise HypervisorError("cannot tell which user QEMU runs as: it reports no vCPU thread")
    path = Path(f"/proc/{tids[0]}/status")
    try:
        return parse_status(await asyncio.to_thread(path.read_text))
    except (OSError, ValueError) as e:
        raise HypervisorError(f"cannot tell which user QEMU runs as ({path}: {e})") from None


def give(path: Path, user: QemuUser) -> None:
    """Make `path` (a file or directory the agent made) owned by `user`; its mode stays as it
    is (0600 or 0700: private to that user). Symlinks are not followed. Blocking."""
    st = os.lstat(path)
    if (st.st_uid, st.st_gid) != (user.uid, user.gid):
        os.chown(path, user.uid, user.gid, follow_symlinks=False)
