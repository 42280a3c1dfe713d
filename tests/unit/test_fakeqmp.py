"""The fake QMP endpoint speaks QMP to the agent's own channel (qemu.qmp underneath): replies,
errors with their class, and a lost reply the agent sees as QmpInterrupted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fakeqmp import FakeQmp

from cbt_agent.errors import QmpCommandError, QmpInterrupted
from cbt_agent.qemu.qmp import SocketQmp


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeQmp]:
    f = FakeQmp(tmp_path / "qmp.sock")
    await f.start()
    yield f
    await f.close()


async def connected(fake: FakeQmp) -> SocketQmp:
    chan = SocketQmp("ff" * 16, str(fake.path))
    await chan.connect()
    return chan


async def test_a_scripted_reply_comes_back(fake: FakeQmp) -> None:
    fake.on("query-jobs", [{"id": "j", "status": "running"}])
    fake.on("block-dirty-bitmap-add", lambda args: {"seen": args["name"]})
    chan = await connected(fake)
    try:
        assert await chan.execute("query-jobs") == [{"id": "j", "status": "running"}]
        assert await chan.execute("block-dirty-bitmap-add", {"node": "n", "name": "b"}) == {
            "seen": "b"
        }
    finally:
        await chan.close()
    assert fake.received == [
        ("query-jobs", {}),
        ("block-dirty-bitmap-add", {"node": "n", "name": "b"}),
    ]


async def test_an_error_keeps_its_class_and_the_command_sent(fake: FakeQmp) -> None:
    fake.fail("blockdev-del", "Failed to find node with node-name='x'", "DeviceNotFound")
    chan = await connected(fake)
    try:
        with pytest.raises(QmpCommandError) as caught:
            await chan.execute("blockdev-del", {"node-name": "x"})
        assert caught.value.error_class == "DeviceNotFound"
        assert caught.value.command == "blockdev-del"
        assert caught.value.arguments == {"node-name": "x"}
        assert "node-name='x'" in caught.value.reply
        with pytest.raises(QmpCommandError) as unknown:
            await chan.execute("no-such-command")
        assert unknown.value.error_class == "CommandNotFound"
        fake.on("query-status", {"status": "running"})
        assert await chan.execute("query-status") == {"status": "running"}  # still connected
    finally:
        await chan.close()


@pytest.mark.parametrize("ran", [True, False])
async def test_a_lost_reply_is_an_interruption_and_a_new_connection_works(
    fake: FakeQmp, ran: bool
) -> None:
    done: list[dict[str, Any]] = []
    fake.on("transaction", lambda args: done.append(args) or {})
    fake.on("query-jobs", [])
    fake.lose_reply("transaction", ran=ran)
    chan = await connected(fake)
    with pytest.raises(QmpInterrupted):
        await chan.execute("transaction", {"actions": []})
    await chan.close()
    assert done == ([{"actions": []}] if ran else [])

    again = await connected(fake)
    try:
        assert await again.execute("query-jobs") == []
        await again.execute("transaction", {"actions": []})  # lost once only
    finally:
        await again.close()
    assert fake.connections == 2
