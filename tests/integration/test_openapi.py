"""The OpenAPI document against the real app: it is valid OpenAPI 3.1, it documents every route
app.py registers, real replies conform to it, and schemathesis fuzzing of every operation finds
no server error and no reply outside the document.

The app is served on a loopback port (aiohttp AppRunner + TCPSite in the test's event loop);
schemathesis' blocking client runs in a worker thread meanwhile. Every 202 is followed to its
job, whose final reply is checked too. ZStack's error convention is 503 `{"error": ErrorCode}`,
so 503 counts as documented, but never with SYS.1000 (an internal error) for generated input.
Set CBT_FUZZ_SEED to replay a run (the seed is printed; `pytest -s` shows it).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import hypothesis
import pytest
import requests
import schemathesis
import stack
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, Phase
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_openapi
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from cbt_agent.api.app import make_app
from cbt_agent.api.openapi import openapi_document
from cbt_agent.config import Config, parse_config

pytestmark = pytest.mark.stack

TOKEN = "tok-openapi-0123456789abcdef"
P = "/zstack/v1"
ROOT_ROUTES = ("/healthz", "/metrics")
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
MAX_EXAMPLES = int(os.environ.get("CBT_FUZZ_EXAMPLES") or 30)  # per operation and mode
AUTH_EXAMPLES = 5  # per operation and Authorization variant
JOB_WAIT = 15.0  # seconds a job may take to finish
FUZZ_BUDGET = 90.0 * max(1, MAX_EXAMPLES / 30)  # seconds for a whole fuzzing test
JOB = f"{P}/api-jobs/{{uuid}}"
TASK = f"{P}/cbt-task/{{uuid}}"
AREAS = f"{P}/cbt-task/{{uuid}}/volumes/{{volumeUuid}}/changed-areas"


def _config(tmp_path: Path, qmp_socket_template: str) -> Config:
    return parse_config(
        {
            "api": {"tokens": [TOKEN]},
            "state": {"dir": str(tmp_path / "state")},
            "libvirt": {"uri": stack.LIBVIRT_URI},
            "qmp": {"socket_template": qmp_socket_template},
            "nbd": {"listen": "127.0.0.1", "port_range": "12500:12599"},
        }
    )


@pytest.fixture
async def client(tmp_path: Path, qmp_socket_template: str) -> AsyncIterator[TestClient[Any, Any]]:
    c: TestClient[Any, Any] = TestClient(
        TestServer(make_app(_config(tmp_path, qmp_socket_template)))
    )
    await c.start_server()
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def served(
    tmp_path: Path, qmp_socket_template: str, vm_factory: Callable[..., stack.TestVm]
) -> AsyncIterator[str]:
    """The real app on a free loopback port; yields its base URL. Stopped before the test's
    VMs go (it depends on vm_factory)."""
    runner = web.AppRunner(make_app(_config(tmp_path, qmp_socket_template)))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def _documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method in METHODS
    }


def _registered(app: web.Application, prefix: str) -> set[tuple[str, str]]:
    """(method, path template) of every route under `prefix` and of the root routes; the HEAD
    aiohttp adds beside each GET is covered by the GET."""
    routes = set()
    for resource in app.router.resources():
        path = resource.canonical
        if path.startswith(f"{prefix}/") or path in ROOT_ROUTES:
            routes |= {(route.method.upper(), path) for route in resource}
    return {(m, p) for m, p in routes if m != "HEAD" or ("GET", p) not in routes}


# ---- 1. the document -------------------------------------------------------------------------


async def test_served_document_is_valid_openapi(client: TestClient[Any, Any]) -> None:
    for prefix in (P, "/v1"):
        r = await client.get(f"{prefix}/openapi.json")  # no Authorization: none needed
        assert r.status == 200, await r.text()
        assert r.content_type == "application/json"
        doc = await r.json()
        assert doc == openapi_document(prefix)
        assert doc["openapi"] == "3.1.0"
        validate_openapi(doc)


async def test_document_lists_every_route(client: TestClient[Any, Any]) -> None:
    app = client.server.app
    assert app is not None
    for prefix in (P, "/v1"):
        r = await client.get(f"{prefix}/openapi.json")
        documented = _documented(await r.json())
        registered = _registered(app, prefix)
        assert ("POST", f"{prefix}/cbt-task/create") in registered
        assert registered - documented == set(), "routes without documentation"
        assert documented - registered == set(), "documented routes that do not exist"
    # every /v1 route mirrors a /zstack/v1 one
    twins = {
        (m, p if p in ROOT_ROUTES else p.removeprefix("/zstack")) for m, p in _registered(app, P)
    }
    assert _registered(app, "/v1") == twins


def test_document_is_pure() -> None:
    a, b = openapi_document(), openapi_document()
    assert a == b and a is not b
    a["paths"].clear()
    assert openapi_document()["paths"], "a new document each call"
    assert json.loads(json.dumps(b)) == b
    for prefix in (P, "/v1"):
        paths = openapi_document(prefix)["paths"]
        assert all(p.startswith(f"{prefix}/") or p in ROOT_ROUTES for p in paths)


# ---- the harness -----------------------------------------------------------------------------


def _json(response: Any) -> Any:
    try:
        return response.json()
    except Exception:
        return None


def _error_code(response: Any) -> dict[str, Any] | None:
    body = _json(response)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"]
    return None


@dataclass
class Harness:
    """Schemathesis against the served app: calls cases, validates the replies against the
    document, follows jobs, and collects every failure as text (nothing raises inside a
    hypothesis test, so hypothesis never shrinks)."""

    base_url: str
    doc: dict[str, Any]
    schema: Any
    seed: int
    failures: list[str] = field(default_factory=list)
    cases: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    session: requests.Session = field(default_factory=requests.Session)

    @classmethod
    def connect(cls, base_url: str, seed: int) -> Harness:
        """Loads the document as served (from_url would leave out the operation that serves
        the schema itself, so: fetch it, then from_dict)."""
        served = requests.get(f"{base_url}{P}/openapi.json", timeout=10)
        served.raise_for_status()
        doc = served.json()
        config = schemathesis.Config.from_dict(
            {"checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}}}
        )
        return cls(base_url, doc, schemathesis.openapi.from_dict(doc, config=config), seed)

    auth = {"Authorization": f"OAuth {TOKEN}"}

    def operation(self, path: str, method: str) -> Any:
        return self.schema[path][method.upper()]

    def operations(self) -> list[Any]:
        return [result.ok() for result in self.schema.get_all_operations()]

    def needs_auth(self, operation: Any) -> bool:
        op = self.doc["paths"][operation.path][operation.method.lower()]
        return bool(op.get("security", self.doc["security"]))

    def fail(self, what: str, case: Any, response: Any, headers: dict[str, str] | None) -> None:
        if "Reproduce with" not in what:
            try:
                what += "\n  " + case.as_curl_command(headers=headers, base_url=self.base_url)
            except Exception as e:
                what += f"\n  (no curl: {e!r})"
            if response is not None:
                body = response.content[:1000].decode(errors="replace")
                what += f"\n  -> {response.status_code} {body}"
        self.failures.append(f"{case.operation.label}: {what}")

    def check(self, case: Any, response: Any, headers: dict[str, str] | None) -> None:
        """The schemathesis checks, plus: never ZStack's internal error."""
        self.cases += 1
        self.statuses[f"{case.operation.label} {response.status_code}"] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (FailureGroup, AssertionError) as e:
            self.fail(str(e), case, response, headers)
        error = _error_code(response)
        if error is not None and error.get("code") == "SYS.1000":
            self.fail("internal error (SYS.1000)", case, response, headers)

    def send(self, case: Any, headers: dict[str, str] | None) -> Any:
        """Call and check one case; the response, or None if the request itself failed."""
        try:
            response = case.call(
                base_url=self.base_url, session=self.session, headers=headers, timeout=15
            )
        except Exception as e:
            self.fail(f"request failed: {e!r}", case, None, headers)
            return None
        self.check(case, response, headers)
        return response

    def follow(self, case: Any, response: Any) -> Any:
        """After a 202 {location}: poll the job (as the documented GetApiJob) to its end."""
        location = (_json(response) or {}).get("location")
        path = urlsplit(location).path if isinstance(location, str) else ""
        if not path.startswith(f"{P}/api-jobs/"):
            self.fail(f"location {location!r} is not a job of {P}", case, response, None)
            return None
        job_case = self.operation(JOB, "GET").Case(path_parameters={"uuid": path.rsplit("/", 1)[1]})
        deadline = time.monotonic() + JOB_WAIT
        while True:
            reply = self.send(job_case, self.auth)
            if reply is None or reply.status_code != 202:
                break
            if time.monotonic() > deadline:
                self.fail(f"job still running after {JOB_WAIT} s", case, reply, None)
                return None
            time.sleep(0.02)
        if reply is not None and reply.status_code not in (200, 503):
            self.fail("a job ended neither 200 nor 503", case, reply, None)
        return reply

    def run(self, case: Any, headers: dict[str, str] | None) -> Any:
        """Send a case; for a job its final reply."""
        response = self.send(case, headers)
        if response is not None and response.status_code == 202 and case.operation.path != JOB:
            return self.follow(case, response)
        return response

    def explore(
        self,
        operation: Any,
        step: Callable[[Any], None],
        *,
        mode: Any = schemathesis.GenerationMode.POSITIVE,
        examples: int = MAX_EXAMPLES,
        **fixed: Any,
    ) -> None:
        """`step` on up to `examples` generated cases of `operation` (`fixed`: as_strategy's
        path_parameters, query, headers, body)."""

        @hypothesis.seed(self.seed)
        @hypothesis.settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            print_blob=False,
        )
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode, **fixed))
        def each(case: Any) -> None:
            step(case)

        each()

    def conforms(self, value: Any, component: str) -> None:
        """`value` against one of the document's component schemas."""
        schema = {"$ref": f"#/components/schemas/{component}", "components": self.doc["components"]}
        errors = [e.message for e in OAS31Validator(schema).iter_errors(value)]
        if errors:
            self.failures.append(f"{component}: {errors[:5]} in {json.dumps(value)[:2000]}")

    def report(self, seed_note: str) -> str:
        return f"{len(self.failures)} failures ({seed_note}):\n\n" + "\n\n".join(self.failures[:40])


