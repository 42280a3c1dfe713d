"""Reading an NBD export's maps with libnbd: dirty extents (a `qemu:dirty-bitmap:` context) and
allocation (`base:allocation`). libnbd is blocking: callers run these in a thread."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nbd

from cbt_agent.dirtymap import DirtyExtent, DirtyMap
from cbt_agent.errors import HypervisorError

if TYPE_CHECKING:
    # the key's module loads the QEMU process tools (asyncio, QMP): ~70 ms the backup client
    # pays only for an export that requires a key
    from cbt_agent.qemu.psk import Psk

# libnbd (and QEMU) refuse a block-status length of 2^32 or more: ask for just under 4 GiB.
BLOCK_STATUS_CHUNK = (4 << 30) - (64 << 10)

STATE_HOLE = 1  # base:allocation: unallocated
STATE_ZERO = 2  # base:allocation: reads as zero
DIRTY = 1  # qemu:dirty-bitmap: the block is dirty


@dataclass(frozen=True)
class NbdAddress:
    host: str | None
    port: int | None
    socket: str | None
    export: str
    # TLS required, the server verified against <tls_dir>/ca-cert.pem (and, over TCP, its name
    # against `host`); None: plain NBD
    tls_dir: str | None = None
    # TLS required, client and server proving they hold this pre-shared key (no certificates)
    psk: Psk | None = None

    @property
    def tls(self) -> bool:
        return self.tls_dir is not None or self.psk is not None

    def uri(self) -> str:
        scheme = "nbds" if self.tls else "nbd"
        if self.socket:
            return f"{scheme}+unix:///{self.export}?socket={self.socket}"
        return f"{scheme}://{self.host}:{self.port}/{self.export}"


CONNECT_TIMEOUT = 30.0


def connect_tcp_quickly(h: Any, host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> None:
    """libnbd's handshake over TCP without QEMU 7.2's 40 ms stalls.

    QEMU's NBD server sends each option reply as several small writes on a socket without
    TCP_NODELAY: Nagle holds the next write until the last is acknowledged, and Linux delays
    that ACK (up to 40 ms) while the client has nothing to send. A handshake with a meta
    context took ~88 ms here, ~44 ms without. Driving the handshake through libnbd's aio calls
    and asking for an immediate ACK (TCP_QUICKACK, which Linux clears again on its own) after
    each read makes it ~1 ms.
    """
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    fd = sock.detach()  # libnbd owns the descriptor from here on
    view = socket.socket(fileno=fd)  # for setsockopt only; detached again below, never closed
    try:
        h.aio_connect_socket(fd)
        deadline = time.monotonic() + timeout
        while h.aio_is_connecting():
            # libnbd reads whatever has arrived in any of its calls (aio_connect_socket and
            # aio_notify_write too, when QEMU answered quickly): ask for the ACK after each
            with contextlib.suppress(OSError):
                view.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            left = deadline - time.monotonic()
            if left <= 0:
                raise nbd.Error(f"NBD handshake with {host}:{port} timed out", 110)
            direction = h.aio_get_direction()
            readable, writable, _ = select.select(
                [fd] if direction & nbd.AIO_DIRECTION_READ else [],
                [fd] if direction & nbd.AIO_DIRECTION_WRITE else [],
                [],
                left,
            )
            if readable:
                h.aio_notify_read()
            if writable:
                h.aio_notify_write()
        if not h.aio_is_ready():
            raise nbd.Error(f"NBD handshake with {host}:{port} failed: {nbd.get_error()}", 0)
    finally:
        view.detach()


def close(h: Any) -> None:
    """Disconnect politely; libnbd frees the handle when it is dropped."""
    with contextlib.suppress(nbd.Error):
        h.shutdown()


def connect(address: NbdAddress, contexts: tuple[str, ...] = ()) -> Any:
    """An open libnbd handle on the export, with the given meta contexts asked for."""
    h = nbd.NBD()
    for ctx in contexts:
        h.add_meta_context(ctx)
    h.set_export_name(address.export)
    if address.tls_dir is not None:
        # libnbd skips verification when the directory has no ca-cert.pem: insist on one
        if not os.path.isfile(os.path.join(address.tls_dir, "ca-cert.pem")):
            raise HypervisorError(f"NBD TLS: no ca-cert.pem in {address.tls_dir}")
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(address.tls_dir)
        h.set_tls_verify_peer(True)
    keys: Any = contextlib.nullcontext()
    if address.psk is not None:
        from cbt_agent.qemu.psk import client_file

        keys = client_file(address.psk)
    try:
        # libnbd reads the keys file during the handshake, inside connect: it goes right after
        with keys as keys_file:
            if address.psk is not None and keys_file is not None:
                h.set_tls(nbd.TLS_REQUIRE)
                h.set_tls_username(address.psk.identity)
                h.set_tls_psk_file(keys_file)
            if address.socket:
                h.connect_unix(address.socket)
            elif address.tls_dir is not None:
                # x509: libnbd checks the certificate's name against the host it connects to
                h.connect_tcp(address.host, str(address.port))
            else:
                connect_tcp_quickly(h, str(address.host), int(address.port or 0))
    except (nbd.Error, OSError) as e:
        raise HypervisorError(f"NBD connect to {address.uri()} failed: {e}") from None
    for ctx in contexts:
        if not h.can_meta_context(ctx):
            close(h)
            raise HypervisorError(f"NBD export {address.uri()} does not offer context {ctx}")
    return h


def iter_extents(
    h: Any, context: str, start: int = 0, length: int | None = None
) -> Iterator[tuple[int, int, int]]:
    """Yield (offset, length, flags) of `context` over [start, start+length), clipped to it."""
    size = int(h.get_size())
    end = size if length is None else min(size, start + length)
    offset = start
    while offset < end:
        got: list[tuple[int, int, int]] = []

        def callback(
            metacontext: str,
            base: int,
            entries: list[int],
            err: Any,
            got: list[tuple[int, int, int]] = got,
        ) -> int:
            if metacontext != context:
                return 0
            pos = base
            for i in range(0, len(entries) - 1, 2):
                got.append((pos, entries[i], entries[i + 1]))
                pos += entries[i]
            return 0

        h.block_status(min(BLOCK_STATUS_CHUNK, end - offset), offset, callback)
        if not got:
            raise HypervisorError(f"NBD server returned no {context} extents at {offset}")
        for pos, n, flags in got:
            if pos >= end:
                break
            n = min(n, end - pos)
            if n > 0:
                yield pos, n, flags
            offset = pos + n


def dirty_runs(h: Any, context: str, start: int, end: int) -> list[list[int]]:
    """The dirty runs of `context` in [start, end) as merged [offset, length] pairs, built
    inside libnbd's callback: no object per extent (a 1 TiB disk may have 100,000)."""
    runs: list[list[int]] = []
    offset = start
    while offset < end:
        reached = [offset]

        def callback(
            metacontext: str,
            base: int,
            entries: list[int],
            err: Any,
            runs: list[list[int]] = runs,
            reached: list[int] = reached,
        ) -> int:
            if metacontext != context:
                return 0
            pos = base
            last_end = runs[-1][0] + runs[-1][1] if runs else -1
            for n, flags in zip(entries[0::2], entries[1::2], strict=False):
                if flags & DIRTY:
                    if last_end == pos:
                        runs[-1][1] += n
                    else:
                        runs.append([pos, n])
                    last_end = pos + n
                pos += n
            reached[0] = pos
            return 0

        h.block_status(min(BLOCK_STATUS_CHUNK, end - offset), offset, callback)
        if reached[0] <= offset:
            raise HypervisorError(f"NBD server returned no {context} extents at {offset}")
        offset = reached[0]
    # the server may describe a little past what was asked: clip to [start, end)
    while runs and runs[-1][0] >= end:
        runs.pop()
    if runs and runs[-1][0] + runs[-1][1] > end:
        runs[-1][1] = end - runs[-1][0]
    return runs


