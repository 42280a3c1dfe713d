"""The HTTP API's application: ZStack's CBT task REST surface on aiohttp. Authentication and
"never a traceback" are middlewares; each long-lived resource (store, libvirt, QMP router,
worker, webhook delivery, job expiry) is a cleanup context. The routes are in `handlers`.

An unknown session token is ZStack's ID.1001 (503).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from cbt_agent.api import webhooks, zstack
from cbt_agent.api.handlers import _PUBLIC, _error, _plain, add_routes, job_reply
from cbt_agent.api.inventories import Inventories
from cbt_agent.api.jobs import Jobs
from cbt_agent.api.keys import (
    CONFIG,
    HYPERVISOR,
    INVENTORIES,
    JOBS,
    METRICS,
    ROUTER,
    SERVICE,
    STORE,
)
from cbt_agent.config import Config
from cbt_agent.engine.checkpoints import StepHook
from cbt_agent.engine.reconcile import reconcile
from cbt_agent.engine.service import CbtService
from cbt_agent.errors import CbtError
from cbt_agent.hypervisor.libvirt import Hypervisor
from cbt_agent.metrics import Metrics
from cbt_agent.qemu.qmp import QmpRouter
from cbt_agent.store import ApiJob, Store

__all__ = [
    "CONFIG",
    "HYPERVISOR",
    "INVENTORIES",
    "JOBS",
    "METRICS",
    "ROUTER",
    "SERVICE",
    "STORE",
    "add_routes",
    "make_app",
]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _authenticate(request: web.Request) -> web.Response | None:
    """None if the caller presents a known token; otherwise the reply to send."""
    header = request.headers.get("Authorization")
    if header is None:
        return _plain(400, "missing header 'Authorization'")
    scheme, _, token = header.strip().partition(" ")
    # printable ASCII only: other bytes (aiohttp hands them on undecoded) are no token
    if scheme != "OAuth" or not token.strip() or not (token.isascii() and token.isprintable()):
        return _plain(400, "Authorization header must be 'OAuth <session uuid>'")
    token = token.strip()
    known = False
    for candidate in request.app[CONFIG].api.tokens:
        # compare against every token so the time taken says nothing about which one matched
        known |= hmac.compare_digest(candidate.encode(), token.encode())
    if not known:
        return _error(
            zstack.error_code(
                zstack.ID_SESSION_EXPIRED, "Session expired", "Session expired or unknown"
            )
        )
    return None


@web.middleware
async def authenticated(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every route but /healthz and the OpenAPI document needs a known token, checked before
    the handler runs (so before any body is read: an unknown caller learns nothing). A path
    or method that does not exist stays a plain 404/405."""
    match = request.match_info
    if match.http_exception is None and match.handler not in _PUBLIC:
        denied = _authenticate(request)
        if denied is not None:
            return denied
    return await handler(request)


@web.middleware
async def never_a_traceback(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Any unexpected error becomes a ZStack SYS.1000 body, logged here with its traceback."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except CbtError as e:
        return _error(e)
    except Exception as e:
        log.exception("%s %s failed", request.method, request.path)
        return _error(
            zstack.error_code(zstack.SYS_INTERNAL, "An internal error happened", type(e).__name__)
        )


def make_app(
    config: Config, *, step: StepHook | None = None, hypervisor: Hypervisor | None = None
) -> web.Application:
    """The agent's aiohttp application. Each long-lived resource has its own cleanup context,
    opened in order on startup and closed in reverse on cleanup (also after a failed start):
    the store, libvirt, the QMP router, the worker (unfinished jobs failed, reconcile, lifecycle
    events; running jobs drained at the end), webhook delivery, job expiry.

    `hypervisor` replaces the libvirt connection made from the config: tests of the API's own
    rules (authentication, validation, queries, the OpenAPI document) pass a fake one and run
    without libvirtd."""
    app = web.Application(
        client_max_size=config.api.max_body_bytes,
        middlewares=[never_a_traceback, authenticated],
    )
    app[CONFIG] = config
    app[METRICS] = figures = Metrics()
    add_routes(app)

    async def store(app: web.Application) -> AsyncIterator[None]:
        app[STORE] = Store(config.db_path, figures)
        await app[STORE].open()
        app[INVENTORIES] = Inventories(app[STORE])
        yield
        await app[STORE].close()

    async def libvirt(app: web.Application) -> AsyncIterator[None]:
        app[HYPERVISOR] = hypervisor or Hypervisor(config.libvirt_uri)
        await app[HYPERVISOR].open()
        yield
        await app[HYPERVISOR].close()

    async def qmp(app: web.Application) -> AsyncIterator[None]:
        app[ROUTER] = QmpRouter(
            config.qmp_socket_template, app[HYPERVISOR], on_error=figures.qmp_failed
        )
        yield
        await app[ROUTER].close()

    async def worker(app: web.Application) -> AsyncIterator[None]:
        service = CbtService(
            config, app[STORE], app[HYPERVISOR], app[ROUTER], step=step, metrics=figures
        )
        jobs = Jobs(config, app[STORE], figures)
        app[SERVICE] = service
        app[JOBS] = jobs
        try:
            await jobs.fail_unfinished()
            await reconcile(service)
            await app[HYPERVISOR].watch(service.on_vm_event)
            await app[INVENTORIES].current()  # read once here, not by the first query
            # what startup loaded lives as long as the process: full garbage collections (which
            # hold the GIL, and so the event loop) need not scan it again
            gc.collect()
            gc.freeze()
            yield
        finally:
            await jobs.drain()
            await service.watch.close()

    async def webhook_delivery(app: web.Application) -> AsyncIterator[None]:
        http = webhooks.session(await webhooks.pinned_addresses(config.api.webhook_hosts))
        deliveries: set[asyncio.Task[None]] = set()

        async def on_job_done(job: ApiJob) -> None:
            if job.webhook:
                reply = job_reply(job)
                t = asyncio.create_task(webhooks.deliver(http, job, reply, figures.webhook))
                deliveries.add(t)
                t.add_done_callback(deliveries.discard)

        app[JOBS].on_done = on_job_done
        try:
            yield
        finally:
            await app[JOBS].drain()  # their results still go out before the session closes
            for t in list(deliveries):
                t.cancel()
            await http.close()

    async def expiry(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(app[JOBS].expire_forever(), name="job-expiry")
        yield
        task.cancel()

    app.cleanup_ctx.extend([store, libvirt, qmp, worker, webhook_delivery, expiry])
    return app