def _has_inputs(operation: Any) -> bool:
    return any(True for _ in operation.iter_parameters()) or bool(list(operation.body))


def _seed() -> int:
    return int(os.environ.get("CBT_FUZZ_SEED") or random.randrange(1 << 32))


def _print_stats(h: Harness, elapsed: float) -> None:
    print(f"\n{h.cases} requests in {elapsed:.1f} s (CBT_FUZZ_SEED={h.seed})")
    for key, n in sorted(h.statuses.items()):
        print(f"  {n:5d}  {key}")


# ---- 2. fuzzing every operation --------------------------------------------------------------


def fuzz(h: Harness) -> None:
    """Every operation: positive and negative generation with a valid token; then a few cases
    with a wrong token, another scheme, an empty token and no Authorization at all."""
    operations = h.operations()
    assert {tuple(o.label.split(" ", 1)) for o in operations} == _documented(h.doc)

    for operation in operations:
        h.explore(operation, lambda case: h.run(case, h.auth))
        if _has_inputs(operation):
            mode = schemathesis.GenerationMode.NEGATIVE
            h.explore(operation, lambda case: h.run(case, h.auth), mode=mode)

    variants: list[tuple[dict[str, str], int, str | None]] = [
        ({"Authorization": "OAuth not-a-known-token"}, 503, "ID.1001"),
        ({"Authorization": f"Bearer {TOKEN}"}, 400, None),
        ({"Authorization": "OAuth "}, 400, None),
        ({}, 400, None),
    ]
    for operation in operations:
        for headers, status, code in variants:

            def step(
                case: Any,
                headers: dict[str, str] = headers,
                status: int = status,
                code: str | None = code,
            ) -> None:
                if case.headers:
                    case.headers.pop("Authorization", None)  # a generated one
                response = h.run(case, headers)
                if response is None or not h.needs_auth(case.operation):
                    return
                got = (_error_code(response) or {}).get("code")
                if (response.status_code, got) != (status, code):
                    h.fail(
                        f"with {headers or 'no Authorization'}: expected {status} {code}",
                        case,
                        response,
                        headers,
                    )

            h.explore(operation, step, examples=AUTH_EXAMPLES)


