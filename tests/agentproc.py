"""The agent as a real process, shared by tests that start `cbt-agent serve` (e2e, backup):
a config writer, a free port, and AgentProcess (started and stopped by pid)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import stack

TOKEN = "e2e-token-0123456789abcdef"  # at least 16 characters, or the agent refuses it
FAULT_AGENT = Path(__file__).resolve().parent / "faultagent.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    path: Path,
    port: int,
    state: Path,
    qmp_template: str,
    port_range: str = "11700:11799",
    extra: str = "",
) -> None:
    """The agent's config file; `extra`: more TOML appended (e.g. a [checkpoints] table).
    It holds the token, so it is chmod 600 (the agent refuses inline tokens in a file others
    can read); a later write_text keeps the mode."""
    path.write_text(
        f'[api]\nlisten = "127.0.0.1:{port}"\ntokens = ["{TOKEN}"]\n'
        f'[state]\ndir = "{state}"\n[libvirt]\nuri = "{stack.LIBVIRT_URI}"\n'
        f'[qmp]\nsocket_template = "{qmp_template}"\n'
        f'[nbd]\nlisten = "127.0.0.1"\nport_range = "{port_range}"\n{extra}'
    )
    path.chmod(0o600)


class AgentProcess:
    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.base = f"http://127.0.0.1:{port}"
        self.proc: asyncio.subprocess.Process | None = None
        self.session = aiohttp.ClientSession(headers={"Authorization": f"OAuth {TOKEN}"})

    async def start(self, crash_at: str | None = None) -> None:
        """Start `cbt-agent serve`; with `crash_at` it SIGKILLs itself at that step (the
        test-side launcher tests/faultagent.py installs the step hook)."""
        serve = ["-m", "cbt_agent", "serve", "--config", str(self.config)]
        if crash_at:
            serve = [str(FAULT_AGENT), "--config", str(self.config), "--crash-at", crash_at]
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *serve,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(300):
            try:
                async with self.session.get(f"{self.base}/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert self.proc.returncode is None, "agent exited at start"
            await asyncio.sleep(0.05)
        raise AssertionError("agent did not answer /healthz")

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            os.kill(self.proc.pid, sig)
        code = await asyncio.wait_for(self.proc.wait(), 30)
        self.proc = None
        return code

    async def close(self) -> None:
        """Teardown: kill the agent if it still runs (by pid), close the HTTP session."""
        if self.proc is not None:
            await self.stop(signal.SIGKILL if self.proc.returncode is None else signal.SIGTERM)
        await self.session.close()

    async def submit(self, method: str, path: str, body: Any = None) -> str:
        """Start an asynchronous API call; returns its job location."""
        async with self.session.request(method, f"{self.base}/zstack/v1{path}", json=body) as r:
            assert r.status == 202, await r.text()
            return str((await r.json())["location"])

    async def killed_by(self, method: str, path: str, body: Any = None) -> None:
        """Send a call and wait for the agent to die of the injected SIGKILL (crash_at)."""
        assert self.proc is not None
        await self.submit(method, path, body)
        assert await asyncio.wait_for(self.proc.wait(), 60) == -signal.SIGKILL
        self.proc = None

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        location = await self.submit(method, path, body)
        while True:
            async with self.session.get(location) as r:
                if r.status != 202:
                    return r.status, await r.json()
            await asyncio.sleep(0.02)


CLI_TIMEOUT = 300.0


async def cli(*args: str) -> str:
    """`cbt-agent ARGS` as a user runs it, the agent's token in $CBT_AGENT_TOKEN (never on the
    command line); its stdout. Fails the test on a non-zero exit."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cbt_agent",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "CBT_AGENT_TOKEN": TOKEN},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"cbt-agent {args[0]} failed:\n{out.decode()}\n{err.decode()}"
    return out.decode()


async def restored_images(dest: Path, checkpoint: str, out: Path) -> list[Path]:
    """`cbt-agent restore` of one checkpoint into `out`; the standalone images it made."""
    await cli("restore", "--dest", str(dest), "--checkpoint", checkpoint, "--out", str(out))
    return await asyncio.to_thread(lambda: sorted(out.glob("*.qcow2")))


async def restored_disks(dest: Path, checkpoint: str, out: Path) -> dict[str, bytes]:
    """Each disk's raw content as of `checkpoint`, by volume uuid (the images are removed)."""
    disks: dict[str, bytes] = {}
    for image in await restored_images(dest, checkpoint, out):
        raw = image.with_suffix(".raw")
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)
        )
        assert await proc.wait() == 0
        disks[image.stem] = await asyncio.to_thread(raw.read_bytes)
        await asyncio.to_thread(raw.unlink)
        await asyncio.to_thread(image.unlink)
    return disks
