"""Shared fixtures. Real-stack fixtures come from tests/stack.py (import it as `import stack`).

- `libvirt_stack` (session): makes qemu:///system answer (starts libvirtd if none runs and
  stops THAT pid at the end). Missing stack: failure when CI=true, skip otherwise.
  Every test marked `@pytest.mark.stack` gets it automatically.
- `qmp_socket_dir` (session): a short test-owned directory for the extra QMP sockets;
  `qmp_socket_template` = "<dir>/{vm_uuid}.sock" (the agent's [qmp] socket_template).
- `vm_factory`: callable `(disks_mib=[64], extra_qmp=True, start=True, **make_vm kwargs) ->
  TestVm`; every VM it made is destroyed at teardown, pass or fail.
- `hypervisor`: an open cbt_agent Hypervisor on the test libvirt URI.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
# testbed/ (throwaway VMs, qemu-io writes) is a development package beside cbt_agent, not installed
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import stack
from agentproc import AgentProcess, free_port, write_config


@dataclass(frozen=True)
class LibvirtStack:
    uri: str
    started_pid: int | None  # libvirtd started by this session (stopped at its end), else None


@pytest.fixture(scope="session")
def libvirt_stack() -> Iterator[LibvirtStack]:
    try:
        pid = stack.ensure_libvirtd()
    except stack.StackUnavailable as e:
        stack.unavailable(f"real stack: {e}")
    try:
        stack.reap_orphans()
    except Exception as e:
        stack.unavailable(f"real stack: libvirt connection failed: {e}")
    try:
        yield LibvirtStack(uri=stack.LIBVIRT_URI, started_pid=pid)
    finally:
        stack.close_connection()
        if pid is not None:  # the one started here, or what replaced it (a restart)
            stack.stop_libvirtd(stack.successor(pid))


@pytest.fixture(autouse=True)
def _stack_marker(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("stack") is not None:
        request.getfixturevalue("libvirt_stack")


@pytest.fixture(scope="session")
def qmp_socket_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="cbt-qmp-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def qmp_socket_template(qmp_socket_dir: Path) -> str:
    return f"{qmp_socket_dir}/{{vm_uuid}}.sock"


@pytest.fixture
def vm_factory(
    libvirt_stack: LibvirtStack, tmp_path: Path, qmp_socket_dir: Path
) -> Iterator[Callable[..., stack.TestVm]]:
    made: list[stack.TestVm] = []

    def make(
        disks_mib: list[int] | None = None,
        extra_qmp: bool = True,
        start: bool = True,
        **kwargs: Any,
    ) -> stack.TestVm:
        kwargs.setdefault("socket_dir", qmp_socket_dir)
        vm = stack.make_vm(
            tmp_path / "vms", disks_mib or [64], extra_qmp=extra_qmp, start=start, **kwargs
        )
        made.append(vm)
        return vm

    yield make
    errors = stack.destroy_all(made)
    if errors:
        raise errors[0]


@pytest.fixture
async def hypervisor(libvirt_stack: LibvirtStack) -> AsyncIterator[Any]:
    from cbt_agent.hypervisor.libvirt import Hypervisor

    hv = Hypervisor(libvirt_stack.uri)
    await hv.open()
    try:
        yield hv
    finally:
        await hv.close()


@pytest.fixture
async def agent_process(
    tmp_path: Path, qmp_socket_template: str
) -> AsyncIterator[Callable[..., AgentProcess]]:
    """Makes `cbt-agent serve` processes (not started): `agent_process(ports, name="agent",
    extra="")`, each with its own config and state directory (`state`, or `state-<name>`);
    every one still running at teardown is killed by its pid."""
    made: list[AgentProcess] = []

    def make(ports: str, name: str = "agent", extra: str = "") -> AgentProcess:
        port = free_port()
        config = tmp_path / f"{name}.toml"
        state = tmp_path / ("state" if name == "agent" else f"state-{name}")
        write_config(config, port, state, qmp_socket_template, ports, extra)
        proc = AgentProcess(config, port)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        await proc.close()