def dirty_extents(
    address: NbdAddress, context: str, start: int = 0, length: int | None = None
) -> list[DirtyExtent]:
    """The export's dirty runs in [start, start+length), merged into maximal runs."""
    h = connect(address, (context,))
    try:
        size = int(h.get_size())
        end = size if length is None else min(size, start + length)
        return [DirtyExtent(s, n, True) for s, n in dirty_runs(h, context, start, end)]
    except nbd.Error as e:
        raise HypervisorError(f"NBD block status on {address.uri()} failed: {e}") from None
    finally:
        close(h)


def read_dirty_map(address: NbdAddress, context: str) -> DirtyMap:
    """The export's whole change set (`context`, a `qemu:dirty-bitmap:`) as merged runs: one
    connection, block status in just-under-4-GiB steps."""
    h = connect(address, (context,))
    try:
        return DirtyMap.from_runs(dirty_runs(h, context, 0, int(h.get_size())))
    except nbd.Error as e:
        raise HypervisorError(f"NBD block status on {address.uri()} failed: {e}") from None
    finally:
        close(h)


@dataclass(frozen=True)
class ChangedAreas:
    areas: list[tuple[int, int]]  # (start, length), maximal runs, sorted
    end: int  # where this page stops: the next page starts here
    done: bool  # the requested range is covered


def changed_areas(
    address: NbdAddress,
    context: str,
    start: int,
    length: int | None,
    max_areas: int,
) -> ChangedAreas:
    """The changed runs in [start, start+length): with a `qemu:dirty-bitmap:` context the dirty
    ones; with `base:allocation` (a full) the ones that do not read as zero.

    Stops after `max_areas` runs, at the end of a run, so runs are never split across pages.
    """
    h = connect(address, (context,))
    try:
        size = int(h.get_size())
        end = size if length is None else min(size, start + length)

        def changed(flags: int) -> bool:
            if context == "base:allocation":
                return not flags & STATE_ZERO
            return bool(flags & DIRTY)

        areas: list[tuple[int, int]] = []
        for pos, n, flags in iter_extents(h, context, start, end - start):
            if not changed(flags):
                if len(areas) >= max_areas:
                    return ChangedAreas(areas, pos, False)
                continue
            if areas and areas[-1][0] + areas[-1][1] == pos:
                areas[-1] = (areas[-1][0], areas[-1][1] + n)
            else:
                areas.append((pos, n))
        return ChangedAreas(areas, end, True)
    except nbd.Error as e:
        raise HypervisorError(f"NBD block status on {address.uri()} failed: {e}") from None
    finally:
        close(h)
