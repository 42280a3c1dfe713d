"""The agent as a real process: `cbt-agent serve`, `status` and `tasks` with the agent down,
and restarts (SIGTERM and SIGKILL) that keep a live export usable. Each test stops the agent it
started, by pid."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import stack
from agentproc import AgentProcess, free_port, write_config

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
        '[api]\nlisten = "127.0.0.1:7090"\ntokens = ["t"]\n[nbd]\nport_range = "9:1"\n'
    )
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
