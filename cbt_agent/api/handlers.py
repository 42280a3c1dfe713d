"""The routes of ZStack's CBT task REST surface: each handler validates, submits an api job (or
answers a query), and replies in ZStack's JSON.

REST-layer faults answer at once in plain text (400 bad auth header, body not JSON, repeated
X-Job-UUID; 404/405 routes). Everything past that runs as an api job: 202 with the job's
location, then 202/200/503 on the location.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from cbt_agent import __version__
from cbt_agent.api import openapi, query, replies, validate, webhooks, zstack
from cbt_agent.api.inventories import TaskQuery
from cbt_agent.api.keys import CONFIG, INVENTORIES, JOBS, METRICS, SERVICE
from cbt_agent.contract.constants import QUERY_LIMIT, UUID_PATTERN
from cbt_agent.contract.replies import Health, JobLocation
from cbt_agent.errors import CbtError, OperationError
from cbt_agent.metrics import CONTENT_TYPE
from cbt_agent.store import ApiJob, SyncStore

log = logging.getLogger(__name__)

PREFIXES = ("/zstack/v1", "/v1")
JOB_UUID = re.compile(UUID_PATTERN)


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    """A reply whose body is already in ZStack's JSON form (a wire model's `wire()`)."""
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def _error(exc: CbtError | dict[str, Any], status: int = 503) -> web.Response:
    error = exc if isinstance(exc, dict) else zstack.error_from_exception(exc)
    return _json({"error": error}, status)


def _plain(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain")


def _with_schema_map(body: dict[str, Any]) -> dict[str, Any]:
    """`body` with ZStack's schema map (when it holds any typed object)."""
    schema = zstack.schema_map(body, zstack.REPLY_SCHEMA_CLASSES)
    return {**body, "schema": schema} if schema else body


def _location(request: web.Request, job_uuid: str) -> str:
    """Where to poll the job: `api.public_url`, else the address the caller connected to (the
    server's own socket, never the request's Host header, which the caller writes)."""
    base = request.app[CONFIG].api.public_url
    if base is None:
        api = request.app[CONFIG].api
        host, port = api.host, api.port
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            host, port = str(sockname[0]), int(sockname[1])
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if api.tls_cert is not None else "http"
        base = f"{scheme}://{host}:{port}"
    return f"{base}/zstack/v1/api-jobs/{job_uuid}"


def _caller(request: web.Request) -> str:
    """Who asked, for counting their jobs: a digest of the token (never the token itself)."""
    _scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    return hashlib.sha256(token.strip().encode()).hexdigest()[:16]


async def _body(request: web.Request) -> dict[str, Any] | web.Response:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return _plain(400, f"the request body is not valid JSON: {e}")
    except RecursionError:  # nested deeper than the decoder recurses
        return _plain(400, "the request body is nested too deeply")
    if not isinstance(body, dict):
        return _plain(400, "the request body must be a JSON object")
    return body


async def _submit(
    request: web.Request,
    api: str,
    operation: Callable[[], Awaitable[dict[str, Any]]],
    task_uuid: str | None = None,
) -> web.Response:
    """Start an asynchronous API: `operation` (validate, run, build the reply) is the job."""
    job_uuid = request.headers.get("X-Job-UUID")
    if job_uuid is not None and not JOB_UUID.fullmatch(job_uuid):
        return _plain(400, f"invalid X-Job-UUID[{job_uuid[:64]}]: must be 32 hex characters")
    job_uuid = (job_uuid or zstack.new_uuid()).lower()
    webhook = request.headers.get("X-Web-Hook")
    if webhook is not None:
        problem = _webhook_problem(webhook, request.app[CONFIG].api.webhook_hosts)
        if len(webhook) > webhooks.MAX_URL:
            problem = f"longer than {webhooks.MAX_URL} characters"
        if problem:
            return _plain(400, f"invalid X-Web-Hook[{webhook[:200]}]: {problem}")

    want_schema = "X-JSON-Schema" in request.headers
    jobs = request.app[JOBS]
    caller = _caller(request)
    cap = request.app[CONFIG].api.max_jobs_per_caller
    if jobs.running_for(caller) >= cap:
        return _error(
            OperationError(
                f"this caller has {cap} api jobs running (api.max_jobs_per_caller): "
                "retry when some have finished"
            )
        )
    if not await jobs.submit(
        job_uuid, api, operation, task_uuid, want_schema, webhook, caller=caller
    ):
        return _plain(400, f"Duplicate job uuid[{job_uuid}]")
    return _json(JobLocation(location=_location(request, job_uuid)).wire(), 202)