def edge_cases(h: Harness) -> None:
    """What generation hardly reaches: bodies that are not JSON objects, a body past the size
    limit, extreme numbers, route corners. Each reply is checked against the document."""
    create = h.operation(f"{P}/cbt-task/create", "POST")
    url = f"{h.base_url}{P}/cbt-task/create"
    json_type = {"Content-Type": "application/json"}
    raw_bodies = [
        b"[" * 100_000 + b"]" * 100_000,  # deeper than any JSON decoder recurses
        b'{"params": ' * 5000 + b"{}" + b"}" * 5000,
        b"\xff\xfe not utf-8",
        b"null",
        b"[1, 2]",
        b'"params"',
        b"1e999",
        b"{",
        b" \n ",
        b'{"params": {"name": "x", "vmInstanceUuid": "' + b"a" * 32 + b'"}, "systemTags": {}}',
        b"x" * (2 << 20),  # past api.max_body_bytes: 413
    ]
    for body in raw_bodies:
        r = h.session.post(url, data=body, headers={**h.auth, **json_type}, timeout=15)
        case = create.Case(body={})
        h.check(case, r, h.auth)
        if r.status_code == 202:
            h.follow(case, r)
    r = h.session.post(url, data=b"x" * (2 << 20), headers={**h.auth, **json_type}, timeout=15)
    if r.status_code != 413:
        h.fail("a body past the limit is not a 413", create.Case(body={}), r, h.auth)

    query = h.operation(f"{P}/cbt-task", "GET")
    for q in [
        "createDate>0001-01-02T00:00:00+01:00",
        "createDate<9999-12-30T23:59:59-01:00",
        "createDate=Feb 30, 2026 1:00:00 AM",
        "lastOpDate?=Nov 7, 2026 9:05:03 PM,Nov 7, 2026 9:05:03",
        "resourceRefs.id>99999999999999999999999999",
        "name~=%\u0000%",
        "uuid?=",
        "is null",
        "description is null",
        "description not null",
    ]:
        h.run(query.Case(query={"q": [q]}), h.auth)
    for params in [
        {"limit": "99999999999999999999999999", "start": "99999999999999999999999999"},
        {"limit": "-1"},
        {"sort": "+"},
        {"fields": ",,,"},
        {"count": "TRUE", "replyWithCount": "yes"},
    ]:
        h.run(query.Case(query=params), h.auth)

    areas = h.operation(AREAS, "GET")
    ids = {"uuid": "a" * 32, "volumeUuid": "b" * 32}
    huge = str(1 << 70)
    h.run(
        areas.Case(path_parameters=ids, query={"startOffset": huge, "length": huge, "limit": huge}),
        h.auth,
    )

    # route corners: "create", "exportvolume", "unexportvolume" are no task uuids (405); the job
    # route only knows 32-hex uuids
    task = h.operation(TASK, "GET")
    for name in ("create", "exportvolume", "unexportvolume"):
        for method in ("GET", "DELETE"):
            h.run(task.Case(method=method, path_parameters={"uuid": name}), h.auth)
    job = h.operation(JOB, "GET")
    for uuid in ("0" * 32, "Z" * 32, "x" * 500):
        h.run(job.Case(path_parameters={"uuid": uuid}), h.auth)
    # a repeated X-Job-UUID: 400, plain text
    delete = h.operation(TASK, "DELETE")
    for _ in range(2):
        h.run(
            delete.Case(path_parameters={"uuid": "c" * 32}, headers={"X-Job-UUID": "d" * 32}),
            h.auth,
        )


