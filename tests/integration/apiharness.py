"""The HTTP API test client: `Api` drives one app behind aiohttp's test server and reads its
database. Every request fails the test on any HTTP 500 and on any job that ended in ZStack's
internal error (SYS.1000). Fixtures using it are in this folder's conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import stack
from aiohttp.test_utils import TestClient

from cbt_agent.config import Config
from cbt_agent.store import SyncStore

TOKENS = ("tok-a-0123456789abcdef", "tok-b-0123456789abcdef")  # 16+ characters
PREFIXES = ("/zstack/v1", "/v1")
P = "/zstack/v1"
HEX32 = re.compile(r"^[0-9a-f]{32}$")
ZSTACK_DATE = re.compile(r"^[A-Z][a-z]{2} \d{1,2}, \d{4} \d{1,2}:\d{2}:\d{2} (AM|PM)$")
CBT_TASK = "org.zstack.header.cbt.CbtTaskInventory"
CBT_REF = "org.zstack.header.cbt.CbtTaskResourceRefInventory"
BACKUP_INFO = "org.zstack.header.cbt.VolumeCbtBackupInfo"
VOLUME_TO = "org.zstack.kvm.VolumeTO"
FULL_FIRST = "first checkpoint of this disk: no earlier change tracking"
EXTENSION_FIELDS = (
    "exportName",
    "dirtyBitmapContext",
    "sinceBitmapName",
    "reason",
    "granularity",
    "size",
    "changedBytes",
    "quiesced",
    "scratchBudget",
)
INFO_FIELDS = {
    "volume",
    "mode",
    "bitmapName",
    "nbdServer",
    "nbdPort",
    "bitmapBase64",
    "target",
    "scratchNodeName",
    "metadata",
    *EXTENSION_FIELDS,
}
TABLES = ("tasks", "resource_refs", "transitions", "checkpoints", "exports", "api_jobs")
NO_BODY: Any = object()


class Reply(NamedTuple):
    status: int
    body: Any  # parsed JSON for application/json, else the text
    content_type: str


class Api:
    """A client of one running app, plus read access to its database."""

    def __init__(self, client: TestClient[Any, Any], config: Config) -> None:
        self.client = client
        self.config = config
        self.closed = False

    @property
    def base(self) -> str:
        return f"http://{self.client.host}:{self.client.port}"

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.client.close()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = NO_BODY,
        *,
        token: str | None = TOKENS[0],
        auth: str | None = None,
        headers: dict[str, str] | None = None,
        params: Any = None,
        data: bytes | None = None,
    ) -> Reply:
        h: dict[str, str] = {}
        if auth is not None:
            h["Authorization"] = auth
        elif token is not None:
            h["Authorization"] = f"OAuth {token}"
        if body is not NO_BODY:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json; charset=utf-8"
        h.update(headers or {})
        resp = await self.client.request(method, path, headers=h, params=params, data=data)
        text = await resp.text()
        parsed: Any = text
        if resp.content_type == "application/json":
            parsed = json.loads(text)
        reply = Reply(resp.status, parsed, resp.content_type)
        assert_not_internal(method, path, reply)
        return reply

    async def submit(self, method: str, path: str, body: Any = NO_BODY, **kw: Any) -> str:
        """Start an async API; returns its location (checked for ZStack's form)."""
        r = await self.request(method, path, body, **kw)
        assert r.status == 202, r
        assert r.content_type == "application/json"
        assert set(r.body) == {"location"}, r.body
        location = r.body["location"]
        assert re.fullmatch(rf"{re.escape(self.base)}/zstack/v1/api-jobs/[0-9a-f]{{32}}", location)
        return str(location)

    async def poll(self, location: str, within: float = 60, **kw: Any) -> Reply:
        path = urlsplit(location).path
        assert "/zstack/v1/api-jobs/" in path, location
        deadline = time.monotonic() + within
        while True:
            r = await self.request("GET", path, **kw)
            if r.status != 202:
                return r
            assert r.body == {}, r
            assert time.monotonic() < deadline, f"job {location} still running after {within}s"
            await asyncio.sleep(0.02)

    async def call(self, method: str, path: str, body: Any = NO_BODY, **kw: Any) -> Reply:
        """Submit an async API and poll it to its end: (status, body)."""
        return await self.poll(await self.submit(method, path, body, **kw))

    async def create(self, vm_uuid: str, name: str = "t", prefix: str = P, **params: Any) -> str:
        r = await self.call(
            "POST",
            f"{prefix}/cbt-task/create",
            {"params": {"name": name, "vmInstanceUuid": vm_uuid, **params}},
        )
        assert r.status == 200, r
        return str(r.body["inventory"]["uuid"])

    async def enable(self, task: str, body: Any = None, prefix: str = P) -> list[dict[str, Any]]:
        r = await self.call("POST", f"{prefix}/cbt-task/enable/{task}", body or {"params": {}})
        assert r.status == 200, r
        return list(r.body["volumeCbtBackupInfos"])

    async def query(self, params: Any = None, path: str = f"{P}/cbt-task", **kw: Any) -> Reply:
        return await self.request("GET", path, params=params, **kw)

    async def names(self, params: Any = None, path: str = f"{P}/cbt-task") -> list[str]:
        r = await self.query(params, path)
        assert r.status == 200, r
        return [inv["name"] for inv in r.body["inventories"]]

    # -- the database, read-only --

    @contextlib.contextmanager
    def db(self) -> Iterator[SyncStore]:
        s = SyncStore(self.config.db_path, readonly=True)
        try:
            yield s
        finally:
            s.close()

    def counts(self) -> dict[str, int]:
        with self.db() as s:
            return {t: int(s.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in TABLES}

    def history(self, task_uuid: str) -> list[str]:
        with self.db() as s:
            return [r["to_status"] for r in s.history_rows(task_uuid)]

    def status(self, task_uuid: str) -> str | None:
        with self.db() as s:
            task = s.get_task(task_uuid)
            return None if task is None else task.status.value


def assert_not_internal(method: str, path: str, r: Reply) -> None:
    """Never a 500, never ZStack's internal error, for anything these tests send."""
    assert r.status != 500, f"{method} {path} answered 500: {r.body!r}"
    if isinstance(r.body, dict) and isinstance(r.body.get("error"), dict):
        assert r.body["error"].get("code") != "SYS.1000", f"{method} {path}: {r.body!r}"


def assert_error(r: Reply, code: str, *needles: str) -> dict[str, Any]:
    assert r.status == 503, r
    assert r.content_type == "application/json"
    assert set(r.body) == {"error"}, r.body
    err: dict[str, Any] = r.body["error"]
    assert err["code"] == code, err
    assert isinstance(err["description"], str) and err["description"]
    for needle in needles:
        assert needle in err["details"], err
    return err


def assert_plain(r: Reply, status: int, *needles: str) -> None:
    assert r.status == status, r
    assert r.content_type == "text/plain", r
    for needle in needles:
        assert needle in r.body, r


EMPTY = dict.fromkeys(TABLES, 0)


def no_task_rows(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if k != "api_jobs"}


def clusters_bitmap(clusters: int, dirty: set[int] | None = None) -> bytes:
    """Bit i = cluster i, LSB first; every cluster set unless `dirty` is given."""
    bits = bytearray((clusters + 7) // 8)
    for c in range(clusters) if dirty is None else dirty:
        bits[c // 8] |= 1 << (c % 8)
    return bytes(bits)


def is_file(path: str) -> bool:
    return Path(path).is_file()


def cbt_bitmaps(vm: stack.TestVm, volume_uuid: str) -> list[str]:
    return [b["name"] for b in vm.bitmaps(volume_uuid) if b["name"].startswith("cbt-")]


# ---- fixtures -----------------------------------------------------------------------------
