"""The HTTP API under load: QueryCbtTask and api-job polling against the same server's /healthz.

A real `cbt-agent serve` process on loopback (its own config, state dir and SQLite file, the
host's libvirtd), loaded with `wrk` (64 connections, 2 threads) for a few seconds per run:

- LIMIT `GET /healthz`: the same server, no auth, a constant body: what this aiohttp process
  answers at best (routing, middlewares, a small JSON reply);
- `GET /zstack/v1/cbt-task?limit=100` (QueryCbtTask, a page of 100 inventories with ZStack's
  schema map) with the SDK's headers (`Authorization: OAuth`, `X-JSON-Schema`);
- `GET /zstack/v1/api-jobs/<uuid>` of a finished CreateCbtTask job (its inventory, with schema).

Tasks are written before the agent starts, through the store's own `create_task` (exactly what
CreateCbtTask writes: the task, its VM and volume refs, its first transition); their VMs do not
exist, so the agent's reconcile marks them Failed (released) at its first start, as it would on
a host that lost them. The finished job is written the same way (`create_job` + `finish_job`
with the inventory reply a Create returns).

Run at 1, 1,000 and 10,000 tasks (the agent restarted on the same database in between); the
three endpoints alternate for 3 rounds (10 s runs at 10,000 tasks, 5 s before) and medians are
compared.
At 10,000 tasks, for information: the query asking a different page each time
(`start` random), which the reply kept for a repeated query does not serve.
Allowed at 10,000 tasks: query >= 0.5x /healthz with p99 < 20 ms; job poll >= 0.7x /healthz.

Run: .venv/bin/python -m bench.bench_api   [--duration 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.agentproc import AgentProcess
from bench.stats import run_guarded
from cbt_agent.api import replies
from cbt_agent.engine.results import TaskView
from cbt_agent.model import new_uuid
from cbt_agent.store import SyncStore

TASKS = (1, 1_000, 10_000)
QUERY_RATIO = 0.5
JOB_RATIO = 0.7
QUERY_P99_MS = 20.0
CONNECTIONS = 64
THREADS = 2
TOKEN = "bench-api-token-0123456789abcdef"
NBD_PORTS = "13100:13199"
AGENT_START = 120.0  # seconds for /healthz: at 10,000 tasks the agent takes ~40 s to come up
TIME_BUDGET = 540.0  # seconds: the whole benchmark, populating and agent starts included

# wrk's summary in one parseable line (latencies in microseconds)
WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status,
    e.connect + e.read + e.write + e.timeout))
end
"""
# every request another page of 100 (the reply kept for a repeated query does not serve it)
WRK_PAGES = """
request = function()
  return wrk.format(nil, "/zstack/v1/cbt-task?limit=100&start=" .. math.random(0, 9900))
end
"""
_WRK_LINE = re.compile(r"^WRK (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)$", re.MULTILINE)


