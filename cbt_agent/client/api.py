"""The agent's CBT task API as the backup client sees it (ZStack conventions).

Create, Enable and Disable answer 202 with a `location` that is polled until 200 (the result)
or 503 (`{"error": ErrorCode}`); queries answer 200 at once. Blocking: the client is one
short-lived command doing one thing at a time, and what it imports is paid on every backup
(no event loop, no pydantic: loading them cost more than the whole Enable).

Nothing a reply says is taken on trust: every reply is checked against the contract's JSON
Schema (generated from its models: `contract/reply_schema.py`), the names that become file
names (volume uuids, checkpoints) must have the agent's own form, and the token goes only
to the agent's origin (the scheme, host and port of `--url`): a job `location` anywhere else
is refused before it is asked, and redirects are not followed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from cbt_agent.client.errors import ApiError, BackupError
from cbt_agent.client.names import CHECKPOINT_FORM, UUID_FORM, is_checkpoint_name, is_uuid
from cbt_agent.client.transport import Connection, has_credentials, join, origin
from cbt_agent.contract.jsoncheck import SchemaMismatch, check
from cbt_agent.contract.reply_schema import SCHEMAS
from cbt_agent.errors import SYS_OPERATION

if TYPE_CHECKING:
    from cbt_agent.qemu.psk import Psk

API_PREFIX = "/zstack/v1"
# a job is polled every POLL_FIRST seconds for its first POLL_QUICK seconds (an Enable or a
# Disable answers within ~0.1 s: waiting 50 ms more would be half of it), then every POLL_INTERVAL
POLL_FIRST = 0.005
POLL_QUICK = 0.5
POLL_INTERVAL = 0.05
JOB_TIMEOUT = 600.0  # an Enable of many large disks still finishes in seconds


@dataclass(frozen=True)
class TaskRef:
    uuid: str
    status: str

    @classmethod
    def from_reply(cls, d: object) -> TaskRef:
        """From a CbtTaskInventory as the agent writes it."""
        inv = checked("CbtTaskInventory", d)
        if not is_uuid(inv["uuid"]):
            raise BackupError(f"the agent's task uuid {inv['uuid']!r} is not {UUID_FORM}: refused")
        return cls(inv["uuid"], inv["status"])


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
        info = checked("VolumeCbtBackupInfo", d)
        # these become file names and manifest entries: only the agent's own forms pass
        vol = info["volume"]["volumeUuid"]
        if not is_uuid(vol):
            raise BackupError(
                f"VolumeCbtBackupInfo.volume.volumeUuid {vol!r} is not {UUID_FORM}: refused"
            )
        for key in ("bitmapName", "sinceBitmapName"):
            name = info[key]
            if name is not None and not is_checkpoint_name(name):
                raise BackupError(
                    f"VolumeCbtBackupInfo.{key} {name!r} of disk {vol} is not {CHECKPOINT_FORM}: "
                    "refused"
                )
        port = info["nbdPort"]
        return cls(
            volume_uuid=vol,
            mode=info["mode"],
            bitmap_name=info["bitmapName"],
            since=info["sinceBitmapName"],
            reason=info["reason"],
            nbd_server=info["nbdServer"],
            nbd_port=int(port) if port is not None else None,
            nbd_socket=info["nbdSocket"],
            export_name=info["exportName"],
            dirty_context=info["dirtyBitmapContext"],
            granularity=info["granularity"],
            size=info["size"],
            changed_bytes=info["changedBytes"],
            bitmap_b64=info["bitmapBase64"],
            nbd_tls=bool(info["nbdTls"]),
            nbd_psk=_psk(info),
        )


def checked(component: str, value: object) -> dict[str, Any]:
    """`value` as the contract's `component` (an object), its absent optional fields filled
    with their defaults; BackupError naming the field when it is not one."""
    schema = SCHEMAS[component]
    try:
        check(schema, value, SCHEMAS)
    except SchemaMismatch as e:
        raise BackupError(f"malformed {component} from the agent: {e}") from None
    assert isinstance(value, dict)  # the schema says "object"
    out = dict(value)
    for key, prop in schema["properties"].items():
        if key not in out and "default" in prop:
            out[key] = prop["default"]
    return out


def _psk(info: dict[str, Any]) -> Psk | None:
    """The reply's pre-shared key: both fields or neither (the patterns are checked already)."""
    identity, key = info["nbdTlsPskIdentity"], info["nbdTlsPsk"]
    if identity is None and key is None:
        return None
    if identity is None or key is None or not info["nbdTls"]:
        raise BackupError(
            f"disk {info['volume']['volumeUuid']}: the agent sent half a pre-shared key "
            "(nbdTlsPskIdentity, nbdTlsPsk and nbdTls go together)"
        )
    from cbt_agent.qemu.psk import Psk  # only for an export that requires one

    return Psk(identity, key)


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    for suffix in (API_PREFIX, "/v1"):
        if url.endswith(suffix):
            return url[: -len(suffix)]
    return url


