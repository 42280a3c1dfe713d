"""Fixtures for the HTTP API tests: apps on the real stack, closed before their VMs go."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import stack
from aiohttp.test_utils import TestClient, TestServer
from apiharness import TOKENS, Api
from cbtharness import Agent

from cbt_agent.api.app import make_app
from cbt_agent.config import Config, parse_config


@pytest.fixture
def make_config(tmp_path: Path, qmp_socket_template: str) -> Callable[..., Config]:
    def make(**api: Any) -> Config:
        return parse_config(
            {
                "api": {"tokens": list(TOKENS), **api},
                "state": {"dir": str(tmp_path / "state")},
                "libvirt": {"uri": stack.LIBVIRT_URI},
                "qmp": {"socket_template": qmp_socket_template},
                "nbd": {"listen": "127.0.0.1", "port_range": "12000:12099"},
            }
        )

    return make


@pytest.fixture
async def start_api(
    vm_factory: Callable[..., stack.TestVm], make_config: Callable[..., Config]
) -> AsyncIterator[Callable[..., Awaitable[Api]]]:
    """Starts apps; each is closed at teardown, before the VMs go (it depends on vm_factory)."""
    started: list[Api] = []

    async def start(config: Config | None = None) -> Api:
        config = config or make_config()
        client: TestClient[Any, Any] = TestClient(TestServer(make_app(config)))
        await client.start_server()
        api = Api(client, config)
        started.append(api)
        return api

    yield start
    for api in reversed(started):
        await api.close()


@pytest.fixture
async def api(start_api: Callable[..., Awaitable[Api]]) -> Api:
    return await start_api()


@pytest.fixture
async def make_agent(
    tmp_path: Path, qmp_socket_template: str
) -> AsyncIterator[Callable[..., Awaitable[Agent]]]:
    """The worker on the real stack (its own state directory, this test's), closed at teardown:
    `make_agent(step=None, keep=16, ports="11400:11499")`."""
    agents: list[Agent] = []

    async def make(
        step: Callable[[str], Awaitable[None]] | None = None,
        keep: int = 16,
        ports: str = "11400:11499",
        **checkpoints: Any,
    ) -> Agent:
        config = parse_config(
            {
                "api": {"tokens": ["test-token-0123456789abcdef"]},
                "state": {"dir": str(tmp_path / "state")},
                "libvirt": {"uri": stack.LIBVIRT_URI},
                "qmp": {"socket_template": qmp_socket_template},
                "nbd": {"listen": "127.0.0.1", "port_range": ports},
                "checkpoints": {"keep": keep, **checkpoints},
            }
        )
        agent = Agent(config, step)
        await agent.open()
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        await agent.close()
