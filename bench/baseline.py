"""The raw libnbd baseline: block status of one meta context, collected into a list, nothing
else. What any hand-written client has to do to learn an export's dirty map."""

from __future__ import annotations

from typing import Any

import nbd

from cbt_agent.qemu.nbd import connect_tcp_quickly

# libnbd refuses a block-status length of 2^32 or more: the largest aligned request below it.
RAW_CHUNK = (4 << 30) - (64 << 10)


def open_handle(
    context: str, export: str, *, socket: str | None = None, port: int | None = None
) -> Any:
    h = nbd.NBD()
    h.add_meta_context(context)
    h.set_export_name(export)
    if socket is not None:
        h.connect_unix(socket)
    else:
        # the handshake without QEMU 7.2's delayed-ACK stalls (see nbd.connect_tcp_quickly):
        # any client can do it, so the limit does too
        connect_tcp_quickly(h, "127.0.0.1", int(port or 0))
    return h


def block_status_list(h: Any, context: str) -> list[tuple[int, int, int]]:
    """(offset, length, flags) of `context` over the whole export, in RAW_CHUNK requests."""
    size = int(h.get_size())
    out: list[tuple[int, int, int]] = []

    def callback(metacontext: str, base: int, entries: list[int], err: Any) -> int:
        if metacontext == context:
            pos = base
            for i in range(0, len(entries) - 1, 2):
                out.append((pos, entries[i], entries[i + 1]))
                pos += entries[i]
        return 0

    offset = 0
    while offset < size:
        h.block_status(min(RAW_CHUNK, size - offset), offset, callback)
        offset = out[-1][0] + out[-1][1]
    return out


def read_extents(
    context: str, export: str, *, socket: str | None = None, port: int | None = None
) -> list[tuple[int, int, int]]:
    """Connect, read the whole map, disconnect (the same work as the agent's dirty_extents)."""
    h = open_handle(context, export, socket=socket, port=port)
    try:
        return block_status_list(h, context)
    finally:
        h.shutdown()