def _webhook_problem(url: str, allowed: tuple[str, ...]) -> str | None:
    """Why a webhook URL is refused, or None. The caller chooses the URL, so only the
    configured hosts (api.webhook_hosts) may receive results."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "not a URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL"
    if parts.hostname.lower() not in allowed:
        return f"host {parts.hostname} is not in api.webhook_hosts"
    return None


def job_reply(job: ApiJob) -> tuple[int, dict[str, Any]]:
    """What polling a job answers (and what its webhook receives): status and body."""
    if job.state == "Running":
        return 202, {}
    if job.error is not None:
        return 503, {"error": job.error}
    result = job.result or {}
    return 200, _with_schema_map(result) if job.want_schema else result


async def create_task(request: web.Request) -> web.Response:
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    service = request.app[SERVICE]

    async def create() -> dict[str, Any]:
        return replies.inventory_reply(await service.create(validate.create_task(body)))

    return await _submit(request, "CreateCbtTask", create)


async def enable_task(request: web.Request) -> web.Response:
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    uuid = request.match_info["uuid"]
    service = request.app[SERVICE]

    async def enable() -> dict[str, Any]:
        return replies.enable_reply(await service.enable(validate.enable_task(uuid, body)))

    return await _submit(request, "EnableCbtTask", enable, uuid)


async def disable_task(request: web.Request) -> web.Response:
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    uuid = request.match_info["uuid"]
    service = request.app[SERVICE]

    async def disable() -> dict[str, Any]:
        return replies.inventory_reply(await service.disable(validate.disable_task(uuid, body)))

    return await _submit(request, "DisableCbtTask", disable, uuid)


async def delete_task(request: web.Request) -> web.Response:
    uuid = request.match_info["uuid"]
    service = request.app[SERVICE]

    async def delete() -> dict[str, Any]:
        force = query.parse_bool_param("force", request.query.get("force"), False)
        await service.delete(validate.delete_task(uuid, force, request.query.get("deleteMode")))
        return {}

    return await _submit(request, "DeleteCbtTask", delete, uuid)


async def query_tasks(request: web.Request) -> web.Response:
    """QueryCbtTask, answered from the inventories kept in memory (`api.inventories`): the
    same query again is a lookup, the default query a slice and a join on the event loop; a
    query with conditions or a sort over many tasks runs in a thread."""
    inventories = request.app[INVENTORIES]
    uuid = request.match_info.get("uuid")
    asked = (uuid, request.query_string)
    body = await inventories.cached(asked)
    if body is not None:
        return web.Response(body=body, content_type="application/json", charset="utf-8")
    try:
        conditions = query.parse_conditions(request.query.getall("q", []))
    except query.QuerySyntaxError as e:
        return _plain(400, str(e))
    try:
        if uuid is not None:
            conditions.append(query.Condition("uuid", "=", uuid))
        q = request.query
        wanted = TaskQuery(
            conditions=conditions,
            sort=q.get("sort"),
            start=query.parse_int_param("start", q.get("start"), 0) or 0,
            limit=query.parse_int_param("limit", q.get("limit"), QUERY_LIMIT),
            count=query.parse_bool_param("count", q.get("count"), False),
            with_count=query.parse_bool_param("replyWithCount", q.get("replyWithCount"), False),
            fields=tuple(f for f in (q.get("fields") or "").split(",") if f.strip()),
        )
        body = await inventories.answer(wanted, asked)
    except CbtError as e:
        return _error(e)
    return web.Response(body=body, content_type="application/json", charset="utf-8")


MAX_AREAS = 10_000  # changed areas in one reply: a 1 TiB disk never builds a giant body


async def changed_areas(request: web.Request) -> web.Response:
    """Extension: the changed areas of one disk of a Running task (QueryChangedDiskAreas)."""
    q = request.query
    try:
        task_uuid = validate.require_uuid(request.match_info["uuid"], "uuid")
        volume_uuid = validate.require_uuid(request.match_info["volumeUuid"], "volumeUuid")
        start = query.parse_int_param("startOffset", q.get("startOffset"), 0) or 0
        length = query.parse_int_param("length", q.get("length"), None, minimum=1)
        limit = query.parse_int_param("limit", q.get("limit"), MAX_AREAS, minimum=1)
        assert limit is not None
        page = await request.app[SERVICE].changed_areas(
            task_uuid, volume_uuid, start, length, min(limit, MAX_AREAS)
        )
    except CbtError as e:
        return _error(e)
    # up to 10,000 areas: written without json.dumps of an object per area
    text = replies.changed_areas_json(page)
    return web.Response(text=text, content_type="application/json")


def poll_reply(job: ApiJob, schema: bool) -> tuple[int, bytes]:
    """Status and JSON body of a poll of `job`; `schema`: the poll sent X-JSON-Schema."""
    status, body = job_reply(job)
    if status == 200 and schema:
        body = _with_schema_map(body)
    return status, json.dumps(body).encode()


async def api_job(request: web.Request) -> web.Response:
    # a result holds NBD endpoints: only known callers may read it (ZStack's SDK sends the
    # session on polls too)
    job_uuid = request.match_info["uuid"]
    if not JOB_UUID.fullmatch(job_uuid):
        return _plain(404, f"no job[uuid: {job_uuid[:64]}]")
    jobs = request.app[JOBS]
    schema = "X-JSON-Schema" in request.headers
    # a finished job's reply, or a job of this process still running: no database read
    reply = jobs.finished.reply(job_uuid.lower(), schema, poll_reply)
    if reply is None and jobs.is_running(job_uuid.lower()):
        return _json({}, 202)
    if reply is None:
        job = await request.app[SERVICE].store.run(SyncStore.get_job, job_uuid.lower())
        if job is None:
            return _plain(404, f"no job[uuid: {job_uuid}]")
        jobs.finished.add(job)
        reply = poll_reply(job, schema)
    status, body = reply
    return web.Response(status=status, body=body, content_type="application/json", charset="utf-8")


async def export_volumes(request: web.Request) -> web.Response:
    """ExportNbdVolumes: the disks of a VM that is not running, exported read-only over NBD."""
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    service = request.app[SERVICE]

    async def export() -> dict[str, Any]:
        return replies.export_reply(await service.export_volumes(validate.export_volumes(body)))

    return await _submit(request, "ExportNbdVolumes", export)


async def unexport_volumes(request: web.Request) -> web.Response:
    """UnexportNbdVolumes: the VM's offline export ends; its images' locks are released."""
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    service = request.app[SERVICE]

    async def unexport() -> dict[str, Any]:
        cmd = validate.unexport_volumes(body)
        return replies.unexport_reply(await service.unexport_volumes(cmd))

    return await _submit(request, "UnexportNbdVolumes", unexport)


async def openapi_document(request: web.Request) -> web.Response:
    """The OpenAPI document of the prefix asked for (no auth)."""
    prefix = request.path.removesuffix("/openapi.json")
    return web.json_response(openapi.openapi_document(prefix))


async def healthz(request: web.Request) -> web.Response:
    return _json(Health(status="ok", version=__version__).wire())


async def metrics(request: web.Request) -> web.Response:
    """Prometheus' text format: figures kept current as things happen (cbt_agent.metrics); a
    scrape adds two small counts (jobs running, exports open) and the scratch last looked at."""
    service = request.app[SERVICE]
    _by_status, exports = await service.store.run(SyncStore.counts)
    running = len(await service.store.run(SyncStore.running_jobs))
    body = request.app[METRICS].render(
        jobs_running=running, exports_open=exports, scratch=service.watch.totals()
    )
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


_PUBLIC: frozenset[Callable[..., Any]] = frozenset({healthz, openapi_document})


def add_routes(app: web.Application) -> None:
    for prefix in PREFIXES:
        app.router.add_post(f"{prefix}/cbt-task/create", create_task)
        app.router.add_post(f"{prefix}/cbt-task/exportvolume", export_volumes)
        app.router.add_post(f"{prefix}/cbt-task/unexportvolume", unexport_volumes)
        app.router.add_post(f"{prefix}/cbt-task/enable/{{uuid}}", enable_task)
        app.router.add_post(f"{prefix}/cbt-task/disable/{{uuid}}", disable_task)
        # "create" is CreateCbtTask's path, not a task uuid: GET/DELETE on it are a 405
        task = f"{prefix}/cbt-task/{{uuid:(?!(?:create|exportvolume|unexportvolume)$)[^/]+}}"
        app.router.add_delete(task, delete_task)
        app.router.add_get(f"{prefix}/cbt-task", query_tasks)
        app.router.add_get(task, query_tasks)
        app.router.add_get(f"{prefix}/api-jobs/{{uuid}}", api_job)
        app.router.add_get(
            f"{prefix}/cbt-task/{{uuid}}/volumes/{{volumeUuid}}/changed-areas", changed_areas
        )
        app.router.add_get(f"{prefix}/openapi.json", openapi_document)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
