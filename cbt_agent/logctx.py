"""Logging the way journald reads it: one event per line, the task, VM and api-job it concerns
as `task=… vm=… job=…` fields, and, when stderr is the journal, a syslog priority prefix
(`<3>` for errors, sd-daemon(3)) instead of an own timestamp (journald stamps each line).

The fields come from context variables: whoever starts work for a task, VM or job sets them,
and every log line written within (asyncio tasks inherit them) carries them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TextIO

TASK: ContextVar[str | None] = ContextVar("cbt_task", default=None)
VM: ContextVar[str | None] = ContextVar("cbt_vm", default=None)
JOB: ContextVar[str | None] = ContextVar("cbt_job", default=None)


@contextmanager
def fields(*, task: str | None = None, vm: str | None = None) -> Iterator[None]:
    """`task=` and `vm=` on every line logged within, in a context shared with other work
    (a loop handling one event after another); restored on the way out."""
    tokens = (TASK.set(task), VM.set(vm))
    try:
        yield
    finally:
        VM.reset(tokens[1])
        TASK.reset(tokens[0])


# Python's levels as syslog priorities (sd-daemon(3)'s SD_ERR, SD_WARNING, ...)
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def priority(levelno: int) -> int:
    for level, prio in sorted(_PRIORITY.items(), reverse=True):
        if levelno >= level:
            return prio
    return 7


class ContextFields(logging.Filter):
    """Adds `record.fields`: " task=… vm=… job=…" for those set, else ""."""

    def filter(self, record: logging.LogRecord) -> bool:
        parts = [
            f"{name}={value}"
            for name, value in (("task", TASK.get()), ("vm", VM.get()), ("job", JOB.get()))
            if value
        ]
        record.fields = (" " + " ".join(parts)) if parts else ""
        return True


class OneLine(logging.Formatter):
    """A record and its traceback on one line: newlines become " | " (journald keeps a line an
    event; a multi-line traceback would be many)."""

    def __init__(self, fmt: str, journal: bool) -> None:
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", " | ")
        return f"<{priority(record.levelno)}>{text}" if self.journal else text


def stderr_is_journal(stream: TextIO = sys.stderr) -> bool:
    """systemd sets JOURNAL_STREAM=<dev>:<inode> of the journal stream it gave the service;
    it holds only while stderr is still that stream (not redirected by a wrapper)."""
    value = os.environ.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup(level: str, *, access: bool, stream: TextIO = sys.stderr) -> logging.Handler:
    """The agent's logging: returns the handler installed on the root logger."""
    journal = stderr_is_journal(stream)
    fmt = "%(name)s: %(message)s%(fields)s"
    if not journal:
        fmt = "%(asctime)s %(levelname)s " + fmt
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFields())
    handler.setFormatter(OneLine(fmt, journal))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # one line per API request costs throughput and floods the journal: off unless asked for
    logging.getLogger("cbt_agent.access").setLevel(logging.INFO if access else logging.WARNING)
    return handler
