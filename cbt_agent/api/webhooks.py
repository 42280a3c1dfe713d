"""X-Web-Hook delivery, as ZStack does it (POST of the job's reply, X-Job-UUID and
X-Job-Success headers, 15 tries 2 s apart), and only where the operator allows.

The caller chooses the URL, so two checks: its host must be in `api.webhook_hosts` (at submit),
and the address it resolves to when connecting must be one of theirs: an allowed address, or an
address an allowed name had when the agent started (pinned then). A DNS answer that changed
since, or a name that points elsewhere, is refused at connect time. Redirects are never
followed: a 3xx counts as a failed try.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from cbt_agent.store import ApiJob

log = logging.getLogger(__name__)

TRIES = 15
INTERVAL = 2.0
MAX_URL = 2048  # a longer X-Web-Hook is refused at submit
LOGGED_URL = 120  # how much of a URL a log line shows

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def shown(url: str) -> str:
    return url if len(url) <= LOGGED_URL else url[:LOGGED_URL] + "…"


async def pinned_addresses(hosts: Iterable[str]) -> frozenset[IpAddress]:
    """The addresses webhooks may reach: each allowed address, and what each allowed name
    resolves to now."""
    out: set[IpAddress] = set()
    loop = asyncio.get_running_loop()
    for host in hosts:
        try:
            out.add(ipaddress.ip_address(host.strip("[]")))
            continue
        except ValueError:
            pass
        try:
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError as e:
            log.warning(
                "api.webhook_hosts: %s does not resolve (%s): no webhook reaches it", host, e
            )
            continue
        out.update(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos)
    return frozenset(out)


class AllowListResolver(AbstractResolver):
    """Resolves as usual, then keeps only the allowed addresses; none left: an OSError."""

    def __init__(self, allowed: frozenset[IpAddress]) -> None:
        self.allowed = allowed
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        kept = [r for r in results if ipaddress.ip_address(r["host"]) in self.allowed]
        if not kept:
            found = ", ".join(sorted({r["host"] for r in results}))
            raise OSError(f"webhook host {host} resolves to {found}: not an allowed address")
        return kept

    async def close(self) -> None:
        await self._inner.close()


def session(allowed: frozenset[IpAddress]) -> ClientSession:
    return ClientSession(connector=TCPConnector(resolver=AllowListResolver(allowed)))


async def deliver(
    http: ClientSession,
    job: ApiJob,
    reply: tuple[int, dict[str, Any]],
    outcome: Callable[[str], None] = lambda _o: None,
) -> None:
    """POST a finished job's reply to its X-Web-Hook. `outcome` hears "delivered", "retried"
    for each failed try, "gave_up"."""
    assert job.webhook is not None
    status, body = reply
    url = shown(job.webhook)
    headers = {"X-Job-UUID": job.uuid, "X-Job-Success": "true" if status == 200 else "false"}
    for attempt in range(1, TRIES + 1):
        try:
            async with http.post(
                job.webhook,
                json=body,
                headers=headers,
                timeout=ClientTimeout(10),
                allow_redirects=False,
            ) as r:
                if r.status < 300:
                    outcome("delivered")
                    return
                log.warning("webhook %s for job %s answered %d", url, job.uuid, r.status)
        except (ClientError, TimeoutError, OSError) as e:
            log.warning("webhook %s for job %s: %s (try %d)", url, job.uuid, e, attempt)
        outcome("retried")
        await asyncio.sleep(INTERVAL)
    outcome("gave_up")
    log.error("webhook %s for job %s: giving up; the result stays pollable", url, job.uuid)