async def test_schemathesis_fuzz(served: str) -> None:
    started = time.monotonic()
    h = await asyncio.to_thread(Harness.connect, served, _seed())
    await asyncio.to_thread(fuzz, h)
    await asyncio.to_thread(edge_cases, h)
    elapsed = time.monotonic() - started
    _print_stats(h, elapsed)
    assert h.cases >= len(h.operations()) * MAX_EXAMPLES
    assert not h.failures, h.report(f"CBT_FUZZ_SEED={h.seed}")
    assert elapsed < FUZZ_BUDGET


# Dates at the very ends of datetime's range once made parse_date raise OverflowError (an
# internal error, SYS.1000): they must be refused as SYS.1007 naming the field.
@pytest.mark.parametrize(
    "q",
    [
        "createDate>0001-01-01T00:00:00+01:00",
        "createDate<9999-12-31T23:59:59-01:00",
        "lastOpDate?=Jan 1, 0001 12:00:00 AM,Dec 31, 9999 11:59:59 PM",
    ],
)
async def test_extreme_dates_are_invalid_argument(client: TestClient[Any, Any], q: str) -> None:
    r = await client.get(
        f"{P}/cbt-task", params={"q": q}, headers={"Authorization": f"OAuth {TOKEN}"}
    )
    body = await r.json()
    assert (r.status, body["error"]["code"]) == (503, "SYS.1007"), body


