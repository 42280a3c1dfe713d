"""File descriptors the agent opens and hands to QEMU, so QEMU never opens the agent's files.

QEMU may run as an unprivileged user (libvirt's DAC: `libvirt-qemu` on Debian) that cannot
reach the agent's 0700 state directory. The agent opens what QEMU must use itself and passes
the descriptor over QMP (SCM_RIGHTS, see `qmp.QmpChannel.execute_with_fd`):
- a scratch qcow2: `add-fd` into an fd set, then `blockdev-add` of `/dev/fdset/<id>`;
- the NBD server's listening socket: `getfd` names it, `nbd-server-start` takes it by name;
- the directory of an NBD credential: `add-fd`, then `/proc/self/fd/<fd>` as the path (QEMU
  reads files in it by path; the magic link skips the private directories above it).

Every fd set the agent adds carries an `opaque` naming its task (`cbt-agent:<task>:<what>`),
so teardown and reconcile remove what a task left in QEMU without a record of the ids.

Facts relied on (QEMU 7.2, verified here):
- `add-fd` returns the set's id and QEMU's own number of the descriptor; `/dev/fdset/<id>`
  opens a dup of a descriptor of the set with the same access mode.
- `remove-fd` closes a descriptor once no dup of it is open (and, in 7.2, only while the VM
  runs; a paused VM's set goes at a later cleanup). A set with no descriptor left vanishes.
- A descriptor nothing dup'ed (a directory's) is also closed when the last QMP monitor
  disconnects while the VM runs: libvirt's monitor, or the agent's held connection to ZStack's
  socket, keeps it; a libvirtd restart with neither connected ends a pre-shared key's
  directory (its export then refuses new clients: it fails closed).
- `getfd` keeps a named descriptor in the monitor until a command takes it (`nbd-server-start`
  with an `fd` address does) or `closefd`; both refuse a name not there with "not found".
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cbt_agent.errors import HypervisorError, QmpCommandError
from cbt_agent.qemu.qmp import QmpChannel
from cbt_agent.qemu.refusals import absent

OPAQUE_PREFIX = "cbt-agent:"


def task_prefix(task_uuid: str) -> str:
    """The start of the `opaque` of every fd set made for the task's exports."""
    return f"{OPAQUE_PREFIX}{task_uuid}:"


def opaque(task_uuid: str, what: str) -> str:
    """The `opaque` of an fd set: the task it belongs to and what it holds."""
    return f"{task_prefix(task_uuid)}{what}"


@dataclass(frozen=True)
class PassedFd:
    """A descriptor in one of QEMU's fd sets: the set's id and QEMU's number for it."""

    fdset_id: int
    fd: int

    @property
    def fdset_path(self) -> str:
        """The name QEMU opens (a dup of the descriptor) for a block node's `filename`."""
        return f"/dev/fdset/{self.fdset_id}"

    @property
    def proc_path(self) -> str:
        """The descriptor itself, by path, inside QEMU (a directory: files in it by path)."""
        return f"/proc/self/fd/{self.fd}"


def fdsets_with_prefix(fdsets: Iterable[Mapping[str, Any]], prefix: str) -> list[int]:
    """The ids of the fd sets (`query-fdsets`) holding a descriptor whose opaque starts with
    `prefix`, in QEMU's order, each once."""
    out: list[int] = []
    for fdset in fdsets:
        fds = fdset.get("fds") or []
        if any(str(f.get("opaque", "")).startswith(prefix) for f in fds):
            set_id = int(fdset["fdset-id"])
            if set_id not in out:
                out.append(set_id)
    return out


def open_file(path: str) -> int:
    """The agent's read-write descriptor of a file QEMU will use (no symlink followed)."""
    return os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)


def open_dir(path: str) -> int:
    """The agent's descriptor of a directory whose files QEMU will read by name."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)


async def add_fd(qmp: QmpChannel, fd: int, what: str) -> PassedFd:
    """Put a copy of `fd` into a new fd set of QEMU labelled `what` (see `opaque`). The caller
    still owns (and closes) `fd`."""
    reply = await qmp.execute_with_fd("add-fd", {"opaque": what}, fd)
    try:
        return PassedFd(int(reply["fdset-id"]), int(reply["fd"]))
    except (KeyError, TypeError, ValueError):
        raise HypervisorError(f"add-fd: unexpected reply {reply!r}") from None


def remove_command(set_id: int) -> tuple[str, dict[str, Any]]:
    """`remove-fd` of a whole fd set (QEMU closes its descriptors once nothing uses them)."""
    return "remove-fd", {"fdset-id": set_id}


async def remove_fdset(qmp: QmpChannel, set_id: int) -> None:
    """`remove-fd` of a whole fd set; a set that is gone already is success."""
    try:
        await qmp.execute(*remove_command(set_id))
    except QmpCommandError as e:
        if not absent(e):
            raise


async def pass_named(qmp: QmpChannel, fd: int, name: str) -> None:
    """Give QEMU's monitor a copy of `fd` named `name` (`getfd`), for a command that takes a
    descriptor by name (`nbd-server-start` with an `fd` address)."""
    await qmp.execute_with_fd("getfd", {"fdname": name}, fd)


async def close_named(qmp: QmpChannel, name: str) -> None:
    """`closefd` a named descriptor a command did not take; one that is gone is success."""
    try:
        await qmp.execute("closefd", {"fdname": name})
    except QmpCommandError as e:
        if not absent(e):
            raise