@dataclass(frozen=True)
class Load:
    """One wrk run: requests per second, p50 and p99 latency, and the requests that failed
    (socket errors and timeouts: wrk gives up on a request after 5 s)."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int = 0


def populate(db: Path, total: int) -> str | None:
    """Bring the database to `total` tasks with the store's own writes (what CreateCbtTask
    writes); with no finished job yet, also write one: a CreateCbtTask job that returned the
    first task's inventory. Returns that job's uuid (None: it was written before)."""
    s = SyncStore(db)
    try:
        have = len(s.list_tasks())
        s.db.execute("BEGIN IMMEDIATE")  # one transaction: 10,000 commits would take a minute
        for i in range(have, total):
            s.create_task(new_uuid(), f"bench-{i:05d}", f"task {i}", new_uuid(), [new_uuid()])
        s.db.execute("COMMIT")
        if s.db.execute("SELECT COUNT(*) FROM api_jobs").fetchone()[0]:
            return None
        first = s.list_tasks()[0]
        job = new_uuid()
        s.create_job(job, "CreateCbtTask", first.uuid, want_schema=True)
        result = replies.inventory_reply(TaskView(first, s.resource_refs(first.uuid)))
        s.finish_job(job, result=result)
        return job
    finally:
        s.close()


async def wrk(url: str, seconds: float, script: Path, auth: bool) -> Load:
    args = ["wrk", "-t", str(THREADS), "-c", str(CONNECTIONS), "-d", f"{seconds:g}s"]
    args += ["-s", str(script), "--timeout", "5s"]
    if auth:
        args += ["-H", f"Authorization: OAuth {TOKEN}", "-H", "X-JSON-Schema: true"]
    proc = await asyncio.create_subprocess_exec(
        *args, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
    text = out.decode(errors="replace")
    m = _WRK_LINE.search(text)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}")
    requests, duration_us, p50, p99, non2xx, errors = (int(g) for g in m.groups())
    if non2xx:  # a wrong answer is no figure: stop here
        raise RuntimeError(f"{url}: {non2xx} replies not 2xx:\n{text}")
    return Load(requests / (duration_us / 1e6), p50 / 1000, p99 / 1000, errors)


async def _check_replies(query_url: str, job_url: str, page: int) -> None:
    """What wrk will load is what it claims: a full page of inventories, a finished job."""
    headers = {"Authorization": f"OAuth {TOKEN}", "X-JSON-Schema": "true"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(query_url) as r:
            raw = await r.read()
            got = len(json.loads(raw)["inventories"]) if r.status == 200 else None
            if got != page:
                raise RuntimeError(f"the query answered {r.status} with {got} inventories")
        async with http.get(job_url) as j:
            job = await j.read()
            if j.status != 200 or "inventory" not in json.loads(job):
                raise RuntimeError(f"the job poll answered {j.status}: {job[:200]!r}")
    print(f"  replies: query {len(raw):,} bytes ({page} inventories), job {len(job):,} bytes")


def _median(runs: list[Load]) -> Load:
    return Load(
        statistics.median(r.rps for r in runs),
        statistics.median(r.p50_ms for r in runs),
        statistics.median(r.p99_ms for r in runs),
        sum(r.errors for r in runs),
    )


def _row(label: str, runs: list[Load]) -> str:
    rps = statistics.median(r.rps for r in runs)
    p99 = statistics.median(r.p99_ms for r in runs)
    p50 = statistics.median(r.p50_ms for r in runs)
    n = f"n={len(runs)}"
    errors = sum(r.errors for r in runs)
    failed = f"   {errors} requests failed or timed out" if errors else ""
    return f"  {label:<44} {n:<5} {rps:9.0f} req/s   p50 {p50:6.2f} ms   p99 {p99:6.2f} ms{failed}"


def _ratio(label: str, runs: list[Load], limit: list[Load], allowed: float) -> bool:
    ratio = statistics.median(r.rps for r in runs) / statistics.median(r.rps for r in limit)
    ok = ratio >= allowed and not any(r.errors for r in runs)
    print(
        f"  RATIO {label}: {ratio:.2f}x  limit >= {allowed:.1f}x  -> {'PASS' if ok else 'FAIL'}",
        flush=True,
    )
    return ok


async def run(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        print("bench_api: wrk is not installed (apt-get install wrk; scripts/setup.sh does)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="cbtba-"))
    script = work / "summary.lua"
    script.write_text(WRK_SCRIPT)
    (work / "pages.lua").write_text(WRK_PAGES + WRK_SCRIPT)
    agent = AgentProcess(work, TOKEN, NBD_PORTS)
    try:
        async with asyncio.timeout(TIME_BUDGET):
            return await _measure(agent, work, script, args)
    finally:
        await agent.stop()
        shutil.rmtree(work, ignore_errors=True)


async def _measure(agent: AgentProcess, work: Path, script: Path, args: argparse.Namespace) -> int:
    seconds, short = args.duration, max(2.0, args.duration / 2)
    job: str | None = None
    growth: dict[int, tuple[Load, Load]] = {}
    status = 0
    print(
        f"== QueryCbtTask (limit 100) and api-job polling vs /healthz: wrk {CONNECTIONS} "
        f"connections, {THREADS} threads ==",
        flush=True,
    )
    for total in TASKS:
        t0 = time.monotonic()
        job = await asyncio.to_thread(populate, agent.db, total) or job
        assert job is not None
        filled = time.monotonic() - t0
        up = await agent.start(AGENT_START)
        print(f"{total:,} tasks (written in {filled:.1f} s; agent up in {up:.1f} s)", flush=True)
        urls = {
            "health": (f"{agent.base}/healthz", False),
            "query": (f"{agent.base}/zstack/v1/cbt-task?limit=100", True),
            "job": (f"{agent.base}/zstack/v1/api-jobs/{job}", True),
        }
        await _check_replies(urls["query"][0], urls["job"][0], min(total, 100))
        # one short unmeasured pass of each: connections made, the agent's first answers built
        for url, auth in urls.values():
            await wrk(url, 1, script, auth)
        rounds = args.rounds
        length = seconds if total == TASKS[-1] else short
        runs: dict[str, list[Load]] = {k: [] for k in urls}
        for r in range(rounds):
            order = list(urls) if r % 2 == 0 else list(reversed(urls))
            for name in order:
                url, auth = urls[name]
                runs[name].append(await wrk(url, length, script, auth))
        print(_row("LIMIT GET /healthz", runs["health"]))
        print(_row("GET /cbt-task?limit=100", runs["query"]))
        print(_row("GET /api-jobs/<uuid> (finished)", runs["job"]))
        growth[total] = (_median(runs["health"]), _median(runs["query"]))
        query_ok = _ratio("query / healthz", runs["query"], runs["health"], QUERY_RATIO)
        p99 = statistics.median(r.p99_ms for r in runs["query"])
        job_ok = _ratio("job poll / healthz", runs["job"], runs["health"], JOB_RATIO)
        p99_ok = p99 < QUERY_P99_MS and all(r.rps > 0 and not r.errors for r in runs["query"])
        print(
            f"  query p99 {p99:.2f} ms  limit < {QUERY_P99_MS:.0f} ms  -> "
            f"{'PASS' if p99_ok else 'FAIL'}",
            flush=True,
        )
        if total == TASKS[-1]:
            status = 0 if query_ok and job_ok and p99_ok else 1
            pages = [
                await wrk(urls["query"][0], length, work / "pages.lua", True) for _ in range(rounds)
            ]
            print(_row("GET /cbt-task?limit=100&start=<random>", pages))
            print(
                f"  (information: a different page each time, sliced and joined: "
                f"{statistics.median(p.rps for p in pages) / _median(runs['health']).rps:.2f}x "
                "healthz)"
            )
        else:
            print("  (information: the goal applies at 10,000 tasks)")
        await agent.stop()
    print("query rate as tasks grow (medians):")
    first = growth[TASKS[0]][1].rps
    for total, (health, query) in growth.items():
        print(
            f"  {total:>6,} tasks  query {query.rps:7.0f} req/s  p99 {query.p99_ms:6.2f} ms  "
            f"{query.rps / health.rps:.2f}x healthz  {query.rps / first:.2f}x the 1-task rate"
        )
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds at each size")
    args = parser.parse_args()
    run_guarded("bench_api", lambda: run(args))


if __name__ == "__main__":
    main()
