"""Logs for journald: one line per event with task=, vm=, job=; a syslog priority prefix and no
own timestamp when stderr is the journal; the access log off unless asked for."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from cbt_agent import logctx


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    access = logging.getLogger("cbt_agent.access")
    access_level = access.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    access.setLevel(access_level)


def test_fields_priority_prefix_and_one_line_under_journald(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "journal"
    with out.open("w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        logctx.setup("INFO", access=False, stream=stream)
        log = logging.getLogger("cbt_agent.engine.service")
        with logctx.fields(task="t" * 32, vm="v" * 32):
            log.warning("task changed")
        log.info("plain")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        log.debug("hidden at INFO")
        logging.getLogger("cbt_agent.access").info("GET /healthz 200")
    lines = out.read_text().splitlines()
    assert lines[0] == f"<4>cbt_agent.engine.service: task changed task={'t' * 32} vm={'v' * 32}"
    assert lines[1] == "<6>cbt_agent.engine.service: plain"
    assert lines[2].startswith("<3>cbt_agent.engine.service: failed | Traceback")
    assert lines[2].endswith("ValueError: boom")
    assert len(lines) == 3  # DEBUG and the access line are off


def test_own_timestamp_when_not_the_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # a stream stderr is not (redirected)
    stream = io.StringIO()
    logctx.setup("DEBUG", access=True, stream=stream)
    logging.getLogger("cbt_agent.access").info("GET /healthz 200")
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO cbt_agent.access: GET /healthz 200\n",
        stream.getvalue(),
    )


async def test_job_fields_follow_the_asyncio_task() -> None:
    stream = io.StringIO()
    logctx.setup("INFO", access=False, stream=stream)
    log = logging.getLogger("cbt_agent.api.jobs")

    async def job(name: str) -> None:
        logctx.JOB.set(name * 32)
        await asyncio.sleep(0)
        log.info("in %s", name)

    await asyncio.gather(job("a"), job("b"))
    log.info("outside")
    lines = [line.split(" ", 3)[3] for line in stream.getvalue().splitlines()]
    assert lines == [
        f"cbt_agent.api.jobs: in a job={'a' * 32}",
        f"cbt_agent.api.jobs: in b job={'b' * 32}",
        "cbt_agent.api.jobs: outside",
    ]


def test_priorities() -> None:
    assert [logctx.priority(level) for level in (50, 40, 30, 20, 10, 5)] == [2, 3, 4, 6, 7, 7]