# ---- 3. real replies of a real task ----------------------------------------------------------


def lifecycle(h: Harness, vm: stack.TestVm) -> None:
    """Create, Enable (full), changed areas, queries, Disable, a write, Enable (incremental),
    Disable, Delete: every reply checked against the document and its result against the
    component schema of its API; then fuzzing of the reads with the real uuids."""
    volume = vm.volumes[0].volume_uuid
    schema_header = {**h.auth, "X-JSON-Schema": "true"}

    def job(path: str, method: str, component: str, **kw: Any) -> dict[str, Any]:
        reply = h.run(h.operation(path, method).Case(**kw), schema_header)
        assert reply is not None and reply.status_code == 200, (reply and reply.text, h.failures)
        body: dict[str, Any] = reply.json()
        h.conforms(body, component)
        return body

    create = job(
        f"{P}/cbt-task/create",
        "POST",
        "InventoryReply",
        body={"params": {"name": "openapi", "vmInstanceUuid": vm.vm_uuid}, "systemTags": []},
    )
    task = create["inventory"]["uuid"]
    uuid = {"uuid": task}
    enable = f"{P}/cbt-task/enable/{{uuid}}"
    disable = f"{P}/cbt-task/disable/{{uuid}}"
    full = job(enable, "POST", "EnableCbtTaskReply", path_parameters=uuid, body={"params": {}})
    (info,) = full["volumeCbtBackupInfos"]
    assert info["mode"] == "full" and info["sinceBitmapName"] is None

    ids = {"uuid": task, "volumeUuid": volume}
    areas = h.run(h.operation(AREAS, "GET").Case(path_parameters=ids), h.auth)
    assert areas is not None and areas.status_code == 200, areas and areas.text
    reads: list[tuple[str, dict[str, Any]]] = [
        (f"{P}/cbt-task", {}),
        (TASK, {"path_parameters": uuid}),
        (AREAS, {"path_parameters": ids}),
    ]
    for path, fixed in reads:  # fuzz the reads while the task is Running and exported
        h.explore(h.operation(path, "GET"), lambda case: h.run(case, h.auth), **fixed)
        h.explore(
            h.operation(path, "GET"),
            lambda case: h.run(case, h.auth),
            mode=schemathesis.GenerationMode.NEGATIVE,
            **fixed,
        )
    job(disable, "POST", "InventoryReply", path_parameters=uuid, body={"params": {"force": False}})

    vm.write_sync(volume, 1 << 20, 65536)
    incremental = job(
        enable,
        "POST",
        "EnableCbtTaskReply",
        path_parameters=uuid,
        body={"params": {"bitmapName": info["bitmapName"]}},
    )
    (info2,) = incremental["volumeCbtBackupInfos"]
    assert info2["mode"] == "incremental" and info2["sinceBitmapName"] == info["bitmapName"]
    assert incremental["schema"]["volumeCbtBackupInfos[0]"].endswith("VolumeCbtBackupInfo")
    h.run(h.operation(AREAS, "GET").Case(path_parameters=ids, query={"limit": 1}), h.auth)
    for query in [{}, {"replyWithCount": True}, {"count": True}, {"fields": "uuid,status"}]:
        h.run(h.operation(f"{P}/cbt-task", "GET").Case(query=query), h.auth)
    h.run(h.operation("/metrics", "GET").Case(), h.auth)
    job(disable, "POST", "InventoryReply", path_parameters=uuid, body={"params": {"force": True}})
    job(TASK, "DELETE", "ApiJobResult", path_parameters=uuid, query={"deleteMode": "Enforcing"})


async def test_real_replies_conform(served: str, vm_factory: Callable[..., stack.TestVm]) -> None:
    started = time.monotonic()
    vm = vm_factory([16])
    h = await asyncio.to_thread(Harness.connect, served, _seed())
    await asyncio.to_thread(lifecycle, h, vm)
    elapsed = time.monotonic() - started
    _print_stats(h, elapsed)
    assert not h.failures, h.report(f"CBT_FUZZ_SEED={h.seed}")
    assert elapsed < FUZZ_BUDGET
