"""The agent as a real process: `cbt-agent serve`, `status` and `tasks` with the agent down,
and restarts (SIGTERM and SIGKILL) that keep a live export usable. Each test stops the agent it
started, by pid."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
import stack
from agentproc import TOKEN, AgentProcess, free_port, write_config

from cbt_agent.qemu import nbd as nbdio

pytestmark = pytest.mark.stack


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cbt_agent", *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
async def agent_factory(
    tmp_path: Path, qmp_socket_template: str
) -> AsyncIterator[Callable[[], AgentProcess]]:
    made: list[AgentProcess] = []
    port = free_port()
    config = tmp_path / "config.toml"
    write_config(config, port, tmp_path / "state", qmp_socket_template)

    def make() -> AgentProcess:
        agent = AgentProcess(config, port)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        await agent.close()


def test_bad_config_is_refused_with_key_and_reason(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        f'[api]\nlisten = "127.0.0.1:7090"\ntokens = ["{TOKEN}"]\n[nbd]\nport_range = "9:1"\n'
    )
    config.chmod(0o600)  # it holds a token
    result = cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "cbt-agent: invalid configuration: config nbd.port_range: '9:1' is not FIRST:LAST "
        "within 1-65535"
    )
    assert "Traceback" not in result.stderr


async def test_status_without_agent_and_restarts_keep_exports(
    vm_factory: Callable[..., stack.TestVm], agent_factory: Callable[[], AgentProcess]
) -> None:
    vm = vm_factory(disks_mib=[16])
    vol = vm.volumes[0].volume_uuid
    agent = agent_factory()
    await agent.start()
    status, body = await agent.call(
        "POST", "/cbt-task/create", {"params": {"name": "e2e", "vmInstanceUuid": vm.vm_uuid}}
    )
    assert status == 200
    task = body["inventory"]["uuid"]
    await vm.write(vol, 0, 4096, 0x77)
    status, body = await agent.call("POST", f"/cbt-task/enable/{task}", {"params": {}})
    assert status == 200
    info = body["volumeCbtBackupInfos"][0]
    assert await agent.stop(signal.SIGTERM) == 0

    # The operator's view with the agent down: straight from SQLite.
    out = cli("status", "--config", str(agent.config), "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["tasks"]
    assert [(r["uuid"], r["status"], r["checkpoints"]) for r in rows] == [(task, "Running", 1)]
    assert rows[0]["nbd"] == f"127.0.0.1:{info['nbdPort']}"
    out = cli("tasks", "--config", str(agent.config), task, "--json")
    [cp] = json.loads(out.stdout)["checkpoints"]
    assert (cp["name"], cp["handedOut"], cp["tops"]) == (
        info["bitmapName"],
        True,
        {vol: info["volume"]["installPath"]},
    )
    history = json.loads(out.stdout)["history"]
    assert [(h["from_status"], h["to_status"]) for h in history] == [
        (None, "Created"),
        ("Created", "Starting"),
        ("Starting", "Running"),
    ]
    text = cli("status", "--config", str(agent.config)).stdout
    assert task in text and "Running" in text

    # Restarted (after SIGTERM, then after SIGKILL): the export survived in QEMU and stays usable.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        await agent.start()
        async with agent.session.get(f"{agent.base}/zstack/v1/cbt-task/{task}") as r:
            assert (await r.json())["inventories"][0]["status"] == "Running"
        h = await asyncio.to_thread(
            nbdio.connect, nbdio.NbdAddress("127.0.0.1", int(info["nbdPort"]), None, vol)
        )
        assert bytes(h.pread(4096, 0)) == b"\x77" * 4096
        nbdio.close(h)
        code = await agent.stop(sig)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)

    await agent.start()
    status, body = await agent.call("POST", f"/cbt-task/disable/{task}", {"params": {}})
    assert (status, body["inventory"]["status"]) == (200, "Stopped")
    assert vm.qmp("query-block-exports") == []
    await agent.stop()


async def test_systemd_notify_ready_watchdog_stopping(
    tmp_path: Path, qmp_socket_template: str, vm_factory: Callable[..., stack.TestVm]
) -> None:
    """`cbt-agent serve` under a NOTIFY_SOCKET the test opens: READY=1 only once the API answers
    (after reconcile), a STATUS= naming what it holds, WATCHDOG=1 at half of WATCHDOG_USEC, and
    STOPPING=1 on SIGTERM before a clean exit."""
    vm = vm_factory(start=False)
    port = free_port()
    config = tmp_path / "config.toml"
    write_config(config, port, tmp_path / "state", qmp_socket_template)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    loop = asyncio.get_running_loop()
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cbt_agent", "serve", "--config", str(config),
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"OAuth {TOKEN}"}) as http:
            first = (await asyncio.wait_for(loop.sock_recv(notify, 4096), 60)).decode()
            # the first word from the agent is READY, and by then its API answers
            async with http.get(f"{base}/healthz") as r:
                assert r.status == 200
            assert first.split("\n") == [
                "READY=1",
                "STATUS=0 tasks, 0 exports open",
                f"MAINPID={proc.pid}",
            ]
            async with http.post(
                f"{base}/zstack/v1/cbt-task/create",
                json={"params": {"name": "n", "vmInstanceUuid": vm.vm_uuid}},
            ) as r:
                assert r.status == 202
            heard: list[str] = []
            started = time.monotonic()
            while time.monotonic() - started < 6:  # the status line is refreshed every 5 s
                with contextlib.suppress(TimeoutError):
                    heard.append(
                        (await asyncio.wait_for(loop.sock_recv(notify, 4096), 0.5)).decode()
                    )
                if "STATUS=1 task (1 Created), 0 exports open" in heard:
                    break
            elapsed = time.monotonic() - started
            assert "STATUS=1 task (1 Created), 0 exports open" in heard, heard
            pings = heard.count("WATCHDOG=1")
            assert elapsed / 0.2 - 3 <= pings <= elapsed / 0.2 + 2, (pings, elapsed)
        os.kill(proc.pid, signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
        assert code == 0
        rest: list[str] = []
        with contextlib.suppress(BlockingIOError):
            while True:
                rest.append(notify.recv(4096).decode())
        assert "STOPPING=1\nSTATUS=stopping: finishing running operations" in rest, rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        notify.close()
