"""The application's keys: each long-lived resource the handlers reach through `request.app`."""

from __future__ import annotations

from aiohttp import web

from cbt_agent.api.inventories import Inventories
from cbt_agent.api.jobs import Jobs
from cbt_agent.config import Config
from cbt_agent.engine.service import CbtService
from cbt_agent.hypervisor.libvirt import Hypervisor
from cbt_agent.metrics import Metrics
from cbt_agent.qemu.qmp import QmpRouter
from cbt_agent.store import Store

CONFIG: web.AppKey[Config] = web.AppKey("config", Config)
STORE: web.AppKey[Store] = web.AppKey("store", Store)
HYPERVISOR: web.AppKey[Hypervisor] = web.AppKey("hypervisor", Hypervisor)
ROUTER: web.AppKey[QmpRouter] = web.AppKey("qmp_router", QmpRouter)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
SERVICE: web.AppKey[CbtService] = web.AppKey("service", CbtService)
JOBS: web.AppKey[Jobs] = web.AppKey("jobs", Jobs)
INVENTORIES: web.AppKey[Inventories] = web.AppKey("inventories", Inventories)
