"""Whether an agent serves this host's state now: `serve` holds a lock file in the state
directory from before it reconciles until it exits (the kernel drops it when the process dies,
SIGKILL included), and its API answers /healthz. Either one means it runs: its QMP socket
connections are held (a second client on a VM's extra socket hangs), and `sweep --apply` would
race its operations."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cbt_agent.config import Config
from cbt_agent.errors import OperationError

LOCK_NAME = "serve.lock"
PROBE_TIMEOUT = 2.0


def lock_path(config: Config) -> Path:
    return config.state_dir / LOCK_NAME


@contextlib.contextmanager
def serving(config: Config) -> Iterator[None]:
    """Hold the state directory's lock while the agent serves it, with the agent's pid in the
    file. Raises OperationError when another agent holds it: two agents on one database would
    each reconcile away the other's operations."""
    path = lock_path(config)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _pid_in(fd)
        os.close(fd)
        raise OperationError(
            f"another cbt-agent serves {config.state_dir}"
            + (f" (pid {pid})" if pid else "")
            + f": it holds {path}"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # the lock goes with the descriptor; the file stays (no unlink race)


def _pid_in(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def lock_holder(config: Config) -> int | None:
    """The pid of the agent holding the state directory's lock (0 when it wrote none yet);
    None when no agent holds it. Never takes the lock for longer than the test."""
    try:
        fd = os.open(lock_path(config), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _pid_in(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def healthz_url(config: Config) -> str:
    host = config.api.host
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # a wildcard: ask loopback
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if config.api.tls_cert is not None else "http"
    return f"{scheme}://{host}:{config.api.port}/healthz"


def answers_healthz(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a cbt-agent answers /healthz at `url` (no token is sent; a liveness look, so
    the certificate of an https agent is not checked)."""
    context = ssl._create_unverified_context() if url.startswith("https") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
            return r.status == 200 and bool(json.loads(r.read()).get("status") == "ok")
    except (OSError, ValueError, urllib.error.URLError):
        return False


@dataclass(frozen=True)
class AgentPresence:
    running: bool
    how: str  # for a person: what showed it runs, or that it does not

    def to_json(self) -> dict[str, object]:
        return {"running": self.running, "how": self.how}


def agent_presence(config: Config) -> AgentPresence:
    """Whether an agent serves this config's state directory or API port now."""
    pid = lock_holder(config)
    if pid is not None:
        who = f"pid {pid}" if pid else "an agent starting"
        return AgentPresence(True, f"{who} holds {lock_path(config)}")
    url = healthz_url(config)
    if answers_healthz(url):
        return AgentPresence(True, f"an agent answers {url}")
    return AgentPresence(False, "no agent holds the state directory or answers its API port")
