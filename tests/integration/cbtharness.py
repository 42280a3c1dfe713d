"""The worker on the real stack, as the app builds it, and what a backup client checks through
NBD: shared by the integration tests that drive CbtService directly."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import stack

from cbt_agent.api import replies, validate
from cbt_agent.config import Config
from cbt_agent.engine.service import CbtService
from cbt_agent.hypervisor.libvirt import Hypervisor
from cbt_agent.qemu import nbd as nbdio
from cbt_agent.qemu.qmp import QmpRouter
from cbt_agent.store import NbdServer, Store, SyncStore

G = 64 * 1024  # bitmap granularity = qcow2 cluster size


class Agent:
    """The worker with its store, libvirt and QMP, as the app builds it."""

    def __init__(
        self, config: Config, step: Callable[[str], Awaitable[None]] | None = None
    ) -> None:
        self.config = config
        self.store = Store(config.db_path)
        self.hv = Hypervisor(config.libvirt_uri)
        self.router = QmpRouter(config.qmp_socket_template, self.hv)
        self.service = CbtService(config, self.store, self.hv, self.router, step=step)
        self.fail_at: str | None = None

    async def open(self) -> None:
        await self.store.open()
        await self.hv.open()

    async def close(self) -> None:
        await self.router.close()
        await self.hv.close()
        await self.store.close()

    async def create(self, vm: stack.TestVm) -> str:
        cmd = validate.create_task({"params": {"name": "t", "vmInstanceUuid": vm.vm_uuid}})
        return (await self.service.create(cmd)).task.uuid

    async def enable(self, task: str, since: str | None = None) -> list[dict[str, Any]]:
        body = {"params": {"bitmapName": since}} if since else {}
        result = replies.enable_reply(await self.service.enable(validate.enable_task(task, body)))
        return list(result["volumeCbtBackupInfos"])

    async def disable(self, task: str, force: bool = False) -> None:
        await self.service.disable(validate.disable_task(task, {"params": {"force": force}}))

    async def areas(self, task: str, volume: str) -> list[tuple[int, int]]:
        """The whole changed-areas answer of one disk as (start, length) runs."""
        page = replies.changed_areas(
            await self.service.changed_areas(task, volume, 0, None, 10_000)
        )
        assert page["nextOffset"] is None
        return [(a["start"], a["length"]) for a in page["changedAreas"]]

    async def server(self, task: str) -> NbdServer:
        return await self.store.run(SyncStore.nbd_server, task)

    async def history(self, task: str) -> list[tuple[str | None, str]]:
        rows = await self.store.run(SyncStore.history_rows, task)
        return [(r["from_status"], r["to_status"]) for r in rows]


def by_volume(infos: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {i["volume"]["volumeUuid"]: i for i in infos}


def address(info: dict[str, Any]) -> nbdio.NbdAddress:
    return nbdio.NbdAddress(info["nbdServer"], int(info["nbdPort"]), None, info["exportName"])


def read_at(addr: nbdio.NbdAddress, offset: int, length: int) -> bytes:
    """Connect, read `length` bytes at `offset`, disconnect."""
    h = nbdio.connect(addr)
    try:
        return bytes(h.pread(length, offset))
    finally:
        nbdio.close(h)


def read_export(info: dict[str, Any], offset: int, length: int) -> bytes:
    return read_at(address(info), offset, length)


def dirty_runs(info: dict[str, Any]) -> list[tuple[int, int]]:
    extents = nbdio.dirty_extents(address(info), info["dirtyBitmapContext"])
    return [(e.start, e.length) for e in extents if e.dirty]


def expected_runs(writes: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The cluster-aligned, merged runs a set of (offset, length) writes dirties."""
    clusters: set[int] = set()
    for off, n in writes:
        clusters.update(range(off // G, (off + n - 1) // G + 1))
    runs: list[tuple[int, int]] = []
    for c in sorted(clusters):
        if runs and runs[-1][0] + runs[-1][1] == c * G:
            runs[-1] = (runs[-1][0], runs[-1][1] + G)
        else:
            runs.append((c * G, G))
    return [(s, min(n, size - s)) for s, n in runs]
