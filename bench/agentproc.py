"""A real `cbt-agent serve` process for the benchmarks: its config, start and stop by pid."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp

from cbt_agent.config import parse_config

REPO = Path(__file__).resolve().parent.parent
LIBVIRT_URI = "qemu:///system"

TomlValue = str | int | bool | list[str]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on at the moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml(tables: Mapping[str, Mapping[str, TomlValue]]) -> str:
    # JSON's strings, integers, booleans and arrays of them are written the same way in TOML
    return "".join(
        f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())
        for name, table in tables.items()
    )


class AgentProcess:
    """`cbt-agent serve` of this tree as a child process, on a free loopback port, with its
    config (`agent.toml`), state dir (`state/`) and log (`agent.log`) in `work`.

    `nbd_ports` is the `[nbd] port_range` ("first:last"); `qmp_socket` the name of a VM's extra
    QMP socket in `work`; `extra` adds keys to the config's tables, or tables, e.g.
    `{"checkpoints": {"quiesce": "never"}}`. The config is written here and checked with the
    agent's own parser."""

    def __init__(
        self,
        work: Path,
        token: str,
        nbd_ports: str,
        *,
        qmp_socket: str = "{vm_uuid}.sock",
        extra: Mapping[str, Mapping[str, TomlValue]] | None = None,
    ) -> None:
        self.work = work
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = work / "agent.toml"
        self.log = work / "agent.log"
        tables: dict[str, dict[str, TomlValue]] = {
            "api": {"listen": f"127.0.0.1:{self.port}", "tokens": [token]},
            "state": {"dir": str(work / "state")},
            "libvirt": {"uri": LIBVIRT_URI},
            "qmp": {"socket_template": str(work / qmp_socket)},
            "nbd": {"listen": "127.0.0.1", "port_range": nbd_ports},
        }
        for name, table in (extra or {}).items():
            tables.setdefault(name, {}).update(table)
        self.db = parse_config(tables, base=work).db_path
        self.config.write_text(_toml(tables))
        self.config.chmod(0o600)  # it holds the token: the agent refuses a file others read
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        """The running (or last started) process's pid."""
        if self._proc is None:
            raise RuntimeError("the agent was not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended; None before that or before a start."""
        return None if self._proc is None else self._proc.returncode

    async def start(self, within: float = 30.0) -> float:
        """Start the process (its stdout and stderr appended to the log) and wait until
        /healthz answers 200. Returns the seconds that took. Raises RuntimeError with the
        log's tail if it exits or does not answer within `within` seconds (it is left to
        `stop()`, which the caller runs in any case)."""
        started = time.monotonic()
        env = {**os.environ, "PYTHONPATH": str(REPO)}  # this tree's agent, not an installed one
        with self.log.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cbt_agent", "serve", "--config", str(self.config),
                stdout=log, stderr=log, env=env, cwd=str(REPO),
            )  # fmt: skip
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while time.monotonic() - started < within:
                if self._proc.returncode is not None:
                    raise RuntimeError(
                        f"the agent exited ({self._proc.returncode}) at start; its log:\n"
                        f"{self.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(f"{self.base}/healthz") as r:
                        if r.status == 200:
                            return time.monotonic() - started
                await asyncio.sleep(0.05)
        raise RuntimeError(
            f"the agent did not answer /healthz in {within:g} s; its log:\n{self.log_tail()}"
        )

    async def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to its pid, SIGKILL after `grace` seconds; nothing if it is not running."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"
