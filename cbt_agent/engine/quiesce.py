"""Quiesced checkpoints: the guest's filesystems frozen through its guest agent for the
checkpoint transaction only, and thawed on every path."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from cbt_agent.errors import HypervisorError, OperationError, QmpInterrupted
from cbt_agent.hypervisor.libvirt import GuestAgentUnavailable

log = logging.getLogger(__name__)


class GuestFreezer(Protocol):
    """The VM's guest agent: freeze and thaw its filesystems (libvirt fsFreeze/fsThaw)."""

    async def freeze(self) -> int: ...

    async def thaw(self) -> int: ...


@dataclass
class Freeze:
    """What quiescing did for one checkpoint: frozen or why not, and for how long."""

    quiesced: bool = False
    why_not: str | None = None  # crash-consistent: the reason
    millis: float = 0.0

    def note(self) -> str:
        if self.quiesced:
            return f"quiesced (guest filesystems frozen {self.millis:.0f} ms)"
        return f"crash-consistent ({self.why_not})" if self.why_not else "crash-consistent"


async def checkpoint_transaction(
    cut: Callable[[], Awaitable[None]],
    freeze: Freeze,
    *,
    vm_uuid: str,
    guest: GuestFreezer | None,
    quiesce: str,
    freeze_timeout: float,
) -> None:
    """Cut the checkpoint (`cut()`: the VM's pause, its disks' filters and the bitmap
    transaction) inside a freeze of the guest's filesystems when asked (`quiesce`: "auto" |
    "always" | "never") and possible: the guest is frozen for the cut only, and thawed on every
    path (a cut slower than the freeze timeout is given up on: its outcome is then read back
    like a lost reply's). `freeze` is filled in with what happened."""
    loop = asyncio.get_running_loop()
    if quiesce != "never" and guest is not None:
        start = loop.time()
        try:
            await guest.freeze()
            freeze.quiesced = True
        except GuestAgentUnavailable as e:
            if quiesce == "always":
                raise OperationError(
                    f"quiesce was asked for but VM [uuid: {vm_uuid}] has no guest agent "
                    f"to freeze its filesystems: {e.message}"
                ) from None
            freeze.why_not = f"no guest agent: {e.message}"
        if freeze.quiesced:
            try:
                await asyncio.wait_for(cut(), freeze_timeout)
            except TimeoutError:
                raise QmpInterrupted(
                    f"the checkpoint transaction did not answer within the freeze timeout "
                    f"({freeze_timeout:.0f} s)"
                ) from None
            finally:
                try:
                    await thaw(guest)
                finally:
                    freeze.millis = (loop.time() - start) * 1000
            return
    elif quiesce == "never":
        freeze.why_not = "quiesce not asked for"
    await cut()


async def thaw(guest: GuestFreezer, attempts: int = 3) -> None:
    """Thaw the guest, retried: a guest left frozen stalls every write it makes."""
    for attempt in range(1, attempts + 1):
        try:
            await guest.thaw()
            return
        except GuestAgentUnavailable:
            return  # no agent (any more): nothing of ours is frozen there
        except HypervisorError as e:
            if attempt == attempts:
                raise HypervisorError(f"thawing the guest failed: {e.message}") from None
            log.warning("thawing the guest failed (attempt %d): %s", attempt, e.message)
            await asyncio.sleep(0.1 * attempt)
