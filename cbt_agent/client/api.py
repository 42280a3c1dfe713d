"""The agent's CBT task API as the backup client sees it (aiohttp, ZStack conventions).

Create, Enable and Disable answer 202 with a `location` that is polled until 200 (the result)
or 503 (`{"error": ErrorCode}`); queries answer 200 at once.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
from pydantic import ValidationError

from cbt_agent.client.errors import ApiError, BackupError
from cbt_agent.contract.replies import CbtTaskInventory, VolumeCbtBackupInfo
from cbt_agent.qemu.psk import Psk

API_PREFIX = "/zstack/v1"
POLL_INTERVAL = 0.05
JOB_TIMEOUT = 600.0  # an Enable of many large disks still finishes in seconds


@dataclass(frozen=True)
class TaskRef:
    uuid: str
    status: str

    @classmethod
    def from_reply(cls, d: object) -> TaskRef:
        """From a CbtTaskInventory as the agent writes it."""
        try:
            inv = CbtTaskInventory.model_validate(d)
        except ValidationError as e:
            raise BackupError(f"malformed CbtTaskInventory from the agent ({e}): {d}") from e
        return cls(inv.uuid, inv.status.value)


@dataclass(frozen=True)
class VolumeBackupInfo:
    """The fields of one VolumeCbtBackupInfo the client uses."""

    volume_uuid: str
    mode: str
    bitmap_name: str
    since: str | None
    reason: str | None
    nbd_server: str | None
    nbd_port: int | None
    nbd_socket: str | None
    export_name: str
    dirty_context: str | None
    granularity: int
    size: int
    changed_bytes: int | None
    bitmap_b64: str | None
    nbd_tls: bool = False  # the export requires TLS (nbdTls)
    # the pre-shared key it requires (nbdTlsPskIdentity, nbdTlsPsk); None: x509 or plain
    nbd_psk: Psk | None = None

    @classmethod
    def from_reply(cls, d: object) -> VolumeBackupInfo:
        """From a VolumeCbtBackupInfo as the agent writes it."""
        try:
            info = VolumeCbtBackupInfo.model_validate(d)
        except ValidationError as e:
            raise BackupError(f"malformed VolumeCbtBackupInfo from the agent ({e}): {d}") from e
        return cls(
            volume_uuid=info.volume.volume_uuid,
            mode=info.mode,
            bitmap_name=info.bitmap_name,
            since=info.since_bitmap_name,
            reason=info.reason,
            nbd_server=info.nbd_server,
            nbd_port=int(info.nbd_port) if info.nbd_port is not None else None,
            nbd_socket=info.nbd_socket,
            export_name=info.export_name,
            dirty_context=info.dirty_bitmap_context,
            granularity=info.granularity,
            size=info.size,
            changed_bytes=info.changed_bytes,
            bitmap_b64=info.bitmap_base64,
            nbd_tls=bool(info.nbd_tls),
            nbd_psk=_psk(info),
        )


def _psk(info: VolumeCbtBackupInfo) -> Psk | None:
    """The reply's pre-shared key: both fields or neither (the patterns are checked already)."""
    if info.nbd_tls_psk_identity is None and info.nbd_tls_psk is None:
        return None
    if info.nbd_tls_psk_identity is None or info.nbd_tls_psk is None or not info.nbd_tls:
        raise BackupError(
            f"disk {info.volume.volume_uuid}: the agent sent half a pre-shared key "
            "(nbdTlsPskIdentity, nbdTlsPsk and nbdTls go together)"
        )
    return Psk(info.nbd_tls_psk_identity, info.nbd_tls_psk)


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    for suffix in (API_PREFIX, "/v1"):
        if url.endswith(suffix):
            return url[: -len(suffix)]
    return url


def _error_message(what: str, status: int, body: Any) -> ApiError:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        text = err.get("details") or err.get("description") or str(err)
        return ApiError(
            f"{what} failed: {text} [{err.get('code')}]", status=status, error_code=err.get("code")
        )
    return ApiError(f"{what} failed: HTTP {status} {body}", status=status)


