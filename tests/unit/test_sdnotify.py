"""systemd's notify protocol, heard on a datagram socket the test opens as NOTIFY_SOCKET: no
systemd needed. And the unit file, checked by systemd's own tools."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import stack

from cbt_agent.cli import status_line
from cbt_agent.sdnotify import Notifier

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "cbt-agent.service"


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(2)
    yield str(path), sock
    sock.close()


def messages(sock: socket.socket) -> list[str]:
    out: list[str] = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2)
    return out


def test_from_env_takes_and_removes_systemds_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier.from_env()
    assert (n.address, n.watchdog_usec) == ("/run/systemd/notify", 30_000_000)
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        assert name not in os.environ  # children (qemu-img, qemu-nbd) never see them

    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")  # another process's watchdog
    assert Notifier.from_env().watchdog_usec is None
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    assert Notifier.from_env().watchdog_usec is None
    n = Notifier.from_env()  # nothing set: outside systemd
    assert not n.enabled
    n.ready("x")  # does nothing, raises nothing


def test_ready_status_stopping(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    n = Notifier(path, None)
    n.ready("0 tasks, 0 exports open")
    assert sock.recv(4096).decode().split("\n") == [
        "READY=1",
        "STATUS=0 tasks, 0 exports open",
        f"MAINPID={os.getpid()}",
    ]
    n.status("1 task (1 Running), 1 export open")
    assert sock.recv(4096).decode() == "STATUS=1 task (1 Running), 1 export open"
    n.stopping()
    assert sock.recv(4096).decode() == ("STOPPING=1\nSTATUS=stopping: finishing running operations")
    n.close()


def test_abstract_socket() -> None:
    name = f"cbt-agent-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        Notifier("@" + name, None).ready("ok")
        assert sock.recv(4096).decode().startswith("READY=1\nSTATUS=ok\n")
    finally:
        sock.close()


def test_a_gone_socket_is_logged_once_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier(str(tmp_path / "nobody"), None)
    n.ready("x")
    n.status("y")
    assert [r.message for r in caplog.records if "cannot notify" in r.message] == [
        f"cannot notify systemd at {tmp_path / 'nobody'}: [Errno 2] No such file or directory"
    ]


async def test_watchdog_at_half_the_interval_and_status_on_change(
    listener: tuple[str, socket.socket],
) -> None:
    path, sock = listener
    n = Notifier(path, 100_000)  # WatchdogSec=0.1s: a ping every 50 ms
    states = iter(["1 task", "1 task", "2 tasks"])

    async def describe() -> str:
        return next(states, "2 tasks")

    task = asyncio.create_task(n.run(describe, status_every=0.2))
    started = time.monotonic()
    await asyncio.sleep(0.5)
    task.cancel()
    elapsed = time.monotonic() - started
    got = messages(sock)
    pings = got.count("WATCHDOG=1")
    assert elapsed / 0.05 - 3 <= pings <= elapsed / 0.05 + 2, (pings, elapsed)
    # a STATUS only when it changed
    assert [m for m in got if m.startswith("STATUS=")] == ["STATUS=1 task", "STATUS=2 tasks"]


async def test_a_blocked_loop_sends_no_ping(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    n = Notifier(path, 100_000)

    async def describe() -> str:
        return "x"

    task = asyncio.create_task(n.run(describe))
    await asyncio.sleep(0.12)
    before = messages(sock).count("WATCHDOG=1")
    time.sleep(0.4)  # noqa: ASYNC251 (the point: a blocked loop stops the pings)
    during = messages(sock).count("WATCHDOG=1")
    task.cancel()
    assert before >= 2
    assert during == 0


def test_status_line() -> None:
    assert status_line({}, 0) == "0 tasks, 0 exports open"
    assert status_line({"Running": 2, "Created": 1}, 2) == (
        "3 tasks (1 Created, 2 Running), 2 exports open"
    )
    assert status_line({"Stopped": 1}, 1) == "1 task (1 Stopped), 1 export open"


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        stack.unavailable("systemd-analyze (Debian package systemd)")
    return tool


def test_the_unit_file_verifies_and_is_confined(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    unit = tmp_path / "cbt-agent.service"
    # verify checks that ExecStart= is executable: point it at this checkout's entry point
    agent = Path(sys.executable).parent / "cbt-agent"
    unit.write_text(UNIT.read_text().replace("/opt/cbt-agent/.venv/bin/cbt-agent", str(agent)))
    verify = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert (verify.returncode, verify.stderr.strip()) == (0, ""), verify
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=30s",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "MemoryDenyWriteExecute=yes",
        "LimitNOFILE=65536",
    ):
        assert line in text.split("\n"), line
    security = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert m is not None, security
    assert float(m.group(1)) <= 3.0, security.stdout[-2000:]
    # the README quotes the figure
    readme = (UNIT.parents[1] / "README.md").read_text()
    assert f"exposure {m.group(1)}" in readme