def _flat(text: object, limit: int = 500) -> str:
    """A reply's text on one line, cut to `limit` characters (errors are one line)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit] + "…"


def _error_message(what: str, status: int, body: Any) -> ApiError:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        text = _flat(err.get("details") or err.get("description") or err)
        code = err.get("code")
        code = _flat(code, 40) if code is not None else None
        return ApiError(f"{what} failed: {text} [{code}]", status=status, error_code=code)
    return ApiError(f"{what} failed: HTTP {status} {_flat(body)}", status=status)


class CbtApi:
    """A session on one agent. Use as `with CbtApi(url, token) as api:`."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        job_timeout: float = JOB_TIMEOUT,
        cafile: str | None = None,
    ) -> None:
        self.base = _base_url(url)
        try:
            self.origin = origin(self.base)
        except ValueError:
            raise BackupError(f"--url {url!r} is not a URL") from None
        if self.origin[0] not in ("http", "https") or not self.origin[1]:
            raise BackupError(f"--url {url!r}: an http:// or https:// URL of the agent is needed")
        self.token = token
        self.job_timeout = job_timeout
        self.cafile = cafile  # CA that signed an https agent's certificate (default: system's)
        self._conn: Connection | None = None

    def __enter__(self) -> CbtApi:
        context = None
        if self.origin[0] == "https":
            import ssl

            try:
                context = ssl.create_default_context(cafile=self.cafile)
            except (OSError, ssl.SSLError) as e:
                raise BackupError(f"cannot load the CA file {self.cafile}: {e}") from None
        # no connection-wide Authorization: `_request` adds it to each request it has checked
        self._conn = Connection(self.base, context)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("CbtApi used outside `with`")
        return self._conn

    def on_agent(self, what: str, location: str) -> str:
        """`location` (absolute, or relative to the agent) as a URL on the agent's origin;
        BackupError when it points anywhere else: the token is never sent there."""
        try:
            url = join(self.base, location)
            where = origin(url)
        except ValueError:
            raise BackupError(
                f"{what}: the agent's job location {location!r} is not a URL"
            ) from None
        if where != self.origin or has_credentials(url):
            raise BackupError(
                f"{what}: the agent's job location {location!r} is not on {self.base} (the "
                "scheme, host and port of --url): refused, the token was not sent there"
            )
        return url

    def _request(
        self, method: str, url: str, body: Any = None, params: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """One call with the token, to a URL `on_agent` accepted (or built from --url)."""
        if origin(url) != self.origin:  # every caller checks first; this keeps it so
            raise BackupError(f"refused to send the token to {url}: not {self.base}")
        return self.conn.request(
            method, url, body, params, headers={"Authorization": f"OAuth {self.token}"}
        )

    def _api_url(self, path: str) -> str:
        return f"{self.base}{API_PREFIX}{path}"

    def call(self, what: str, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """An asynchronous API: 202 + location, polled until 200 (returned) or an error."""
        status, reply = self._request(method, self._api_url(path), body)
        if status != 202 or not isinstance(reply, dict) or "location" not in reply:
            raise _error_message(what, status, reply)
        location = self.on_agent(what, str(reply["location"]))
        began = time.monotonic()
        deadline = began + self.job_timeout
        while True:
            status, result = self._request("GET", location)
            if status == 200 and isinstance(result, dict):
                return result
            if status != 202:
                raise _error_message(what, status, result)
            if time.monotonic() > deadline:
                raise ApiError(f"{what}: no result after {self.job_timeout:.0f} s", status=202)
            quick = time.monotonic() - began < POLL_QUICK
            time.sleep(POLL_FIRST if quick else POLL_INTERVAL)

    def find_task(self, vm_uuid: str) -> TaskRef | None:
        """The CBT task of the VM (one per VM), or None."""
        params = {"q": f"resourceRefs.resourceUuid={vm_uuid}"}
        status, reply = self._request("GET", self._api_url("/cbt-task"), params=params)
        if status != 200 or not isinstance(reply, dict):
            raise _error_message("QueryCbtTask", status, reply)
        tasks = reply.get("inventories") or []
        if not isinstance(tasks, list):
            raise BackupError(f"QueryCbtTask returned inventories that are not a list: {tasks!r}")
        if not tasks:
            return None
        return TaskRef.from_reply(tasks[0])

    def create_task(self, vm_uuid: str, name: str, resource_uuid: str | None = None) -> TaskRef:
        """CreateCbtTask; with `resource_uuid` the agent adopts that task's checkpoints where
        the VM's disks carry them (the VM came from another host, or the agent lost its
        database)."""
        params = {"name": name, "vmInstanceUuid": vm_uuid}
        if resource_uuid is not None:
            params["resourceUuid"] = resource_uuid
        reply = self.call("CreateCbtTask", "POST", "/cbt-task/create", {"params": params})
        return TaskRef.from_reply(reply.get("inventory"))

    def enable(
        self, task_uuid: str, bitmap_name: str | None, quiesce: bool | None = None
    ) -> list[VolumeBackupInfo]:
        """EnableCbtTask; `quiesce` True asks for a frozen guest (the agent fails without a
        guest agent), False forbids it, None leaves it to the agent's configuration."""
        params = {} if bitmap_name is None else {"bitmapName": bitmap_name}
        body: dict[str, Any] = {"params": params}
        if quiesce is not None:
            body["systemTags"] = [f"quiesce::{'true' if quiesce else 'false'}"]
        reply = self.call("EnableCbtTask", "POST", f"/cbt-task/enable/{task_uuid}", body)
        infos = reply.get("volumeCbtBackupInfos")
        if not isinstance(infos, list) or not infos:
            raise BackupError(f"EnableCbtTask returned no volumeCbtBackupInfos: {reply}")
        return [VolumeBackupInfo.from_reply(i) for i in infos]

    def disable(self, task_uuid: str, *, force: bool) -> TaskRef:
        reply = self.call(
            "DisableCbtTask",
            "POST",
            f"/cbt-task/disable/{task_uuid}",
            {"params": {"force": force}},
        )
        return TaskRef.from_reply(reply.get("inventory"))

    def export_volumes(self, vm_uuid: str, bitmap_name: str | None) -> list[VolumeBackupInfo]:
        """ExportNbdVolumes of a VM that is not running: every disk, with a checkpoint cut
        offline and the changes since `bitmap_name` (the latest handed out when None)."""
        params: dict[str, Any] = {"vmInstanceUuid": vm_uuid}
        if bitmap_name is not None:
            params["bitmapName"] = bitmap_name
        reply = self.call("ExportNbdVolumes", "POST", "/cbt-task/exportvolume", {"params": params})
        infos = reply.get("volumeInfos")
        if not isinstance(infos, list) or not infos:
            raise BackupError(f"ExportNbdVolumes returned no volumeInfos: {reply}")
        return [VolumeBackupInfo.from_reply(i) for i in infos]

    def unexport_volumes(self, vm_uuid: str) -> dict[str, Any]:
        """UnexportNbdVolumes: the VM's offline export ends, its images' locks released."""
        return self.call(
            "UnexportNbdVolumes",
            "POST",
            "/cbt-task/unexportvolume",
            {"params": {"vmInstanceUuid": vm_uuid}},
        )


def vm_not_running(e: ApiError, vm_uuid: str) -> bool:
    """Whether the agent refused an Enable because the VM is not running (then its disks are
    exported offline instead)."""
    return e.error_code == SYS_OPERATION and f"VM [uuid: {vm_uuid}] is not running" in e.message