class CbtApi:
    """A session on one agent. Use as `async with CbtApi(url, token) as api:`."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        job_timeout: float = JOB_TIMEOUT,
        cafile: str | None = None,
    ) -> None:
        self.base = _base_url(url)
        self.token = token
        self.job_timeout = job_timeout
        self.cafile = cafile  # CA that signed an https agent's certificate (default: system's)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> CbtApi:
        connector = None
        if self.cafile is not None:
            try:
                context = ssl.create_default_context(cafile=self.cafile)
            except (OSError, ssl.SSLError) as e:
                raise BackupError(f"cannot load the CA file {self.cafile}: {e}") from None
            connector = aiohttp.TCPConnector(ssl=context)
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"OAuth {self.token}"},
            timeout=aiohttp.ClientTimeout(total=60),
            connector=connector,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("CbtApi used outside `async with`")
        return self._session

    async def _request(self, method: str, url: str, body: Any = None) -> tuple[int, Any]:
        try:
            async with self.session.request(method, url, json=body) as r:
                try:
                    data = await r.json(content_type=None)
                except ValueError:
                    data = await r.text()
                return r.status, data
        except (aiohttp.ClientError, TimeoutError) as e:
            raise BackupError(
                f"cannot reach the agent at {self.base}: {e or type(e).__name__}"
            ) from None

    async def call(self, what: str, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """An asynchronous API: 202 + location, polled until 200 (returned) or an error."""
        status, reply = await self._request(method, f"{self.base}{API_PREFIX}{path}", body)
        if status != 202 or not isinstance(reply, dict) or "location" not in reply:
            raise _error_message(what, status, reply)
        location = str(reply["location"])
        deadline = time.monotonic() + self.job_timeout
        while True:
            status, result = await self._request("GET", location)
            if status == 200 and isinstance(result, dict):
                return result
            if status != 202:
                raise _error_message(what, status, result)
            if time.monotonic() > deadline:
                raise ApiError(f"{what}: no result after {self.job_timeout:.0f} s", status=202)
            await asyncio.sleep(POLL_INTERVAL)

    async def find_task(self, vm_uuid: str) -> TaskRef | None:
        """The CBT task of the VM (one per VM), or None."""
        url = f"{self.base}{API_PREFIX}/cbt-task"
        params = {"q": f"resourceRefs.resourceUuid={vm_uuid}"}
        try:
            async with self.session.get(url, params=params) as r:
                status = r.status
                reply = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise BackupError(
                f"cannot reach the agent at {self.base}: {e or type(e).__name__}"
            ) from None
        if status != 200:
            raise _error_message("QueryCbtTask", status, reply)
        tasks = reply.get("inventories") or []
        if not tasks:
            return None
        return TaskRef.from_reply(tasks[0])

    async def create_task(
        self, vm_uuid: str, name: str, resource_uuid: str | None = None
    ) -> TaskRef:
        """CreateCbtTask; with `resource_uuid` the agent adopts that task's checkpoints where
        the VM's disks carry them (the VM came from another host, or the agent lost its
        database)."""
        params = {"name": name, "vmInstanceUuid": vm_uuid}
        if resource_uuid is not None:
            params["resourceUuid"] = resource_uuid
        reply = await self.call("CreateCbtTask", "POST", "/cbt-task/create", {"params": params})
        return TaskRef.from_reply(reply.get("inventory"))

    async def enable(
        self, task_uuid: str, bitmap_name: str | None, quiesce: bool | None = None
    ) -> list[VolumeBackupInfo]:
        """EnableCbtTask; `quiesce` True asks for a frozen guest (the agent fails without a
        guest agent), False forbids it, None leaves it to the agent's configuration."""
        params = {} if bitmap_name is None else {"bitmapName": bitmap_name}
        body: dict[str, Any] = {"params": params}
        if quiesce is not None:
            body["systemTags"] = [f"quiesce::{'true' if quiesce else 'false'}"]
        reply = await self.call("EnableCbtTask", "POST", f"/cbt-task/enable/{task_uuid}", body)
        infos = reply.get("volumeCbtBackupInfos")
        if not isinstance(infos, list) or not infos:
            raise BackupError(f"EnableCbtTask returned no volumeCbtBackupInfos: {reply}")
        return [VolumeBackupInfo.from_reply(i) for i in infos]

    async def disable(self, task_uuid: str, *, force: bool) -> TaskRef:
        reply = await self.call(
            "DisableCbtTask",
            "POST",
            f"/cbt-task/disable/{task_uuid}",
            {"params": {"force": force}},
        )
        return TaskRef.from_reply(reply.get("inventory"))
